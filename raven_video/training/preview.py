"""Distilling a Wan VAE's decoder into a small TAEHV-architecture *preview* decoder (``train_preview_decoder.py``).

The preview decoder (:class:`~raven_video.pipelines.preview_decoder.TAEHVDecoder`) reads the pipeline's normalised
latents and stands in for the VAE's decoder while streaming (``enable_realtime(preview_decoder=...)``), so it is trained
to reproduce what that decoder makes of the same latents:

* latents ``z = (mode(q(z | x)) - latents_mean) / latents_std`` of a clip ``x`` (the frozen VAE's encoder, the latent
  space of the transformer);
* target ``decode(mode(q(z | x)))`` clamped to [-1, 1] (the frozen VAE's decoder: the frames the pipeline would show),
  or the clip ``x`` itself (``target="frames"``);
* loss ``MSE + L1`` between the preview's unclamped output, mapped to [-1, 1], and the target, on every frame after
  the stream's warm-up frames (the same frames :meth:`TAEHVDecoder.decode` returns).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.latents import normalize_latents

__all__ = ["PREVIEW_TARGETS", "PreviewDistillation", "distillation_batch"]

PREVIEW_TARGETS = ("vae", "frames")


@torch.no_grad()
def distillation_batch(vae, video: torch.Tensor, target: str = "vae") -> tuple[torch.Tensor, torch.Tensor]:
    """Clips ``[B, 3, F, H, W]`` in [-1, 1] -> (normalised latents ``[B, C, f, h, w]``, target frames ``[B, 3, F, H,
    W]`` float32 in [-1, 1])."""
    if target not in PREVIEW_TARGETS:
        raise ValueError(f"target={target!r}; choose one of {PREVIEW_TARGETS}.")
    video = video.to(vae.device, vae.dtype)
    z = vae.encode(video).latent_dist.mode()
    goal = vae.decode(z).sample if target == "vae" else video
    return normalize_latents(vae, z.float()), goal.float().clamp(-1, 1)


class PreviewDistillation(nn.Module):
    """The distillation loss of one batch as a module ``forward`` (the unit Accelerate prepares for DDP)."""

    def __init__(self, preview):
        super().__init__()
        self.preview = preview

    def forward(self, latents: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        preview = self.preview
        raw = preview.run_blocks(preview._prepare(latents), [None] * len(preview.decoder))
        out = raw[:, :, preview.frames_to_trim:].float() * 2 - 1
        if out.shape != target.shape:
            raise ValueError(f"the preview decoder makes {tuple(out.shape)} of these latents, the target is "
                             f"{tuple(target.shape)}: its strides must match the VAE's compression.")
        mse = F.mse_loss(out, target)
        loss = mse + F.l1_loss(out, target)
        return loss, {"loss": float(loss.detach()), "mse": float(mse.detach())}
