"""Training a Wan video VAE (``AutoencoderKLWan``): the loss, the quality metric and the latent statistics.

The loss is a beta-VAE objective on clips ``x`` ``[B, 3, F, H, W]`` in [-1, 1]:
``L1(x̂, x) + MSE(x̂, x) + kl_weight * KL(q(z | x) || N(0, I))`` (the KL averaged over latent elements), with
``x̂ = decode(z)``, ``z ~ q(z | x)`` (reparameterised). The pipeline works in *normalised* latents
``(z - latents_mean) / latents_std`` (``WanPipeline``'s convention); :func:`latent_statistics` measures those per-channel
statistics over data so a trained VAE can be saved with them in its config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

__all__ = ["vae_loss", "VAEObjective", "psnr", "latent_statistics", "reconstruct", "kaiming_init", "NormWarmup",
           "VAE_INITS"]

VAE_INITS = ("default", "kaiming")


def vae_loss(vae: AutoencoderKLWan, video: torch.Tensor, kl_weight: float = 1e-5,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The VAE objective (module docstring) on ``video`` ``[B, 3, F, H, W]`` in [-1, 1].

    Returns:
        ``(loss, logs)`` with ``l1``, ``mse``, ``kl`` (per latent element) and ``psnr`` (dB, on [0, 1] pixels).
    """
    posterior = vae.encode(video).latent_dist
    z = posterior.sample(generator=generator)
    reconstruction = vae.decode(z).sample.float()
    target = video.float()
    l1 = F.l1_loss(reconstruction, target)
    mse = F.mse_loss(reconstruction, target)
    kl = posterior.kl().float().sum() / z.numel()
    loss = l1 + mse + kl_weight * kl
    logs = {"l1": float(l1.detach()), "mse": float(mse.detach()), "kl": float(kl.detach()),
            "psnr": psnr(reconstruction.detach(), target)}
    return loss, logs


class VAEObjective(torch.nn.Module):
    """:func:`vae_loss` as a module ``forward``, the unit Accelerate prepares (DDP synchronises the gradients of
    module calls, not of ``vae.encode`` / ``vae.decode`` called on the wrapped module). Parameter names gain ``vae.``."""

    def __init__(self, vae: AutoencoderKLWan, kl_weight: float = 1e-5):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, video: torch.Tensor, generator: torch.Generator | None = None):
        return vae_loss(self.vae, video, self.kl_weight, generator)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two videos in [-1, 1] (measured on [0, 1] pixels, clamped)."""
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float().clamp(-1, 1)).item() / 4.0
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


@torch.no_grad()
def reconstruct(vae: AutoencoderKLWan, video: torch.Tensor) -> torch.Tensor:
    """``decode(mode(q(z | x)))`` clamped to [-1, 1]: the deterministic reconstruction the pipeline would see."""
    z = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode()
    return vae.decode(z).sample.float().clamp(-1, 1)


@torch.no_grad()
def latent_statistics(vae: AutoencoderKLWan, videos) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means over ``videos`` (an iterable of ``[B, 3, F, H, W]``): the
    ``latents_mean`` / ``latents_std`` a VAE config carries so the pipeline's latents have unit scale."""
    total, total_sq, count = None, None, 0
    for video in videos:
        z = vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mode().double()
        flat = z.transpose(0, 1).reshape(z.shape[1], -1)  # [C, N]
        total = flat.sum(1) if total is None else total + flat.sum(1)
        total_sq = (flat**2).sum(1) if total_sq is None else total_sq + (flat**2).sum(1)
        count += flat.shape[1]
    if count == 0:
        raise ValueError("latent_statistics needs at least one video.")
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return [float(m) for m in mean], [float(s) for s in std]


# ------------------------------------------------------------------------------------ training from scratch
# A small AutoencoderKLWan trained from PyTorch's default init on frames that are mostly a flat background (the world)
# stalls at the "background only" reconstruction (~18-20 dB): every WanRMS_norm rescales each pixel's features to a
# fixed norm, and while the features are dominated by the (shared) bias directions, the input-dependent part shrinks
# layer after layer, so the latents barely depend on the input (docs/world.md, "Status"). Two remedies that keep the
# architecture, so the exported VAE is a standard AutoencoderKLWan:


@torch.no_grad()
def kaiming_init(vae: AutoencoderKLWan) -> None:
    """Kaiming-normal convolution weights (ReLU gain) and zero biases: input-dependent features start large."""
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


class NormWarmup:
    """Blend every ``WanRMS_norm`` with the identity for the first ``steps`` optimizer steps:
    ``y = (1 - a) * x + a * norm(x)``, ``a = min(1, step / steps)``, through forward hooks (no parameter or state-dict
    change; the hooks are removed once ``a`` reaches 1, so the network ends as the standard architecture)."""

    def __init__(self, vae: AutoencoderKLWan, steps: int):
        self.steps, self.alpha = int(steps), 1.0
        self.handles = [m.register_forward_hook(self._blend) for m in vae.modules() if isinstance(m, WanRMS_norm)] \
            if steps > 0 else []

    def _blend(self, module, inputs, output):
        return torch.lerp(inputs[0].to(output.dtype), output, self.alpha)

    def set_step(self, step: int) -> float:
        """Set the blend for optimizer step ``step`` (0-based); returns ``a``."""
        self.alpha = min(1.0, step / self.steps) if self.steps > 0 else 1.0
        if self.alpha >= 1.0 and self.handles:
            for handle in self.handles:
                handle.remove()
            self.handles = []
        return self.alpha
