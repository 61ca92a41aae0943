"""The timestep draws of training (the schedule itself is :mod:`raven_video.sampling.flow`).

Timesteps are integers ``t`` in ``[0, 1000]``, ``sigma = t / 1000``:

* Alg. 1 l.17: the generator time ``u``, uniform over the few-step list, one per video, shared by its chunks;
* Alg. 1 l.12, l.18: the critic and score times, ``round(1000 (0.02 + 0.96 g(tau)))``, ``tau ~ U(0, 1)``, ``g`` the
  shift (the reference code's distribution; ``docs/method.md`` §5);
* Alg. 2 l.22: the CM-GRPO transition, uniform over the first ``K - skip_timesteps`` steps (skip >= 1: the last
  transition's kernel is a point mass).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..sampling.flow import shift_sigma


__all__ = [
    "sample_score_timesteps",
    "sample_generator_step_index",
    "sample_policy_step_index",
    "check_policy_steps",
]


def sample_score_timesteps(
    batch_size: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
    shift: float = 5.0,
    t_min: float = 0.02,
    t_max: float = 0.98,
    num_train_timesteps: int = 1000,
) -> torch.LongTensor:
    """Score / critic timestep distribution of Alg. 1 l.11-15 (identical for the fake-score loss and the DMD time).

    ``tau ~ U(0, 1)`` in float64 -> ``tau' = shift_sigma(tau)`` -> ``tau'' = t_min + (t_max - t_min) tau'``
    -> ``t = round(num_train_timesteps * tau'')`` (half to even). Defaults give ints in ``[20, 980]``.

    Args:
        batch_size: number of samples ``B`` (one time per sample, shared by all its frames).
        generator: optional CPU ``torch.Generator`` (draws happen on CPU so results are device-independent).
    Returns:
        ``LongTensor[B]`` on ``device``.
    """
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max} (Alg. 1 l.11-15: 0.02, 0.98).")
    tau = torch.rand(batch_size, dtype=torch.float64, generator=generator)
    tau = t_min + (t_max - t_min) * shift_sigma(tau, shift)
    return torch.round(tau * num_train_timesteps).long().to(device)


def sample_generator_step_index(
    batch_size: int,
    num_steps: int = 4,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.LongTensor:
    """Index ``k`` of the generator time ``u = t_k`` for a DMD generator update (Alg. 1 l.17).

    Uniform over all ``num_steps`` sampling steps, one per sample, shared by all chunks of that sample.

    Returns:
        ``LongTensor[B]`` with values in ``[0, num_steps)``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    return torch.randint(0, num_steps, (batch_size,), generator=generator).to(device)


def check_policy_steps(num_steps: int, skip_timesteps: int) -> None:
    """Raise unless ``1 <= skip_timesteps < num_steps`` (Alg. 2 l.22, docs/method.md §5); draws nothing."""
    if skip_timesteps < 1:
        raise ValueError(
            f"skip_timesteps must be >= 1, got {skip_timesteps}: the final consistency transition has "
            "sigma_next = 0, a degenerate (zero-variance) Gaussian kernel whose log-likelihood gradient "
            "explodes (docs/method.md §5). Use --skip_timesteps 1 (the RAVEN default)."
        )
    if skip_timesteps >= num_steps:
        raise ValueError(
            f"skip_timesteps={skip_timesteps} leaves no trainable transition out of num_steps={num_steps}; "
            f"use 1 <= skip_timesteps < {num_steps}."
        )


def sample_policy_step_index(
    batch_size: int,
    num_steps: int = 4,
    generator: Optional[torch.Generator] = None,
    skip_timesteps: int = 1,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.LongTensor:
    """Index ``k`` of the CM-GRPO transition ``z^{t_k} -> z^{t_{k+1}}`` (Alg. 2 l.22).

    Uniform over the first ``num_steps - skip_timesteps`` steps, one per rollout (for 4 steps and skip 1:
    ``k ~ U{0, 1, 2}``). The last transition lands on ``sigma = 0`` where the consistency kernel
    ``N((1 - sigma_s) x0, sigma_s^2 I)`` is a point mass, so ``skip_timesteps`` must be >= 1 (docs/method.md §5).

    Returns:
        ``LongTensor[B]`` with values in ``[0, num_steps - skip_timesteps)``.
    """
    check_policy_steps(num_steps, skip_timesteps)
    return torch.randint(0, num_steps - skip_timesteps, (batch_size,), generator=generator).to(device)
