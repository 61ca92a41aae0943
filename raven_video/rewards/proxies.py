"""Weight-free proxy rewards for CPU work, CI and small experiments.

All take uint8 ``[B, F, 3, H, W]`` through the common :class:`~raven_video.rewards.base.VideoReward` interface and
run batched in plain torch on any device (hand-written because they are a few tensor ops each; no library computes
these exact VBench-style statistics on tensors).

* ``proxy_motion`` - frame-difference motion: mean over consecutive pairs of the mean of the top 5 % absolute
  grey-level differences, in grey levels / 255. 0 for a static video; grows with motion (a cheap stand-in for
  dynamic degree).
* ``proxy_flicker`` - VBench temporal-flickering formula on all frames: ``(255 - mean |f_t - f_{t+1}|) / 255``
  (1 = no change; higher = steadier).
* ``proxy_smoothness`` - AMT-free motion smoothness: odd frames predicted as the mean of their even neighbours,
  ``(255 - MAE) / 255`` (same frame selection as VBench motion smoothness).
* ``proxy_brightness`` - mean grey level / 255 (exposure). Nearly linear in the decoded pixels, so even a tiny random
  model can move it: the sanity check that an RL run raises a reward at all.
* ``proxy_sharpness_drift`` - ``log(sharpness(tail) / sharpness(head))`` with sharpness = variance of the 3x3
  Laplacian of the grey frame, head/tail = first/last 20 % of the frames (at least one each). 0 = no drift,
  negative = the video gets blurrier over time (long-horizon degradation).
"""

from __future__ import annotations

from typing import Dict, Union

import torch
import torch.nn.functional as F

from .base import VideoReward

__all__ = ["FrameDifferenceMotion", "TemporalFlicker", "BlendSmoothness", "SharpnessDrift", "Brightness", "grey"]

_LUMA = (0.299, 0.587, 0.114)


def grey(frames: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` -> float grey ``[..., H, W]`` in [0, 255] (ITU-R 601 luma, as OpenCV)."""
    w = torch.tensor(_LUMA, device=frames.device, dtype=torch.float32).view(3, 1, 1)
    return (frames.float() * w).sum(-3)


class _ProxyReward(VideoReward):
    def __init__(self, device: Union[str, torch.device, None] = None):
        super().__init__(device, torch.float32)

    def _needs_model(self) -> bool:
        return False


class FrameDifferenceMotion(_ProxyReward):
    """Field ``proxy_motion``: mean over pairs of the top-``top_fraction`` |grey difference| / 255."""

    name = "proxy_motion"
    fields = ("proxy_motion",)
    min_frames = 2

    def __init__(self, top_fraction: float = 0.05, device=None):
        super().__init__(device)
        self.top_fraction = float(top_fraction)

    def _score(self, frames, prompts, fps) -> Dict[str, torch.Tensor]:
        g = grey(frames)
        diff = (g[:, 1:] - g[:, :-1]).abs().flatten(2)  # [B, F-1, H*W]
        k = max(1, int(diff.shape[-1] * self.top_fraction))
        return {"proxy_motion": diff.topk(k, dim=-1).values.mean(-1).mean(-1) / 255.0}


class TemporalFlicker(_ProxyReward):
    """Field ``proxy_flicker``: VBench temporal flickering ``(255 - mean |f_t - f_{t+1}|) / 255`` on RGB."""

    name = "proxy_flicker"
    fields = ("proxy_flicker",)
    min_frames = 2

    def _score(self, frames, prompts, fps) -> Dict[str, torch.Tensor]:
        x = frames.float()
        mae = (x[:, 1:] - x[:, :-1]).abs().flatten(2).mean(-1).mean(-1)
        return {"proxy_flicker": (255.0 - mae) / 255.0}


class Brightness(_ProxyReward):
    """Field ``proxy_brightness``: mean grey level / 255 over all frames (1 = white, 0 = black)."""

    name = "proxy_brightness"
    fields = ("proxy_brightness",)
    min_frames = 1

    def _score(self, frames, prompts, fps) -> Dict[str, torch.Tensor]:
        return {"proxy_brightness": grey(frames).flatten(1).mean(-1) / 255.0}


class BlendSmoothness(_ProxyReward):
    """Field ``proxy_smoothness``: odd frames vs the rounded mean of their even neighbours, ``(255 - MAE) / 255``."""

    name = "proxy_smoothness"
    fields = ("proxy_smoothness",)
    min_frames = 3

    def _score(self, frames, prompts, fps) -> Dict[str, torch.Tensor]:
        x = frames.float()
        even = x[:, 0::2]
        n = even.shape[1] - 1
        pred = ((even[:, :-1] + even[:, 1:]) / 2.0).floor()
        target = x[:, 1 : 2 * n : 2]
        mae = (pred - target).abs().flatten(2).mean(-1).mean(-1)
        return {"proxy_smoothness": (255.0 - mae) / 255.0}


class SharpnessDrift(_ProxyReward):
    """Field ``proxy_sharpness_drift``: ``log`` ratio of Laplacian variance, last vs first ``fraction`` of frames."""

    name = "proxy_sharpness_drift"
    fields = ("proxy_sharpness_drift",)
    min_frames = 2

    def __init__(self, fraction: float = 0.2, eps: float = 1e-6, device=None):
        super().__init__(device)
        if not 0.0 < fraction <= 0.5:
            raise ValueError(f"SharpnessDrift: fraction must be in (0, 0.5], got {fraction}")
        self.fraction, self.eps = float(fraction), float(eps)

    def sharpness(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, F, 3, H, W]`` -> Laplacian variance per frame ``[B, F]``."""
        b, f = frames.shape[:2]
        g = grey(frames).reshape(b * f, 1, *frames.shape[-2:])
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=g.device).view(1, 1, 3, 3)
        lap = F.conv2d(g, kernel)
        return lap.flatten(1).var(dim=1, unbiased=False).reshape(b, f)

    def _score(self, frames, prompts, fps) -> Dict[str, torch.Tensor]:
        s = self.sharpness(frames)
        n = max(1, int(round(frames.shape[1] * self.fraction)))
        head, tail = s[:, :n].mean(1), s[:, -n:].mean(1)
        return {"proxy_sharpness_drift": torch.log((tail + self.eps) / (head + self.eps))}
