"""The Euler-Maruyama baseline kernel of Flow-GRPO (``docs/method.md`` §4.4, Table 4): one home for its step, its
log-likelihood gradient, its KL and the scheduler that samples it.

Flow-GRPO turns the deterministic flow ODE into an SDE with the same marginals and samples it with Euler-Maruyama.
One step ``sigma_t -> sigma_s`` (``dt = sigma_s - sigma_t < 0``) is the Gaussian kernel::

    g^2  = a^2 sigma_t / (1 - sigma_t')          (a = noise_level; sigma_t' = sigma_t except at sigma_t = 1, below)
    mean = c_z z_t + c_v v,   c_z = 1 + g^2 dt / (2 sigma_t),   c_v = (1 + g^2 (1 - sigma_t) / (2 sigma_t)) dt
    std  = g sqrt(-dt)

At ``sigma_t = 1`` the term ``1 - sigma_t`` vanishes; Flow-GRPO (``sde_step_with_logprob``) substitutes the scheduler's
second sigma, i.e. the next sigma ``sigma_s`` of a trailing schedule's first step (or ``sigma_max`` if given). RAVEN's
``EulerMaruyamaSampler`` is the same kernel on this ``noise_level`` scale but substitutes its own ``sigma_max`` (1.0,
then clamps ``1 - sigma`` to 1e-6); we follow Flow-GRPO. ``noise_level = 0`` is the deterministic Euler step
``z_t + v dt``. With ``v = (z_t - x0) / sigma_t`` the policy is parameterised by ``x0`` like the consistency kernel, so
both train through the same interleaved forward (:func:`~raven_video.training.cm_grpo_step.policy_loss`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from diffusers import FlowMatchLCMScheduler
from diffusers.schedulers.scheduling_flow_match_lcm import FlowMatchLCMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ..sampling.flow import per_sample, x0_from_velocity
from .cm_grpo import Scalar, gaussian_log_prob

__all__ = [
    "euler_maruyama_step_mean_std",
    "euler_maruyama_log_prob",
    "euler_maruyama_kernel_loss",
    "euler_maruyama_kl_loss",
    "EulerMaruyamaScheduler",
]


def _coefficients(sigma_t: Scalar, sigma_s: Scalar, ref: torch.Tensor, noise_level: float,
                  sigma_max: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c_z, c_v, std)`` of the kernel (module docstring), float64, broadcastable against ``ref`` ``[B, ...]``."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level} (Flow-GRPO default 0.7).")
    st = per_sample(sigma_t, ref, torch.float64)
    ss = per_sample(sigma_s, ref, torch.float64)
    if (st <= 0).any() or (st > 1).any() or (ss < 0).any() or (ss >= st).any():
        raise ValueError(
            f"need 0 <= sigma_s < sigma_t <= 1, got sigma_t={torch.as_tensor(sigma_t).tolist()}, "
            f"sigma_s={torch.as_tensor(sigma_s).tolist()}."
        )
    dt = ss - st
    substitute = ss if sigma_max is None else torch.full_like(st, float(sigma_max))
    g2 = noise_level**2 * st / (1 - torch.where(st >= 1, substitute, st))
    c_z = 1 + g2 / (2 * st) * dt
    c_v = (1 + g2 * (1 - st) / (2 * st)) * dt
    return c_z, c_v, torch.sqrt(g2 * -dt)


def euler_maruyama_step_mean_std(
    z_t: torch.Tensor,
    v_pred: torch.Tensor,
    sigma_t: Scalar,
    sigma_s: Scalar,
    noise_level: float = 0.7,
    sigma_max: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of one Euler-Maruyama step (module docstring), computed in float64.

    Args:
        z_t, v_pred: ``[B, ...]``. sigma_t, sigma_s: float or ``[B]`` with ``0 <= sigma_s < sigma_t <= 1``.
    Returns:
        ``(mean [B, ...], std [B])``.
    """
    z = z_t.double()
    c_z, c_v, std = _coefficients(sigma_t, sigma_s, z, noise_level, sigma_max)
    mean = z * c_z + v_pred.double() * c_v
    return mean, std.expand(z.shape[0], *([1] * (z.dim() - 1))).reshape(z.shape[0])


def euler_maruyama_log_prob(z_next: torch.Tensor, z_t: torch.Tensor, v_pred: torch.Tensor, sigma_t: Scalar,
                            sigma_s: Scalar, noise_level: float = 0.7) -> torch.Tensor:
    """``log pi(z_next | z_t)`` of the kernel per sample (float64 ``[B]``)."""
    return gaussian_log_prob(z_next, *euler_maruyama_step_mean_std(z_t, v_pred, sigma_t, sigma_s, noise_level))


def euler_maruyama_kernel_loss(
    x0_pred: torch.Tensor,
    z_t: torch.Tensor,
    z_next: torch.Tensor,
    sigma_t: Scalar,
    sigma_next: Scalar,
    advantage: Scalar,
    noise_level: float = 0.7,
    sigma_max: Optional[float] = None,
) -> torch.Tensor:
    """Per-element regression whose gradient w.r.t. ``x0`` is ``-A grad_x0 log pi(z_next | z_t)`` (as
    :func:`~raven_video.training.cm_grpo.consistency_kernel_loss` does for the consistency kernel).

    ``v = (z_t - x0) / sigma_t`` gives ``d mean / d x0 = -c_v / sigma_t``, so
    ``grad_x0 log pi = -(c_v / sigma_t)(z_next - mean) / std^2``; with ``target = sg(x0) + A grad_x0 log pi / 2``,
    ``(x0 - target)^2`` has exactly that gradient.

    Args:
        x0_pred: ``[B, ...]`` policy x0 (grad). z_t: the step input. z_next: the realised EM sample.
        sigma_t, sigma_next, advantage: float or ``[B]``.
    Returns:
        float64 ``[B, ...]``.
    """
    x0_sg = x0_pred.detach().double()
    z = z_t.detach().double()
    c_z, c_v, std = _coefficients(sigma_t, sigma_next, z, noise_level, sigma_max)
    st = per_sample(sigma_t, z, torch.float64)
    if (std <= 0).any():
        raise ValueError("the EM kernel std is 0 (noise_level = 0?): no log-likelihood to train; use noise_level > 0.")
    mean = z * c_z + (z - x0_sg) / st * c_v
    grad_log_prob = -(c_v / st) * (z_next.detach().double() - mean) / std**2
    target = x0_sg + 0.5 * per_sample(advantage, z, torch.float64) * grad_log_prob
    return (x0_pred.double() - target) ** 2


def euler_maruyama_kl_loss(x0_pred: torch.Tensor, x0_ref: torch.Tensor, z_t: torch.Tensor, sigma_t: Scalar,
                           sigma_s: Scalar, noise_level: float) -> torch.Tensor:
    """KL to the reference model's kernel as a per-element regression (``docs/method.md`` Eq. 10 for this kernel).

    The two kernels share ``std``; ``mean - mean_ref = -(c_v / sigma_t)(x0 - x0_ref)``, so
    ``grad_x0 KL = (c_v / sigma_t)^2 (x0 - x0_ref) / std^2`` and ``target = sg(x0) - grad / 2``.
    """
    x0 = x0_pred.double()
    _, c_v, std = _coefficients(sigma_t, sigma_s, x0, noise_level)
    coef = c_v / per_sample(sigma_t, x0, torch.float64)
    grad = coef**2 * (x0.detach() - x0_ref.detach().double()) / std**2
    return (x0 - (x0.detach() - 0.5 * grad)) ** 2


class EulerMaruyamaScheduler(FlowMatchLCMScheduler):
    """Flow-GRPO's SDE step on the few-step list, for on-kernel baseline rollouts.

    ``z_s = mean + std * eps`` with the kernel above, except the final step ``s = 0``, which is the deterministic
    ``x0 = z_t - sigma_t v`` (the consistency sampler's last step): that transition is never trained
    (``skip_timesteps >= 1``) and a noisy endpoint would be a noisy video. Same timesteps and shift as
    ``FlowMatchLCMScheduler``; :meth:`transition` is the step the chunk sampler uses
    (:class:`~raven_video.sampling.sampler.ChunkSampler`'s ``kernel``).
    """

    def __init__(self, *args, noise_level: float = 0.7, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_level = float(noise_level)

    def transition(self, velocity, sample, sigma, sigma_next, noise) -> torch.Tensor:
        """``z_s = mean + std * noise`` for standard-normal ``noise`` (``x0 = z - sigma v`` when ``sigma_next = 0``)."""
        # the few-step sigmas are t / 1000 for integer t; round away float32 noise (a sigma of 1 - 6e-8 instead of 1
        # would skip the sigma_t = 1 substitution and blow the noise up)
        sigma, sigma_next = round(float(sigma), 6), round(float(sigma_next), 6)
        sample = sample.to(torch.float32)
        if sigma_next <= 0.0:
            return x0_from_velocity(sample, velocity.float(), sigma)
        mean, std = euler_maruyama_step_mean_std(sample, velocity, sigma, sigma_next, self.noise_level)
        return (mean + std.view(-1, *([1] * (sample.dim() - 1))) * noise.double()).float()

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        if self.step_index is None:
            self._init_step_index(timestep)
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev_sample = self.transition(model_output, sample, self.sigmas[self.step_index],
                                      self.sigmas[self.step_index + 1], noise)
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchLCMSchedulerOutput(prev_sample=prev_sample)
