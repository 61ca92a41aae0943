"""Timestep schedules and samplers of RAVEN and CM-GRPO.

Everything here is pure and model-independent. Timesteps are integers ``t`` in ``[0, 1000]`` and
``sigma = t / 1000`` (spec §1.1: rectified-flow "lerp" schedule, ``x_t = (1 - sigma) x0 + sigma eps``).

References are to ``reference/raven_spec.md``:

* §1.2  timestep shift ``g(tau) = 5 tau / (1 + 4 tau)`` everywhere;
* §1.3  the 4-step consistency list ``[1000, 938, 833, 625]`` (next ``[938, 833, 625, 0]``);
* §3.4  the generator time ``u``: uniform over the few-step list, one per sample;
* §4.2  the score / critic time distribution ``round(1000 (0.02 + 0.96 g(tau)))``, ``tau ~ U(0, 1)``;
* §6.4  the CM-GRPO transition: uniform over the first ``K - skip_timesteps`` steps (§10.9: skip >= 1).
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
    """Score / critic timestep distribution of spec §4.2 (identical for the fake-score loss and the DMD time).

    ``tau ~ U(0, 1)`` in float64 -> ``tau' = shift_sigma(tau)`` -> ``tau'' = t_min + (t_max - t_min) tau'``
    -> ``t = round(num_train_timesteps * tau'')`` (half to even). Defaults give ints in ``[20, 980]``.

    Args:
        batch_size: number of samples ``B`` (one time per sample, shared by all its frames).
        generator: optional CPU ``torch.Generator`` (draws happen on CPU so results are device-independent).
    Returns:
        ``LongTensor[B]`` on ``device``.
    """
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max} (spec §4.2: 0.02, 0.98).")
    tau = torch.rand(batch_size, dtype=torch.float64, generator=generator)
    tau = t_min + (t_max - t_min) * shift_sigma(tau, shift)
    return torch.round(tau * num_train_timesteps).long().to(device)


def sample_generator_step_index(
    batch_size: int,
    num_steps: int = 4,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.LongTensor:
    """Index ``k`` of the generator time ``u = t_k`` for a DMD generator update (spec §3.4).

    Uniform over all ``num_steps`` sampling steps, one per sample, shared by all chunks of that sample.

    Returns:
        ``LongTensor[B]`` with values in ``[0, num_steps)``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    return torch.randint(0, num_steps, (batch_size,), generator=generator).to(device)


def check_policy_steps(num_steps: int, skip_timesteps: int) -> None:
    """Raise unless ``1 <= skip_timesteps < num_steps`` (spec §6.4, §10.9); draws nothing."""
    if skip_timesteps < 1:
        raise ValueError(
            f"skip_timesteps must be >= 1, got {skip_timesteps}: the final consistency transition has "
            "sigma_next = 0, a degenerate (zero-variance) Gaussian kernel whose log-likelihood gradient "
            "explodes (spec §10.9). Use --skip_timesteps 1 (the RAVEN default)."
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
    """Index ``k`` of the CM-GRPO transition ``z^{t_k} -> z^{t_{k+1}}`` (spec §6.4).

    Uniform over the first ``num_steps - skip_timesteps`` steps, one per rollout (for 4 steps and skip 1:
    ``k ~ U{0, 1, 2}``). The last transition lands on ``sigma = 0`` where the consistency kernel
    ``N((1 - sigma_s) x0, sigma_s^2 I)`` is a point mass, so ``skip_timesteps`` must be >= 1 (spec §10.9).

    Returns:
        ``LongTensor[B]`` with values in ``[0, num_steps - skip_timesteps)``.
    """
    check_policy_steps(num_steps, skip_timesteps)
    return torch.randint(0, num_steps - skip_timesteps, (batch_size,), generator=generator).to(device)
