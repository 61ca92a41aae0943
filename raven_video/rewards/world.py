"""The video world's ground-truth score as a reward (``--reward_weights world=1``).

Field ``world``: :func:`raven_video.world.metrics.score_video`'s ``world_score`` of each video against its own
prompt (the mean of the count, colour, shape, background, direction, speed, bounce and persistence accuracies, in
[0, 1]); the detector and the scores are exact on rendered clips (``tests/test_world_metrics.py``). Prompts must be
captions of the world grammar; any other prompt is a clear ``ValueError``. Runs on the CPU (numpy / scipy, about
0.1 s per 81-frame 64x64 video), whatever the device of the rollouts.
"""

from __future__ import annotations

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
    """

    name = "world"
    fields = ("world",)
    min_frames = 8
    needs_prompts = True

    def __init__(self, window: int = 81, lag: int = 4, device=None):
        super().__init__(device, torch.float32)
        self.window, self.lag = int(window), int(lag)

    def _needs_model(self) -> bool:
        return False

    def _score(self, frames: torch.Tensor, prompts: Optional[List[str]], fps: float) -> Dict[str, torch.Tensor]:
        from ..world.metrics import score_video  # scipy: imported when the reward is used

        videos = frames.permute(0, 1, 3, 4, 2).cpu().numpy()  # [B, F, H, W, 3] uint8
        scores = []
        for video, prompt in zip(videos, prompts):
            try:
                scores.append(score_video(video, prompt, window=self.window, lag=self.lag).summary["world_score"])
            except ValueError as err:
                raise ValueError(f"world reward: prompt {prompt!r} is not a world caption ({err}); write world prompts "
                                 "with raven_video.world.write_prompt_file for --reward_weights world=1.") from None
        return {"world": torch.tensor(np.nan_to_num(scores, nan=0.0), dtype=torch.float32)}
