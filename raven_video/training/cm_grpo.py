"""CM-GRPO: group advantages and transition-kernel regression losses (Eq. 6-10, Alg. 2 l.14-20).

The policy is the few-step consistency sampler itself (Eq. 6): from ``z_t`` the model predicts
``x0 = z_t - sigma_t v``, and the next state is ``z_s = (1 - sigma_s) x0 + sigma_s eps'``, i.e. the Gaussian
kernel ``pi(z_s | z_t) = N(mu = (1 - sigma_s) x0, sigma_s^2 I)``. The policy gradient
``-A grad log pi(z_s | z_t)`` is obtained as the gradient of a per-element regression
``(x0 - sg(target))^2`` whose target is shifted by half the desired step, so the loss plugs into the same
chunk-weighted reduction as the DMD loss (docs/method.md §3.5).

Tensors are ``[B, C, F, H, W]`` (any ``[B, ...]`` works); per-sample scalars (``sigma``, ``advantage``) are
``[B]`` tensors or floats.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional, Union

import torch
import torch.distributed as dist

from ..sampling.flow import per_sample


__all__ = [
    "prompt_group_id",
    "group_advantages",
    "gather_group_advantages",
    "gaussian_log_prob",
    "consistency_kernel_mean",
    "consistency_kernel_loss",
    "kl_to_reference_loss",
]

Scalar = Union[float, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------
# advantages (Alg. 2 l.14-20)
# ----------------------------------------------------------------------------------------------------------


def prompt_group_id(prompt: str) -> int:
    """Stable 63-bit id of a prompt (first 8 bytes of its UTF-8 SHA-256, shifted right by 1).

    Identical on every process and every run (unlike Python's salted ``hash``), fits in an int64 tensor.
    Rollouts with the same id form one advantage group (Alg. 2 l.14-20: the reference keys groups by prompt).
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}.")
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    clip: Optional[float] = 5.0,
    std_floor: float = 1e-4,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Per-group z-scored advantages (Alg. 2 l.14-20, ``PerPromptStatTracker`` with no history, docs/method.md §5).

    ``A_i = (r_i - mean_g) / (max(std_g, std_floor) + eps)`` with the population std (``unbiased=False``) of
    the group ``g`` of rollout ``i``, then clipped to ``[-clip, clip]`` (``adv_clip_max = 5``). A group whose
    rewards are all equal (or a group of one) gets exactly 0, never NaN.

    Args:
        rewards: float ``[N]``. group_ids: integer ``[N]`` (e.g. ``prompt_group_id`` of each rollout's prompt).
        clip: clip bound; ``None`` disables clipping.
    Returns:
        ``[N]`` in ``rewards``' floating dtype (computed in float64).
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be 1-D of the same length, got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}."
        )
    if group_ids.is_floating_point():
        raise ValueError(f"group_ids must be integers (e.g. prompt_group_id(prompt)), got dtype {group_ids.dtype}.")
    r = rewards.double()
    if not torch.isfinite(r).all():
        raise ValueError(f"rewards contain NaN/Inf: {rewards.tolist()}; check the reward models.")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, inverse, r) / count
    centered = r - mean[inverse]
    var = torch.zeros_like(count).index_add_(0, inverse, centered**2) / count
    std = var.sqrt()
    adv = centered / (std.clamp_min(std_floor)[inverse] + eps)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return adv.to(out_dtype)


def gather_group_advantages(
    local_rewards: torch.Tensor,
    local_group_ids: torch.Tensor,
    clip: Optional[float] = 5.0,
    std_floor: float = 1e-4,
    eps: float = 1e-5,
    process_group=None,
) -> torch.Tensor:
    """Advantages with group statistics over ALL processes (Alg. 2 l.14-20); returns the local slice.

    All-gathers ``(rewards, group_ids)`` from every rank of ``process_group`` (works with gloo and NCCL; the
    local counts may differ), calls ``group_advantages`` on the concatenation in rank order and returns this
    rank's entries. Without an initialised ``torch.distributed`` it equals ``group_advantages``.

    Args:
        local_rewards: float ``[n_local]``. local_group_ids: int ``[n_local]``.
    Returns:
        ``[n_local]`` advantages.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return group_advantages(local_rewards, local_group_ids, clip=clip, std_floor=std_floor, eps=eps)
    if local_rewards.dim() != 1 or local_group_ids.shape != local_rewards.shape:
        raise ValueError(
            f"local_rewards and local_group_ids must be 1-D of equal length, got {tuple(local_rewards.shape)} "
            f"and {tuple(local_group_ids.shape)}."
        )
    world_size = dist.get_world_size(process_group)
    rank = dist.get_rank(process_group)
    device = local_rewards.device
    n_local = torch.tensor([local_rewards.numel()], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(n_local) for _ in range(world_size)]
    dist.all_gather(counts, n_local, group=process_group)
    counts = [int(c.item()) for c in counts]
    max_n = max(counts)

    def gather(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        padded = torch.zeros(max_n, dtype=dtype, device=device)
        padded[: x.numel()] = x.to(dtype)
        out = [torch.zeros_like(padded) for _ in range(world_size)]
        dist.all_gather(out, padded, group=process_group)
        return torch.cat([o[:c] for o, c in zip(out, counts)])

    all_rewards = gather(local_rewards.detach(), torch.float64)
    all_ids = gather(local_group_ids, torch.int64)
    adv = group_advantages(all_rewards, all_ids, clip=clip, std_floor=std_floor, eps=eps)
    start = sum(counts[:rank])
    out_dtype = local_rewards.dtype if local_rewards.is_floating_point() else torch.float32
    return adv[start : start + counts[rank]].to(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# Gaussian kernels and losses (Eq. 6, Eq. 9)
# ----------------------------------------------------------------------------------------------------------


def _f64(value: Scalar, ref: torch.Tensor) -> torch.Tensor:
    return per_sample(value, ref, torch.float64)


def _check_sigma_next(sigma_next: torch.Tensor) -> None:
    if (sigma_next <= 0).any() or (sigma_next >= 1).any():
        raise ValueError(
            f"sigma_next must lie in (0, 1), got {sigma_next.flatten().tolist()}: at sigma_next = 0 the consistency "
            "kernel N((1 - sigma) x0, sigma^2 I) is degenerate and its log-likelihood gradient explodes "
            "(docs/method.md §5). Train only the first K - skip_timesteps transitions (--skip_timesteps >= 1)."
        )


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, std: Scalar) -> torch.Tensor:
    """Exact log-density ``log N(z; mean, std^2 I)`` per sample, summed over all non-batch elements.

    Args:
        z, mean: ``[B, ...]``. std: float, ``[B]`` or broadcastable to ``z``; must be > 0.
    Returns:
        float64 ``[B]`` (differentiable w.r.t. ``mean`` and ``std``).
    """
    z64, mean64 = z.double(), mean.double()
    std64 = _f64(std, z64) if not (torch.is_tensor(std) and std.dim() > 1) else std.double()
    if (std64 <= 0).any():
        raise ValueError("std must be > 0 for a Gaussian log-density (docs/method.md §5: never train sigma_next = 0).")
    log_density = -((z64 - mean64) ** 2) / (2 * std64**2) - torch.log(std64) - 0.5 * math.log(2 * math.pi)
    log_density = log_density.expand_as(z64)
    return log_density.flatten(1).sum(dim=1)


def consistency_kernel_mean(x0_pred: torch.Tensor, sigma_next: Scalar) -> torch.Tensor:
    """Mean ``mu = (1 - sigma_s) x0`` of the consistency kernel (Eq. 6); its std is ``sigma_s``."""
    return (1 - _f64(sigma_next, x0_pred)) * x0_pred.double()


def consistency_kernel_loss(
    x0_pred: torch.Tensor, z_next: torch.Tensor, sigma_next: Scalar, advantage: Scalar
) -> torch.Tensor:
    """CM-GRPO per-element regression of Eq. 9 (float64 map, to be chunk-weighted with alpha = -1).

    ``mu = (1 - sigma_s) sg(x0)``, ``target = sg(x0) + A (1 - sigma_s) / (2 sigma_s^2) (z_s - mu)``,
    ``loss = (x0 - target)^2``. Its gradient w.r.t. ``x0`` is
    ``-A (1 - sigma_s)(z_s - mu) / sigma_s^2 = -A grad_x0 log N(z_s; (1 - sigma_s) x0, sigma_s^2 I)``, so
    gradient descent performs REINFORCE ascent on ``A log pi(z_s | z_t)``.

    Args:
        x0_pred: ``[B, ...]`` ``x0_theta = z_t - sigma_t v_theta`` of the policy forward (carries grad).
        z_next: ``[B, ...]`` the realised next state of the rollout (``trajectory[k + 1]``).
        sigma_next: ``[B]`` or float, ``sigma_s = t_{k+1} / 1000`` in (0, 1).
        advantage: ``[B]`` or float, the (clipped) group advantage of each rollout.
    Returns:
        float64 ``[B, ...]``.
    """
    sigma = _f64(sigma_next, x0_pred)
    _check_sigma_next(sigma)
    adv = _f64(advantage, x0_pred)
    x0 = x0_pred.double()
    x0_sg = x0.detach()
    mu = (1 - sigma) * x0_sg
    target = x0_sg + adv * (1 - sigma) / (2 * sigma**2) * (z_next.detach().double() - mu)
    return (x0 - target) ** 2


def kl_to_reference_loss(x0_pred: torch.Tensor, x0_ref: torch.Tensor, sigma_next: Scalar) -> torch.Tensor:
    """KL regulariser of Eq. 10, float64 per-element map (chunk-weighted, scaled by beta).

    ``mu = (1 - sigma_s) x0``, ``mu_ref = (1 - sigma_s) x0_ref``,
    ``delta_KL = 0.5 (1 - sigma_s)(mu - mu_ref) / sigma_s^2`` (detached), ``loss = (x0 - (sg(x0) - delta_KL))^2``.
    Gradient w.r.t. ``x0``: ``2 delta_KL = grad_x0 KL(N(mu, sigma_s^2 I) || N(mu_ref, sigma_s^2 I))``.

    Args:
        x0_pred: ``[B, ...]`` policy x0 (grad). x0_ref: reference-model x0 at the same input (no grad).
        sigma_next: ``[B]`` or float in (0, 1).
    """
    sigma = _f64(sigma_next, x0_pred)
    _check_sigma_next(sigma)
    x0 = x0_pred.double()
    x0_sg = x0.detach()
    delta = 0.5 * (1 - sigma) * ((1 - sigma) * (x0_sg - x0_ref.detach().double())) / sigma**2
    return (x0 - (x0_sg - delta)) ** 2
