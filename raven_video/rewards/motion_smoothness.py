"""Motion smoothness: AMT-S frame interpolation of the dropped frames, VBench semantics
(docs/rewards_eval.md ``ms_MS``).

Per video ``[F, 3, H, W]`` uint8 (all frames, native resolution):

1. inputs = even frames ``0, 2, 4, ...`` as float ``x / 255``, replicate-padded to a multiple of 16 (AMT's
   ``InputPadder``), ``embt = 0.5``, ``scale_factor = 1`` (VBench's value on any GPU with >= ~4 GB),
2. AMT-S predicts the midpoint of each consecutive even pair; prediction -> ``uint8(clip(x * 255))`` (truncation,
   as VBench's ``tensor2img``),
3. score = ``(255 - mean |odd_t - interp_t|) / 255`` averaged over the odd frames ``1, 3, ...`` that have a
   prediction.

The network is the AMT-S ``Model`` that ships in the ``vbench`` package (``vbench.third_party.amt.networks.AMT-S``;
the only AMT implementation on PyPI; we depend on it instead of copying it: the AMT code's license is unclear). Weights: the official ``amt-s.pth`` (``{'state_dict': ...}``).
"""

from __future__ import annotations

import importlib
from typing import Dict, Optional, Union

import torch

from ._torchvision_compat import ensure_torchvision_importable
from .base import VideoReward, pad_to_multiple, resolve_checkpoint, torch_load, unpad

__all__ = ["MotionSmoothnessReward", "build_amt_s", "AMT_S_CONFIG"]

#: ``vbench/third_party/amt/cfgs/AMT-S.yaml`` network params.
AMT_S_CONFIG = dict(corr_radius=3, corr_lvls=4, num_flows=3)


def build_amt_s(checkpoint: Optional[str] = None, allow_pickle: bool = False) -> torch.nn.Module:
    """AMT-S from the ``vbench`` package, random or loaded ``strict=True`` from an ``amt-s.pth``-style file
    (``{'state_dict': {...}}`` or a plain state dict, optional ``module.`` prefix)."""
    ensure_torchvision_importable()
    try:
        amt = importlib.import_module("vbench.third_party.amt.networks.AMT-S")
    except ImportError as e:
        raise ImportError(
            "MotionSmoothnessReward needs the AMT-S network from the `vbench` package: "
            "`pip install --no-deps vbench==0.1.5` (see .ci/install_rewards.sh)."
        ) from e
    model = amt.Model(**AMT_S_CONFIG)
    if checkpoint is not None:
        ckpt = torch_load(checkpoint, allow_pickle=allow_pickle)
        sd = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False)


class MotionSmoothnessReward(VideoReward):
    """AMT-S motion smoothness (field ``motion_smoothness``, about 0.96-0.995 on real videos).

    Args:
        checkpoint: ``amt-s.pth`` (local path / folder / ``"owner/repo/file"``). Required unless ``random_init=True``
            or ``model`` is given.
        random_init: random AMT-S weights (tests, speed benchmarks).
        model: an already built AMT-S module.
        device, dtype: where/how AMT-S runs (VBench/RAVEN: fp32).
        allow_pickle: consent to unpickle a checkpoint that ``torch.load(weights_only=True)`` refuses (it runs code
            stored in the file: trusted files only; see :func:`~raven_video.rewards.base.torch_load`).
        pair_batch_size: frame pairs per AMT forward.
    """

    name = "motion_smoothness"
    fields = ("motion_smoothness",)
    min_frames = 3

    def __init__(
        self,
        checkpoint: Optional[str] = None,
        *,
        random_init: bool = False,
        model: Optional[torch.nn.Module] = None,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
        pair_batch_size: int = 8,
    ):
        super().__init__(device, dtype, allow_pickle)
        self._set_weights(checkpoint, random_init, model, "amt-s.pth | 'owner/repo/amt-s.pth'")
        self.pair_batch_size = int(pair_batch_size)

    def _build(self) -> None:
        path = None if self.checkpoint is None else str(resolve_checkpoint(self.checkpoint, "amt-s.pth", self.name))
        self.model = build_amt_s(path, allow_pickle=self.allow_pickle).to(self.device, self.dtype)

    def interpolate(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        """Midpoint frames. ``img0, img1``: uint8 ``[N, 3, H, W]`` -> uint8 ``[N, 3, H, W]``."""
        h, w = img0.shape[-2:]
        x0 = pad_to_multiple(img0.to(self.dtype) / 255.0, 16)
        x1 = pad_to_multiple(img1.to(self.dtype) / 255.0, 16)
        embt = torch.full((x0.shape[0], 1, 1, 1), 0.5, device=x0.device, dtype=self.dtype)
        pred = self.model(x0, x1, embt, scale_factor=1.0, eval=True)["imgt_pred"]
        pred = unpad(pred, h, w).float()
        return (pred * 255.0).clamp(0, 255).to(torch.uint8)  # truncation, like VBench's tensor2img

    def _score(self, frames, prompts, fps) -> Dict[str, torch.Tensor]:
        b = frames.shape[0]
        even = frames[:, 0::2]
        n_pairs = even.shape[1] - 1
        targets = frames[:, 1 : 2 * n_pairs : 2]  # odd frames with a prediction, [B, n_pairs, 3, H, W]
        first = even[:, :-1].reshape(b * n_pairs, *frames.shape[2:])
        second = even[:, 1:].reshape(b * n_pairs, *frames.shape[2:])
        target = targets.reshape(b * n_pairs, *frames.shape[2:])
        diffs = []
        for s in range(0, b * n_pairs, self.pair_batch_size):
            sl = slice(s, s + self.pair_batch_size)
            pred = self.interpolate(first[sl], second[sl])
            diffs.append((pred.float() - target[sl].float()).abs().flatten(1).mean(1))
        mae = torch.cat(diffs).reshape(b, n_pairs).mean(1)
        return {"motion_smoothness": (255.0 - mae) / 255.0}
