"""Flow-matching primitives: the one home of every schedule formula (``docs/method.md`` §1, Eq. 1-2).

Rectified-flow ("lerp") schedule with ``T = 1000`` integer timesteps and ``sigma = t / T``::

    x_t = (1 - sigma) x0 + sigma eps          (add_noise)
    v   = eps - x0                            (velocity_target; the network predicts v)
    x0  = x_t - sigma v                       (x0_from_velocity)

The few-step consistency sampler (``docs/method.md`` §1.3) steps ``z_t -> z_s`` by predicting ``x0`` and re-noising
it with fresh noise, ``z_s = (1 - sigma_s) x0 + sigma_s eps'`` (:func:`consistency_step`), i.e. it samples the Gaussian
kernel ``N((1 - sigma_s) x0, sigma_s^2 I)`` that CM-GRPO trains (Eq. 7). Its times are the shifted trailing list
``[1000, 938, 833, 625]`` (:func:`consistency_timesteps`). Classifier-free guidance is ``neg + w (pos - neg)``
(:func:`guidance_combine`).

Pure functions on tensors ``[B, C, F, H, W]``; per-sample values (``sigma``, a timestep) may be floats, ``[B]`` tensors
or tensors already broadcastable against the sample (e.g. ``[B, 1, F, 1, 1]`` per frame).
"""

from __future__ import annotations

from typing import List, Sequence, Union

import numpy as np
import torch

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "DEFAULT_SHIFT",
    "per_sample",
    "shift_sigma",
    "unshift_sigma",
    "consistency_timesteps",
    "DEFAULT_TIMESTEPS",
    "next_timesteps",
    "scheduler_sigmas",
    "sigma_from_timestep",
    "add_noise",
    "velocity_target",
    "x0_from_velocity",
    "consistency_step",
    "euler_step",
    "guidance_combine",
]

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 5.0

Value = Union[float, torch.Tensor]


def per_sample(value: Value, ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A float or a ``[B]`` tensor as a tensor broadcastable against ``ref`` ``[B, ...]`` (``[B, 1, ..., 1]``), in
    ``dtype`` if given; a tensor of more dimensions is returned as it is (already broadcastable, e.g. per frame
    ``[B, 1, F, 1, 1]``)."""
    value = torch.as_tensor(value, dtype=dtype, device=ref.device)
    if value.dim() == 1 and ref.dim() > 1:
        if value.shape[0] != ref.shape[0]:
            raise ValueError(f"per-sample tensor has {value.shape[0]} entries but the batch is {ref.shape[0]}.")
        value = value.view(-1, *([1] * (ref.dim() - 1)))
    return value


# ----------------------------------------------------------------------------------------------------- timesteps
def shift_sigma(tau, shift: float = DEFAULT_SHIFT):
    """Timestep shift ``g(tau) = shift * tau / (1 + (shift - 1) * tau)`` (``docs/method.md`` §1.2).

    Works elementwise on a Python float, a numpy array or a torch tensor; ``g(0) = 0``, ``g(1) = 1``.
    ``shift > 1`` pushes times towards the noisy end (RAVEN uses 5.0 for every sampler).
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift!r}; RAVEN uses shift=5.0.")
    return shift * tau / (1 + (shift - 1) * tau)


def unshift_sigma(sigma, shift: float = DEFAULT_SHIFT):
    """The inverse of :func:`shift_sigma`: ``tau = sigma / (shift - (shift - 1) * sigma)``."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift!r}; RAVEN uses shift=5.0.")
    return sigma / (shift - (shift - 1) * sigma)


def consistency_timesteps(num_steps: int = 4, shift: float = DEFAULT_SHIFT,
                          num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> List[int]:
    """The few-step sampling list (trailing spacing, shifted; ``docs/method.md`` §1.3).

    ``tau = arange(1, 0, -1/num_steps)`` -> :func:`shift_sigma` -> ``* num_train_timesteps`` -> numpy rounding
    (round half to even). Defaults give ``[1000, 938, 833, 625]`` (937.5 rounds to 938).
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r} (RAVEN uses 4).")
    num_steps = int(num_steps)
    tau = np.arange(1.0, 0.0, -1.0 / num_steps, dtype=np.float64)[:num_steps]
    shifted = shift_sigma(tau, shift) * num_train_timesteps
    return [int(t) for t in np.round(shifted).astype(np.int64)]


#: RAVEN's 4-step list, ``consistency_timesteps()`` = ``(1000, 938, 833, 625)``.
DEFAULT_TIMESTEPS = tuple(consistency_timesteps())


def next_timesteps(timesteps: Sequence[int]) -> List[int]:
    """Next time of every step of a sampling list: ``[t_1, ..., t_{K-1}, 0]`` (the last step lands on ``x0``)."""
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
        raise ValueError("timesteps is empty; pass the sampling list, e.g. consistency_timesteps().")
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])) or timesteps[-1] <= 0:
        raise ValueError(f"timesteps must be strictly decreasing and > 0, got {timesteps}.")
    return timesteps[1:] + [0]


def scheduler_sigmas(scheduler, timesteps: Sequence[int], device=None) -> torch.Tensor:
    """The ``K + 1`` sigmas ``[t_0 / T, ..., t_{K-1} / T, 0]`` as diffusers' ``FlowMatchLCMScheduler`` computes them.

    The scheduler applies its ``shift`` to the sigmas it is given, so it gets the unshifted ``s`` with
    ``shift * s / (1 + (shift - 1) s) = t / T``; its float32 sigmas are what ``scheduler.step`` uses (the sampler
    steps with exactly these, draw for draw equal to ``scheduler.step``).
    """
    next_timesteps(timesteps)  # validates the list
    unshifted = [unshift_sigma(float(t) / NUM_TRAIN_TIMESTEPS, scheduler.config.shift) for t in timesteps]
    scheduler.set_timesteps(sigmas=unshifted, device=device)
    scheduler.set_begin_index(0)
    return scheduler.sigmas


def sigma_from_timestep(t: torch.Tensor, like: torch.Tensor | None = None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``sigma = t / T`` (float32 unless ``dtype``). With ``like`` ``[B, C, F, H, W]``: ``t`` ``[B]`` ->
    ``[B, 1, 1, 1, 1]``, per-frame ``t`` ``[B, F]`` -> ``[B, 1, F, 1, 1]``."""
    sigma = t.to(dtype) / NUM_TRAIN_TIMESTEPS
    if like is None:
        return sigma
    if sigma.ndim == 1:
        return sigma.view(-1, *([1] * (like.dim() - 1)))
    return sigma.view(sigma.shape[0], 1, sigma.shape[1], *([1] * (like.dim() - 3)))


# ------------------------------------------------------------------------------------------ the schedule, Eq. 1-2
def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: Value) -> torch.Tensor:
    """``x_t = (1 - sigma) x0 + sigma eps`` (also the consistency re-noise step), in ``x0``'s dtype."""
    sigma = per_sample(sigma, x0).to(x0.dtype)
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target ``v = eps - x0``."""
    return noise - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: Value) -> torch.Tensor:
    """``x0 = x_t - sigma v``."""
    return x_t - per_sample(sigma, x_t).to(x_t.dtype) * v


def consistency_step(velocity: torch.Tensor, sample: torch.Tensor, sigma: Value, sigma_next: Value,
                     noise: torch.Tensor) -> torch.Tensor:
    """One consistency-sampler step in float32: ``x0 = z - sigma v``, ``z' = (1 - sigma') x0 + sigma' eps``; at the
    last step (``sigma' = 0``) ``z' = x0``. ``FlowMatchLCMScheduler.step`` with the noise given (tested)."""
    x0 = x0_from_velocity(sample.to(torch.float32), velocity.float(), sigma)
    return add_noise(x0, noise, sigma_next)


def euler_step(velocity: torch.Tensor, sample: torch.Tensor, sigma: Value, sigma_next: Value,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """One Euler step of the flow ODE ``dz / dsigma = v`` in float32: ``z' = z + (sigma' - sigma) v`` (the teacher's
    PF-ODE sampler; ``noise`` is unused, for the sampler's kernel signature)."""
    step = per_sample(sigma_next, sample).to(torch.float32) - per_sample(sigma, sample).to(torch.float32)
    return sample.to(torch.float32) + step * velocity.float()


def guidance_combine(v_pos: torch.Tensor, v_neg: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in RAVEN's convention ``neg + w (pos - neg)`` (``scale = 1`` returns ``v_pos``).

    Self Forcing writes ``cond + w (cond - uncond)``: its ``real_guidance_scale = w`` is RAVEN's ``w + 1``.
    """
    return v_neg + scale * (v_pos - v_neg)
