"""Serving world clips and prompts to training and evaluation scripts (deterministic per seed).

* :func:`world_seeds`: the seed range of a purpose: training uses ``[start, start + n)`` below
  ``HELDOUT_SEED_OFFSET`` (``10**9``); evaluation uses ``HELDOUT_SEED_OFFSET + [start, start + n)``.
* :func:`prompt_dataset`: a ``datasets.Dataset`` of ``{"seed", "prompt", "split"}`` rows, no pixels (prompt-only
  training such as RAVEN / CM-GRPO, or evaluation prompt lists).
* :class:`WorldClipDataset`: a torch map-style dataset rendering clip ``i`` on the fly as
  ``{"video": float32 [3, F, H, W] in [-1, 1], "prompt": str, "seed": int}``; a ``DataLoader`` stacks videos to
  ``[B, 3, F, H, W]``, the layout diffusers video VAEs take.
* :func:`write_prompt_file`: one prompt per line, readable by ``raven_video.data.prompts.load_prompts``.
* :func:`frames_to_tensor` / :func:`tensor_to_frames`: ``uint8 [F, H, W, 3]`` <-> ``float [3, F, H, W]``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from .render import prompt_for_seed, render_clip
from .scene import HELDOUT_SEED_OFFSET, SPLITS

__all__ = ["world_seeds", "prompt_dataset", "WorldClipDataset", "write_prompt_file", "frames_to_tensor",
           "tensor_to_frames"]


def world_seeds(num: int, evaluation: bool = False, start: int = 0) -> range:
    """``num`` consecutive seeds for training (``evaluation=False``) or evaluation (offset by ``10**9``)."""
    if num < 0 or start < 0:
        raise ValueError(f"num={num} and start={start} must be >= 0.")
    if not evaluation and start + num > HELDOUT_SEED_OFFSET:
        raise ValueError(f"training seeds must stay below {HELDOUT_SEED_OFFSET}, got start + num = {start + num}; "
                         f"lower num or start, or pass evaluation=True.")
    base = HELDOUT_SEED_OFFSET if evaluation else 0
    return range(base + start, base + start + num)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}.")


def prompt_dataset(num_prompts: int, split: str = "train", evaluation: bool = False, start: int = 0,
                   height: int = 64, width: int = 64, caption_frames: int = 81, max_objects: int = 3):
    """A ``datasets.Dataset`` with columns ``seed`` (int64), ``prompt`` (str) and ``split`` (str).

    Row ``i`` describes ``render_clip(seed_i, split=split, height=height, width=width, ...)`` with
    ``seed_i = world_seeds(num_prompts, evaluation, start)[i]`` (the prompt's bounce clause depends on the
    aspect ratio, not on the size of a square frame).
    """
    import datasets

    _check_split(split)
    seeds = list(world_seeds(num_prompts, evaluation, start))
    prompts = [prompt_for_seed(seed, split, height, width, caption_frames, max_objects) for seed in seeds]
    features = datasets.Features({"seed": datasets.Value("int64"), "prompt": datasets.Value("string"),
                                  "split": datasets.Value("string")})
    return datasets.Dataset.from_dict({"seed": seeds, "prompt": prompts, "split": [split] * len(seeds)},
                                      features=features)


def write_prompt_file(path: str, num_prompts: int, split: str = "heldout", evaluation: bool = True, start: int = 0,
                      height: int = 64, width: int = 64, caption_frames: int = 81, max_objects: int = 3) -> list[str]:
    """Write the prompts of :func:`prompt_dataset` to ``path``, one per line; returns them."""
    _check_split(split)  # the prompts of prompt_dataset, without needing the datasets library
    prompts = [prompt_for_seed(seed, split, height, width, caption_frames, max_objects)
               for seed in world_seeds(num_prompts, evaluation, start)]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(prompt + "\n" for prompt in prompts)
    return prompts


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """``uint8 [F, H, W, 3]`` -> ``float32 [3, F, H, W]`` in [-1, 1]."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}.")
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """``[3, F, H, W]`` (or ``[B, 3, F, H, W]``) in [-1, 1] -> ``uint8 [F, H, W, 3]`` (or ``[B, F, H, W, 3]``)."""
    if video.ndim not in (4, 5) or video.shape[-4] != 3:
        raise ValueError(f"video must be [3, F, H, W] or [B, 3, F, H, W], got {tuple(video.shape)}.")
    pixels = ((video.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.movedim(-4, -1).numpy()


class WorldClipDataset(Dataset):
    """Rendered world clips, item ``i`` from seed ``world_seeds(num_clips, evaluation, start)[i]``.

    Args:
        num_clips: dataset length (clips are rendered on access, so a large value costs nothing).
        split: ``"train"`` or ``"heldout"`` scene content.
        evaluation: use the evaluation seed range (see :func:`world_seeds`).
        start: first seed offset.
        num_frames, height, width, caption_frames, max_objects: as in :func:`~raven_video.world.render_clip`.
    Items: ``{"video": float32 [3, F, H, W] in [-1, 1], "prompt": str, "seed": int}``.
    """

    def __init__(self, num_clips: int, split: str = "train", evaluation: bool = False, start: int = 0,
                 num_frames: int = 81, height: int = 64, width: int = 64, caption_frames: int = 81,
                 max_objects: int = 3):
        _check_split(split)
        self.seeds = world_seeds(num_clips, evaluation, start)
        self.render_kwargs = {"num_frames": num_frames, "height": height, "width": width, "split": split,
                              "caption_frames": caption_frames, "max_objects": max_objects}

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> dict:
        if not -len(self.seeds) <= index < len(self.seeds):
            raise IndexError(f"index {index} is out of range for {len(self.seeds)} clips.")
        seed = self.seeds[index]
        clip = render_clip(seed, **self.render_kwargs)
        return {"video": frames_to_tensor(clip.frames), "prompt": clip.prompt, "seed": seed}
