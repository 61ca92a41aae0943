"""The video world's ground-truth score as a reward (``--reward_weights world=1``).

Field ``world``: :func:`raven_video.world.metrics.score_video`'s ``world_score`` of each video against its own
prompt (the mean of the count, colour, shape, background, direction, speed, bounce and persistence accuracies, in
[0, 1]); the detector and the scores are exact on rendered clips (``tests/test_world_metrics.py``). Prompts must be
captions of the world grammar; any other prompt is a clear ``ValueError``. Runs on the CPU (numpy / scipy, about
0.1-0.15 s per 81-frame 64x64 video), whatever the device of the rollouts, in a pool of worker processes when
``workers > 1``: in run 3 the serial score of 16 rollouts took 2.5 s of CM-GRPO's 3.9 s step on an H200 host whose 32
cores sat idle (``docs/world.md``).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional

import numpy as np
import torch

from .base import VideoReward

__all__ = ["WorldReward"]


class WorldReward(VideoReward):
    """Field ``world``: the world score in [0, 1] of each video against its prompt (module docstring).

    Args:
        window: frames per scoring window (81 = the training length); longer videos average their windows.
        lag: frames between the two ends of a motion step.
        workers: processes that score a batch in parallel (1: in this process). Default: this machine's cores
            shared among the processes of a launch (``LOCAL_WORLD_SIZE``), at most 16. The pool starts at the first
            batch (``forkserver``: the workers import numpy and scipy, not torch or CUDA state) and lives with the
            reward.
    """

    name = "world"
    fields = ("world",)
    min_frames = 8
    needs_prompts = True

    def __init__(self, window: int = 81, lag: int = 4, workers: Optional[int] = None, device=None):
        super().__init__(device, torch.float32)
        self.window, self.lag = int(window), int(lag)
        if workers is None:
            workers = min(16, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        if int(workers) < 1:
            raise ValueError(f"world reward: workers={workers} must be >= 1 (1 scores in this process).")
        self.workers = int(workers)
        self._pool: Optional[ProcessPoolExecutor] = None

    def _needs_model(self) -> bool:
        return False

    def _score(self, frames: torch.Tensor, prompts: Optional[List[str]], fps: float) -> Dict[str, torch.Tensor]:
        from ..world.captions import parse_caption  # scipy: imported when the reward is used
        from ..world.metrics import world_score_of

        for prompt in prompts:  # here, before any work is sent out, so the error is one clear line
            try:
                parse_caption(prompt)
            except ValueError as err:
                raise ValueError(f"world reward: prompt {prompt!r} is not a world caption ({err}); write world prompts "
                                 "with raven_video.world.write_prompt_file for --reward_weights world=1.") from None
        videos = frames.permute(0, 1, 3, 4, 2).cpu().numpy()  # [B, F, H, W, 3] uint8
        score = functools.partial(world_score_of, window=self.window, lag=self.lag)
        items = list(zip(videos, prompts))
        if self.workers > 1 and len(items) > 1:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("forkserver"))
            scores = list(self._pool.map(score, items))
        else:
            scores = [score(item) for item in items]
        return {"world": torch.tensor(np.nan_to_num(scores, nan=0.0), dtype=torch.float32)}

    def close(self) -> None:
        """Stop the worker processes (also done at interpreter exit)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __getstate__(self):  # a live pool does not pickle; a copy starts its own
        state = dict(self.__dict__)
        state["_pool"] = None
        return state
