"""Imaging quality: MUSIQ (SPAQ) from pyiqa, VBench ``longer`` preprocessing
(docs/rewards_eval.md ``iq_IMG``).

Per video ``[F, 3, H, W]`` uint8, all frames:

1. if ``max(H, W) > 512``: resize to ``(int(s * H), int(s * W))`` with ``s = 512 / max(H, W)`` (bilinear,
   ``antialias=False``; 480x832 -> 295x512), ``/ 255``,
2. pyiqa ``MUSIQ`` in eval mode (maps to [-1, 1] and extracts multi-scale patches itself: long side 224, 384, native),
3. MOS (about 0-100) ``/ 100``, mean over frames -> ``imaging`` (about 0.5-0.75).

pyiqa is PolyForm-Noncommercial: we depend on it, never vendor it. Weights: ``musiq_spaq_ckpt-358bb6af.pth``
(a plain state dict, optional ``params`` / ``module.``), loaded ``strict=True``.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from ._torchvision_compat import import_torchvision
from .base import VideoReward, resolve_checkpoint, torch_load

__all__ = ["ImagingQualityReward", "build_musiq", "vbench_longer_resize"]


def vbench_longer_resize(frames: torch.Tensor, max_side: int = 512) -> torch.Tensor:
    """VBench imaging ``longer`` mode: uint8 ``[N, 3, H, W]`` -> float ``[N, 3, h, w]`` in [0, 1]."""
    tv = import_torchvision()
    h, w = frames.shape[-2:]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        frames = tv.transforms.functional.resize(frames, [int(scale * h), int(scale * w)], antialias=False)
    return frames.float() / 255.0


def build_musiq(checkpoint: Optional[str] = None, allow_pickle: bool = False) -> torch.nn.Module:
    """pyiqa MUSIQ with a 1-d (SPAQ) head: random, or loaded ``strict=True`` from a local file."""
    import_torchvision()
    try:
        from pyiqa.archs.musiq_arch import MUSIQ
    except ImportError as e:
        raise ImportError(
            "ImagingQualityReward needs pyiqa: `pip install --no-deps 'pyiqa==0.1.16'` plus its runtime deps "
            "(see .ci/install_rewards.sh)."
        ) from e
    model = MUSIQ(num_class=1, pretrained=False)
    if checkpoint is not None:
        sd = torch_load(checkpoint, allow_pickle=allow_pickle)
        if isinstance(sd, dict) and "params" in sd and isinstance(sd["params"], dict):
            sd = sd["params"]
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        model.load_state_dict(sd, strict=True)
    model.eval()
    model.training = False  # pyiqa's MUSIQ only preprocesses (x2-1, multi-scale patches) when not training
    return model.requires_grad_(False)


class ImagingQualityReward(VideoReward):
    """MUSIQ imaging quality (field ``imaging``).

    Args:
        checkpoint: ``musiq_spaq_ckpt-358bb6af.pth`` (local / folder / ``"owner/repo/file"``).
        random_init: random MUSIQ (tests, benchmarks).
        model: an already built pyiqa MUSIQ.
        device, dtype: RAVEN runs MUSIQ in bf16; VBench in fp32.
        allow_pickle: consent to unpickle a checkpoint that ``torch.load(weights_only=True)`` refuses (it runs code
            stored in the file: trusted files only; see :func:`~raven_video.rewards.base.torch_load`).
        frame_batch_size: frames per MUSIQ forward.
        max_side: VBench ``longer`` resize target (512).
    """

    name = "imaging"
    fields = ("imaging",)
    min_frames = 1

    def __init__(
        self,
        checkpoint: Optional[str] = None,
        *,
        random_init: bool = False,
        model: Optional[torch.nn.Module] = None,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
        frame_batch_size: int = 16,
        max_side: int = 512,
    ):
        super().__init__(device, dtype, allow_pickle)
        self._set_weights(checkpoint, random_init, model, "musiq_spaq_ckpt-358bb6af.pth | 'owner/repo/file'")
        self.frame_batch_size = int(frame_batch_size)
        self.max_side = int(max_side)

    def _build(self) -> None:
        path = None
        if self.checkpoint is not None:
            path = str(resolve_checkpoint(self.checkpoint, "musiq_spaq_ckpt-358bb6af.pth", self.name))
        self.model = build_musiq(path, allow_pickle=self.allow_pickle).to(self.device, self.dtype)
        self.model.training = False

    def _score(self, frames, prompts, fps) -> Dict[str, torch.Tensor]:
        b, f = frames.shape[:2]
        flat = frames.reshape(b * f, *frames.shape[2:])
        out = []
        for s in range(0, flat.shape[0], self.frame_batch_size):
            x = vbench_longer_resize(flat[s : s + self.frame_batch_size], self.max_side).to(self.dtype)
            out.append(self.model(x).float().reshape(-1))
        return {"imaging": (torch.cat(out) / 100.0).reshape(b, f).mean(1)}
