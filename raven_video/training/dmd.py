"""Distribution-matching (DMD) losses of the RAVEN stage (Alg. 1 l.11-28, docs/method.md §5).

Pure tensor functions; the models, the interleaved forward and the chunk weighting live elsewhere.
Schedule conventions (docs/method.md §1): ``x_t = (1 - sigma) x0 + sigma eps``, velocity target ``v = eps - x0``,
``x0 = x_t - sigma v``. Tensors are ``[B, C, F, H, W]`` latents; per-sample scalars are ``[B]``.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from ..sampling.flow import per_sample, velocity_target


__all__ = [
    "flow_matching_critic_loss",
    "dmd_normalizer",
    "dmd_per_element_surrogate",
    "DMD_LOSS_TYPES",
]

DMD_LOSS_TYPES = ("dmd", "sim", "sid")


def flow_matching_critic_loss(v_pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Fake-score (critic) loss of Alg. 1 l.11-15: ``mean || v_pred - (eps - x0) ||^2`` over all elements.

    Args:
        v_pred: ``[B, C, F, H, W]`` critic velocity at ``x_t = (1 - sigma) x0 + sigma eps``.
        noise: ``eps``, same shape. x0: the rollout endpoints, same shape (no gradient needed).
    Returns:
        scalar in at least float32 (float64 inputs stay float64); no chunk weighting for the critic.
    """
    dtype = torch.promote_types(v_pred.dtype, torch.float32)
    target = velocity_target(noise.to(dtype), x0.to(dtype)).detach()
    return F.mse_loss(v_pred.to(dtype), target)


def dmd_normalizer(x0_pred: torch.Tensor, real_x0: torch.Tensor, min_value: float = 1e-5) -> torch.Tensor:
    """Per-sample DMD normaliser of Alg. 1 l.25: ``max(mean |x0_pred - real_x0|, 1e-5)``.

    The mean runs over ALL non-batch elements of the sample (the whole video, not per chunk: docs/method.md §5).

    Returns:
        detached float64 ``[B]``.
    """
    diff = (x0_pred.detach().double() - real_x0.detach().double()).abs()
    return diff.flatten(1).mean(dim=1).clamp_min(min_value)


def dmd_per_element_surrogate(
    x0_pred: torch.Tensor,
    fake_x0: torch.Tensor,
    real_x0: torch.Tensor,
    loss_type: str = "dmd",
    sim_c: float = 1e-3,
    sid_alpha: float = 1.0,
    min_norm: float = 1e-5,
) -> torch.Tensor:
    """Per-element generator surrogate of Alg. 1 l.25, float64, to be chunk-weighted (docs/method.md §3.5).

    Only its gradient w.r.t. ``x0_pred`` matters (``fake_x0 = f`` and ``real_x0 = r`` are constants):

    * ``"dmd"``: ``l = (r - f)(f - x0) / norm``, ``norm = dmd_normalizer(x0, r)`` per sample;
      ``dl/dx0 = (f - r) / norm`` -- the DMD gradient (same as ``0.5 ||x0 - sg(x0 - (f - r)/norm)||^2``).
    * ``"sim"``: ``l = (r - f)(f - x0) / sqrt(||r - f||^2 + c^2)`` with ``||.||`` over the whole sample and
      ``c = sim_c`` (pseudo-Huber score-implicit matching); ``dl/dx0 = (f - r) / sqrt(||r - f||^2 + c^2)``.
    * ``"sid"``: ``l = (r - f)((r - x0) - alpha (r - f)) / norm``; ``dl/dx0 = (f - r) / norm`` as well
      (the value differs, which matters only for logging).

    Args:
        x0_pred: ``[B, ...]`` generator prediction ``x0_theta`` (carries the gradient).
        fake_x0: critic x0-prediction at ``z_s`` (``f``), same shape.
        real_x0: teacher CFG x0-prediction at ``z_s`` (``r``), same shape.
    Returns:
        float64 ``[B, ...]`` map; reduce it with ``chunk_weighted_loss``.
    """
    if loss_type not in DMD_LOSS_TYPES:
        raise ValueError(f"unknown dmd loss_type {loss_type!r}; choose one of {DMD_LOSS_TYPES} (RAVEN: 'dmd').")
    if not (x0_pred.shape == fake_x0.shape == real_x0.shape):
        raise ValueError(
            f"shape mismatch: x0_pred {tuple(x0_pred.shape)}, fake_x0 {tuple(fake_x0.shape)}, "
            f"real_x0 {tuple(real_x0.shape)}."
        )
    x0 = x0_pred.double()
    f = fake_x0.detach().double()
    r = real_x0.detach().double()
    if loss_type == "sim":
        norm = torch.sqrt(((r - f) ** 2).flatten(1).sum(dim=1) + sim_c**2)
        return (r - f) * (f - x0) / per_sample(norm, x0)
    norm = per_sample(dmd_normalizer(x0, r, min_norm), x0)
    if loss_type == "dmd":
        return (r - f) * (f - x0) / norm
    return (r - f) * ((r - x0) - sid_alpha * (r - f)) / norm
