"""Dynamic degree: RAFT optical-flow magnitude, VBench preprocessing (docs/rewards_eval.md ``raft_RAFT``).

Per video ``[F, 3, H, W]`` uint8 at ``fps`` (16 for Wan):

1. keep every ``max(1, round(fps / 8))``-th frame (VBench's 8 fps subsampling; 81 frames -> 41),
2. RAFT (torchvision ``raft_large``, 20 flow updates, input ``x / 255 * 2 - 1``, replicate padding to a multiple of 8
   centred like VBench's ``InputPadder('sintel')``) on each consecutive pair,
3. per pair: mean of the top 5 % flow magnitudes, ``k = int(h * w * 0.05)`` over the (padded) flow field, as VBench,
4. ``dynamic_degree`` = mean over pairs (continuous, in pixels; RAVEN's reward),
   ``dynamic_degree_vbench`` = VBench's binary flag: 1 iff at least ``round(4 * n_frames / 16)`` pairs exceed
   ``6 * min(H, W) / 256`` px.

Weights: torchvision's ``Raft_Large_Weights.C_T_V1`` file (``raft_large_C_T_V1-22a6c225.pth``) or the princeton-vl
``raft-things.pth`` that VBench uses (``module.``-prefixed keys; mapped to torchvision names by
:func:`convert_princeton_raft_state_dict`). Both are the same network trained on FlyingChairs + FlyingThings3D.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Union

import torch

from ._torchvision_compat import import_torchvision
from .base import VideoReward, pad_to_multiple, resolve_checkpoint, torch_load

__all__ = [
    "DynamicDegreeReward",
    "convert_princeton_raft_state_dict",
    "top_fraction_flow_magnitude",
    "build_raft_large",
    "farneback_flow",
    "vbench_is_static",
]

# princeton-vl RAFT (VBench's third_party/RAFT) -> torchvision.models.optical_flow.RAFT parameter names.
_BLOCK_RENAMES = [
    (r"\.conv1\.", ".convnormrelu1.0."),
    (r"\.conv2\.", ".convnormrelu2.0."),
    (r"\.norm1\.", ".convnormrelu1.1."),
    (r"\.norm2\.", ".convnormrelu2.1."),
]
_UPDATE_RENAMES = {
    "update_block.encoder.convc1.": "update_block.motion_encoder.convcorr1.0.",
    "update_block.encoder.convc2.": "update_block.motion_encoder.convcorr2.0.",
    "update_block.encoder.convf1.": "update_block.motion_encoder.convflow1.0.",
    "update_block.encoder.convf2.": "update_block.motion_encoder.convflow2.0.",
    "update_block.encoder.conv.": "update_block.motion_encoder.conv.0.",
    "update_block.mask.0.": "mask_predictor.convrelu.0.",
    "update_block.mask.2.": "mask_predictor.conv.",
}


def convert_princeton_raft_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map a princeton-vl ``raft-things.pth`` state dict (179 tensors, optional ``module.`` prefix) to torchvision's
    ``raft_large`` names (169 tensors). ``*.norm3.*`` duplicates ``downsample.1.*`` in the original and is dropped.
    A state dict already in torchvision layout is returned unchanged."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if any(k.startswith("feature_encoder.") for k in sd):
        return sd
    out = {}
    for key, value in sd.items():
        if ".norm3." in key:
            continue
        new = key
        for enc_old, enc_new in (("fnet.", "feature_encoder."), ("cnet.", "context_encoder.")):
            if key.startswith(enc_old):
                rest = key[len(enc_old):]
                if rest.startswith("conv1."):
                    rest = "convnormrelu.0." + rest[len("conv1."):]
                elif rest.startswith("norm1."):
                    rest = "convnormrelu.1." + rest[len("norm1."):]
                elif rest.startswith("conv2."):
                    rest = "conv." + rest[len("conv2."):]
                elif rest.startswith("layer"):
                    head, tail = rest.split(".", 2)[:2], rest.split(".", 2)[2]
                    tail = "." + tail
                    for pat, rep in _BLOCK_RENAMES:
                        tail = re.sub("^" + pat, rep, tail)
                    rest = ".".join(head) + tail
                new = enc_new + rest
                break
        else:
            for old, rep in _UPDATE_RENAMES.items():
                if key.startswith(old):
                    new = rep + key[len(old):]
                    break
            else:
                m = re.match(r"update_block\.gru\.conv([zrq])([12])\.(.*)", key)
                if m:
                    new = f"update_block.recurrent_block.convgru{m.group(2)}.conv{m.group(1)}.{m.group(3)}"
        out[new] = value
    return out


def build_raft_large(checkpoint: Optional[str] = None, allow_pickle: bool = False) -> torch.nn.Module:
    """torchvision ``raft_large`` with random weights, or loaded (``strict=True``) from a local checkpoint in either
    torchvision or princeton-vl layout (plain state dict, ``{'state_dict': ...}`` or ``module.``-prefixed)."""
    tv = import_torchvision()
    model = tv.models.optical_flow.raft_large(weights=None, progress=False)
    if checkpoint is not None:
        sd = torch_load(checkpoint, allow_pickle=allow_pickle)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        model.load_state_dict(convert_princeton_raft_state_dict(sd), strict=True)
    return model.eval().requires_grad_(False)


def farneback_flow(img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
    """Weight-free classical optical flow (OpenCV Farneback, pyramid 0.5/3 levels, window 15, 3 iterations, poly 5/1.2;
    tested to recover synthetic pan speeds). ``img*``: uint8 ``[N, 3, H, W]`` -> ``[N, 2, H, W]``."""
    import cv2
    import numpy as np

    out = []
    for a, b in zip(img1.cpu(), img2.cpu()):
        ga = cv2.cvtColor(np.ascontiguousarray(a.permute(1, 2, 0).numpy()), cv2.COLOR_RGB2GRAY)
        gb = cv2.cvtColor(np.ascontiguousarray(b.permute(1, 2, 0).numpy()), cv2.COLOR_RGB2GRAY)
        flow = cv2.calcOpticalFlowFarneback(ga, gb, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        out.append(torch.from_numpy(flow).permute(2, 0, 1))
    return torch.stack(out).to(img1.device)


def top_fraction_flow_magnitude(flow: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the largest ``int(h * w * fraction)`` flow magnitudes per pair. ``flow``: ``[N, 2, h, w]`` -> ``[N]``."""
    mag = flow.float().square().sum(1).sqrt().flatten(1)
    k = max(1, int(mag.shape[1] * fraction))
    return mag.topk(k, dim=1).values.mean(1)


def compute_flow(model: torch.nn.Module, img1: torch.Tensor, img2: torch.Tensor, num_flow_updates: int) -> torch.Tensor:
    """RAFT flow on padded inputs (VBench scores the padded field). ``img*``: uint8 ``[N, 3, H, W]`` -> ``[N, 2, H', W']``.

    torchvision's RAFT needs ``H, W >= 128`` (its correlation pyramid downsamples 8 x 16)."""
    if min(img1.shape[-2:]) < 128:
        raise ValueError(
            f"RAFT needs frames of at least 128x128 pixels, got {tuple(img1.shape[-2:])}; "
            "use flow_backend='farneback' for tiny videos"
        )
    param = next(model.parameters())
    a = pad_to_multiple(img1.to(param.device, param.dtype) / 127.5 - 1.0, 8)
    b = pad_to_multiple(img2.to(param.device, param.dtype) / 127.5 - 1.0, 8)
    return model(a, b, num_flow_updates=num_flow_updates)[-1]


class DynamicDegreeReward(VideoReward):
    """RAFT dynamic degree (fields ``dynamic_degree`` [px, continuous], ``dynamic_degree_vbench`` [0/1]).

    Args:
        checkpoint: local path / folder / ``"owner/repo/file.pth"`` of ``raft-things.pth`` or
            ``raft_large_C_T_V1-22a6c225.pth``. Required unless ``random_init=True`` or ``model`` is given.
        random_init: build ``raft_large`` with random weights (tests, speed benchmarks).
        model: an already built torchvision RAFT module.
        flow_backend: ``"raft"`` (default, VBench parity) or ``"farneback"`` (OpenCV, weight-free: CPU work, tiny
            videos, and testing the VBench scoring pipeline on real photos without weights).
        device, dtype: where/how RAFT runs (VBench and RAVEN use fp32).
        allow_pickle: consent to unpickle a checkpoint that ``torch.load(weights_only=True)`` refuses (it runs code
            stored in the file: trusted files only; see :func:`~raven_video.rewards.base.torch_load`).
        num_flow_updates: RAFT refinement iterations (VBench: 20).
        target_fps: frame subsampling target (VBench: 8 fps -> every ``round(fps / 8)``-th frame).
        top_fraction: fraction of largest magnitudes averaged per pair (VBench DD: 0.05).
        pair_batch_size: frame pairs per RAFT forward.
    """

    name = "dynamic_degree"
    fields = ("dynamic_degree", "dynamic_degree_vbench")
    min_frames = 2

    def __init__(
        self,
        checkpoint: Optional[str] = None,
        *,
        random_init: bool = False,
        model: Optional[torch.nn.Module] = None,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
        num_flow_updates: int = 20,
        target_fps: float = 8.0,
        top_fraction: float = 0.05,
        pair_batch_size: int = 8,
        flow_backend: str = "raft",
    ):
        super().__init__(device, dtype, allow_pickle)
        if flow_backend not in ("raft", "farneback"):
            raise ValueError(f"DynamicDegreeReward: flow_backend must be 'raft' or 'farneback', got {flow_backend!r}")
        self.flow_backend = flow_backend
        self._set_weights(checkpoint, random_init, model,
                          "raft-things.pth | raft_large_C_T_V1-22a6c225.pth | 'owner/repo/file.pth'",
                          required=flow_backend == "raft")
        self.num_flow_updates = int(num_flow_updates)
        self.target_fps = float(target_fps)
        self.top_fraction = float(top_fraction)
        self.pair_batch_size = int(pair_batch_size)

    def _needs_model(self) -> bool:
        return self.flow_backend == "raft"

    def _flow(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
        if self.flow_backend == "farneback":
            return farneback_flow(img1, img2)
        return compute_flow(self.model, img1, img2, self.num_flow_updates)

    def _build(self) -> None:
        path = None if self.checkpoint is None else str(resolve_checkpoint(self.checkpoint, "raft-things.pth", self.name))
        self.model = build_raft_large(path, allow_pickle=self.allow_pickle).to(self.device, self.dtype)

    def frame_indices(self, num_frames: int, fps: float) -> List[int]:
        """VBench: ``interval = max(1, round(fps / 8))``; frames ``0, interval, 2 * interval, ...``."""
        interval = max(1, round(fps / self.target_fps))
        return list(range(0, num_frames, interval))

    def pair_scores(self, frames: torch.Tensor, fps: float) -> torch.Tensor:
        """Per-pair top-5 % flow magnitude. ``frames`` uint8 ``[B, F, 3, H, W]`` -> ``[B, P]``."""
        idx = self.frame_indices(frames.shape[1], fps)
        if len(idx) < 2:
            raise ValueError(
                f"{self.name}: after subsampling {frames.shape[1]} frames at {fps} fps to {self.target_fps} fps only "
                f"{len(idx)} frame(s) remain; need at least 2"
            )
        sub = frames[:, idx]
        b, p = sub.shape[0], sub.shape[1] - 1
        first = sub[:, :-1].reshape(b * p, *sub.shape[2:])
        second = sub[:, 1:].reshape(b * p, *sub.shape[2:])
        scores = []
        for s in range(0, b * p, self.pair_batch_size):
            flow = self._flow(first[s : s + self.pair_batch_size], second[s : s + self.pair_batch_size])
            scores.append(top_fraction_flow_magnitude(flow, self.top_fraction))
        return torch.cat(scores).reshape(b, p)

    def _score(self, frames, prompts, fps) -> Dict[str, torch.Tensor]:
        scores = self.pair_scores(frames, fps)
        n_sub = scores.shape[1] + 1
        thres = 6.0 * min(frames.shape[-2:]) / 256.0
        count_num = round(4 * n_sub / 16.0)
        moving = ((scores > thres).sum(1) >= count_num).float()
        return {"dynamic_degree": scores.mean(1), "dynamic_degree_vbench": moving}


def vbench_is_static(pair_scores: Sequence[float], num_frames: int, min_side: int) -> bool:
    """VBench ``static_filter`` decision (``vbench/cli/static_filter.py``, docs/rewards_eval.md).

    ``pair_scores``: top-2 % flow magnitudes of the ``num_frames - 1`` consecutive pairs followed by the two
    wrap-around pairs (first->last, last->first). Static iff no more than ``round(2 * T / 16)`` regular pairs exceed
    ``3 * min_side / 256`` and both wrap-around pairs stay at or below ``thres * count_num * 2``.
    """
    thres = 3.0 * min_side / 256.0
    count_num = round(2 * num_frames / 16.0)
    regular, wrap = list(pair_scores[:-2]), list(pair_scores[-2:])
    if sum(1 for s in regular if s > thres) > count_num:
        return False
    return all(s <= thres * count_num * 2 for s in wrap)
