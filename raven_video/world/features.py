"""A small 3-D convolutional clip encoder whose features give the world's Fréchet distance (an FVD of this world).

:class:`ClipEncoder` maps clips ``[B, 3, F, H, W]`` in [-1, 1] (any ``F``, ``H``, ``W``) to features ``[B, D]``:
four ``Conv3d(k=3) + GroupNorm + SiLU`` stages (spatial stride 2 each, temporal stride 2 from the second one),
a global average over time and space, and a linear projection (about 150k parameters by default). It is trained
by :func:`train_encoder` with supervised heads on the ground truth of freshly rendered ``split="train"`` clips:
object count, which colours are present, the shape and the motion of each present colour, and the background.

Weights are stored as safetensors plus a JSON config (never pickle): :func:`save_encoder` / :func:`load_encoder`.
:func:`encode_videos` and :func:`clip_frechet_distance` compute features and the distance between two sets of
videos.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .data import frames_to_tensor
from .metrics import feature_statistics, frechet_distance
from .render import render_clip
from .scene import BACKGROUNDS, COLOURS, HELDOUT_SEED_OFFSET, MOTIONS, SHAPES, SceneSpec

__all__ = ["ClipEncoder", "scene_targets", "train_encoder", "save_encoder", "load_encoder", "encode_videos",
           "clip_frechet_distance"]

_WEIGHTS = "encoder.safetensors"
_CONFIG = "config.json"
_COLOURS = tuple(COLOURS)
_IGNORE = -100


class ClipEncoder(nn.Module):
    """Clip encoder with training heads.

    Args:
        channels: output channels of the four conv stages (each divisible by 8 for GroupNorm).
        feature_dim: size ``D`` of the feature vector.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 48, 64), feature_dim: int = 64):
        super().__init__()
        if len(channels) != 4 or any(c <= 0 or c % 8 for c in channels) or feature_dim <= 0:
            raise ValueError(f"channels={list(channels)} must be 4 positive multiples of 8 and feature_dim="
                             f"{feature_dim} positive; the default is (16, 32, 48, 64) and 64.")
        self.channels = tuple(int(c) for c in channels)
        self.feature_dim = int(feature_dim)
        stages, previous = [], 3
        for index, width in enumerate(self.channels):
            stride = (1, 2, 2) if index == 0 else (2, 2, 2)
            stages += [nn.Conv3d(previous, width, 3, stride=stride, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
            previous = width
        self.body = nn.Sequential(*stages)
        self.project = nn.Linear(previous, self.feature_dim)
        num_colours = len(_COLOURS)
        self.heads = nn.ModuleDict({
            "count": nn.Linear(self.feature_dim, 3),
            "colours": nn.Linear(self.feature_dim, num_colours),
            "shapes": nn.Linear(self.feature_dim, num_colours * len(SHAPES)),
            "motions": nn.Linear(self.feature_dim, num_colours * len(MOTIONS)),
            "background": nn.Linear(self.feature_dim, len(BACKGROUNDS)),
        })

    @property
    def config(self) -> dict:
        return {"channels": list(self.channels), "feature_dim": self.feature_dim}

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, F, H, W]`` in [-1, 1] -> features ``[B, D]``."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W], got {tuple(video.shape)}.")
        return self.project(self.body(video).mean(dim=(2, 3, 4)))

    def predict(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head logits: count ``[B, 3]``, colours ``[B, 7]``, shapes ``[B, 7, 3]``, motions ``[B, 7, 11]``,
        background ``[B, 3]``."""
        hidden = F.silu(self.forward(video))
        logits = {name: head(hidden) for name, head in self.heads.items()}
        batch = video.shape[0]
        logits["shapes"] = logits["shapes"].view(batch, len(_COLOURS), len(SHAPES))
        logits["motions"] = logits["motions"].view(batch, len(_COLOURS), len(MOTIONS))
        return logits


def scene_targets(scenes: Sequence[SceneSpec]) -> dict[str, torch.Tensor]:
    """Head targets of a batch: count ``[B]`` (objects - 1), colours ``[B, 7]`` (0/1), shapes and motions
    ``[B, 7]`` (class index, -100 for absent colours), background ``[B]``."""
    batch = len(scenes)
    colours = torch.zeros(batch, len(_COLOURS))
    shapes = torch.full((batch, len(_COLOURS)), _IGNORE, dtype=torch.long)
    motions = torch.full((batch, len(_COLOURS)), _IGNORE, dtype=torch.long)
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            column = _COLOURS.index(obj.colour)
            colours[row, column] = 1.0
            shapes[row, column] = SHAPES.index(obj.shape)
            motions[row, column] = MOTIONS.index(obj.motion)
    return {
        "count": torch.tensor([len(scene.objects) - 1 for scene in scenes]),
        "colours": colours,
        "shapes": shapes,
        "motions": motions,
        "background": torch.tensor([list(BACKGROUNDS).index(scene.background) for scene in scenes]),
    }


def _loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the head losses (cross-entropy; binary cross-entropy for colour presence)."""
    return (F.cross_entropy(logits["count"], targets["count"])
            + F.binary_cross_entropy_with_logits(logits["colours"], targets["colours"])
            + F.cross_entropy(logits["shapes"].flatten(0, 1), targets["shapes"].flatten(), ignore_index=_IGNORE)
            + F.cross_entropy(logits["motions"].flatten(0, 1), targets["motions"].flatten(), ignore_index=_IGNORE)
            + F.cross_entropy(logits["background"], targets["background"]))


def train_encoder(num_steps: int, batch_size: int = 16, seed: int = 0, num_frames: int = 33, height: int = 64,
                  width: int = 64, lr: float = 2e-3, channels: Sequence[int] = (16, 32, 48, 64),
                  feature_dim: int = 64, device: str | torch.device = "cpu") -> tuple[ClipEncoder, list[float]]:
    """Train a :class:`ClipEncoder` on clips rendered on the fly (AdamW, one fresh batch per step).

    Clip seeds are drawn from ``default_rng(seed)`` in the training range ``[0, 10**9)``, ``split="train"``.
    Returns ``(model in eval mode, loss per step)``.
    """
    if num_steps < 1 or batch_size < 1:
        raise ValueError(f"num_steps={num_steps} and batch_size={batch_size} must both be >= 1.")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ClipEncoder(channels, feature_dim).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    history = []
    model.train()
    for _ in range(num_steps):
        clips = [render_clip(int(s), num_frames=num_frames, height=height, width=width)
                 for s in rng.integers(0, HELDOUT_SEED_OFFSET, size=batch_size)]
        video = torch.stack([frames_to_tensor(clip.frames) for clip in clips]).to(device)
        targets = {name: value.to(device) for name, value in scene_targets([clip.scene for clip in clips]).items()}
        loss = _loss(model.predict(video), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    return model.eval(), history


def save_encoder(model: ClipEncoder, directory: str) -> None:
    """Write ``directory/encoder.safetensors`` (weights) and ``directory/config.json``."""
    os.makedirs(directory, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, os.path.join(directory, _WEIGHTS))
    with open(os.path.join(directory, _CONFIG), "w", encoding="utf-8") as handle:
        json.dump(model.config, handle, indent=2)


def load_encoder(directory: str, device: str | torch.device = "cpu") -> ClipEncoder:
    """Load an encoder written by :func:`save_encoder` (eval mode)."""
    paths = [os.path.join(directory, name) for name in (_CONFIG, _WEIGHTS)]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"{missing} not found; write the encoder with save_encoder(model, {directory!r}).")
    with open(paths[0], encoding="utf-8") as handle:
        config = json.load(handle)
    model = ClipEncoder(**config)
    model.load_state_dict(load_file(paths[1]))
    return model.to(device).eval()


@torch.no_grad()
def encode_videos(model: ClipEncoder, videos: Iterable[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """Features ``float64 [N, D]`` of videos given as ``uint8 [F, H, W, 3]`` arrays (one size per batch)."""
    device = next(model.parameters()).device
    features, batch = [], []
    for video in videos:
        batch.append(frames_to_tensor(video))
        if len(batch) == batch_size:
            features.append(model(torch.stack(batch).to(device)).double().cpu())
            batch = []
    if batch:
        features.append(model(torch.stack(batch).to(device)).double().cpu())
    if not features:
        raise ValueError("no video to encode; pass at least one uint8 [F, H, W, 3] array.")
    return torch.cat(features).numpy()


def clip_frechet_distance(model: ClipEncoder, videos_a: Iterable[np.ndarray], videos_b: Iterable[np.ndarray],
                          batch_size: int = 16) -> float:
    """Fréchet distance between the encoder features of two sets of ``uint8 [F, H, W, 3]`` videos."""
    stats_a = feature_statistics(encode_videos(model, videos_a, batch_size))
    stats_b = feature_statistics(encode_videos(model, videos_b, batch_size))
    return frechet_distance(*stats_a, *stats_b)
