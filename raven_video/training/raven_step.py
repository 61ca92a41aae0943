"""One RAVEN / DMD iteration (Alg. 1), split into small testable functions.

    rollout (no grad)  ->  critic step (every iteration)  ->  generator step (every ``ttur`` iterations)  ->  EMA

* :func:`critic_loss`      Alg. 1 l.11-15: flow matching of the fake score on re-noised rollout endpoints.
* :func:`generator_loss`   Alg. 1 l.16-28: DMD gradient ``(f - r) / norm`` on the student's ``x̂0`` of the chosen
  history mode, teacher CFG ``neg + w (pos - neg)``, score time ``s`` independent of ``u``, chunk-weighted.
* :func:`optimizer_step`   grad clip, non-finite gradient -> skip (docs/method.md §5).
* :func:`raven_iteration`  the whole iteration; returns a flat dict of logs.

All randomness of an iteration comes from one CPU ``torch.Generator`` (seeded per iteration and rank by the caller,
like the reference's per-iteration ``RandomState(seed + iter * world_size + rank)``, Alg. 1), so a resumed run replays
the same draws.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .chunk_weighting import chunk_weighted_loss, per_chunk_means
from ..sampling.flow import DEFAULT_TIMESTEPS, add_noise, guidance_combine, sigma_from_timestep, x0_from_velocity
from .dmd import dmd_normalizer, dmd_per_element_surrogate, flow_matching_critic_loss
from .rollout import HISTORY_MODES, GeneratorForward, Rollout, student_prediction
from .timesteps import sample_generator_step_index, sample_score_timesteps


# Alg. 1 l.23: "slow motion, time dilation, 高帧率，" + Wan2.1's standard Chinese negative prompt.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
RAVEN_NEGATIVE_PROMPT = "slow motion, time dilation, 高帧率，" + WAN_NEGATIVE_PROMPT

__all__ = [
    "RavenConfig", "RAVEN_NEGATIVE_PROMPT", "critic_loss", "generator_loss", "optimizer_step", "raven_iteration",
    "is_generator_step",
]


@dataclass
class RavenConfig:
    """Hyper-parameters of one iteration (defaults: the reference code's recipe, docs/method.md §5)."""

    timesteps: tuple = DEFAULT_TIMESTEPS
    guidance_scale: float = 3.0  # teacher CFG, neg + w(pos - neg)  (Alg. 1 l.16-25, docs/method.md §5)
    rollout_guidance_scale: float = 1.0  # student CFG in the rollout (docs/method.md §5; 3.0 reproduces the reference code)
    ttur: int = 2  # generator update when (iteration + 1) % ttur == 0  (Alg. 1)
    chunk_weighting: str = "-1"  # docs/method.md §3.5
    history: str = "raven"
    dmd_loss_type: str = "dmd"
    max_grad_norm: Optional[float] = 1000.0  # the reference default (docs/method.md §5)
    world_size: int = 1

    def __post_init__(self):
        if self.history not in HISTORY_MODES:
            raise ValueError(f"history={self.history!r}; choose one of {HISTORY_MODES}.")
        if self.ttur < 1:
            raise ValueError(f"ttur={self.ttur} must be >= 1 (RAVEN: 2).")


def is_generator_step(iteration: int, ttur: int) -> bool:
    """Alg. 1: the generator is updated when ``(iteration + 1) % ttur == 0`` (0-based iteration)."""
    return (iteration + 1) % ttur == 0


def _randn(shape, generator, device) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def critic_loss(critic, endpoints: torch.Tensor, text: torch.Tensor, generator, frames_per_chunk) -> tuple:
    """Fake-score loss of Alg. 1 l.11-15: ``mean || v_phi(x_t, t_f, c) - (eps - X) ||^2``.

    Args:
        critic: the bidirectional fake score (trainable).
        endpoints: ``[B, C, F, H, W]`` rollout endpoints ``X`` (constants).
        text: ``[B, 512, text_dim]`` positive prompt embeddings (the critic is trained conditionally only).
        generator: CPU generator for ``t_f`` (score distribution of Alg. 1 l.11-15) and ``eps``.
    Returns:
        ``(loss, logs)``; ``logs`` has ``critic_t`` and the unweighted per-chunk losses ``critic_loss_chunk_<c>``.
    """
    batch = endpoints.shape[0]
    t_f = sample_score_timesteps(batch, generator=generator).to(endpoints.device)
    noise = _randn(endpoints.shape, generator, endpoints.device)
    x_t = add_noise(endpoints, noise, sigma_from_timestep(t_f))
    v = critic(x_t.to(_dtype(critic)), t_f.float(), text.to(_dtype(critic))).sample
    loss = flow_matching_critic_loss(v, noise, endpoints)
    per_element = (v.detach().float() - (noise - endpoints)) ** 2
    logs = {"critic_t": float(t_f.float().mean())}
    for c, value in enumerate(per_chunk_means(per_element, frames_per_chunk).tolist()):
        logs[f"critic_loss_chunk_{c}"] = value
    return loss, logs


@torch.no_grad()
def _x0_predictions(critic, teacher, z_s, s, text, negative_text, guidance_scale) -> tuple:
    """``f`` = critic x0 at ``(z_s, s)``; ``r`` = teacher x0 with CFG ``neg + w (pos - neg)`` (one merged batch)."""
    sigma = sigma_from_timestep(s, z_s)
    v_fake = critic(z_s.to(_dtype(critic)), s.float(), text.to(_dtype(critic))).sample.float()
    t_dtype = _dtype(teacher)
    if guidance_scale != 1.0:
        batch_in = torch.cat([z_s, z_s]).to(t_dtype)
        v_neg, v_pos = teacher(batch_in, torch.cat([s, s]).float(),
                               torch.cat([negative_text, text]).to(t_dtype)).sample.float().chunk(2)
        v_real = guidance_combine(v_pos, v_neg, guidance_scale)
    else:
        v_real = teacher(z_s.to(t_dtype), s.float(), text.to(t_dtype)).sample.float()
    return x0_from_velocity(z_s, v_fake, sigma), x0_from_velocity(z_s, v_real, sigma)


def generator_loss(
    student_train,
    critic,
    teacher,
    rollout: Rollout,
    text: torch.Tensor,
    negative_text: Optional[torch.Tensor],
    config: RavenConfig,
    generator,
    frames_per_chunk,
    data_latents: Optional[torch.Tensor] = None,
) -> tuple:
    """DMD generator loss of Alg. 1 l.16-25 for ``config.history``.

    ``k ~ U{0..K-1}`` per sample (``u = t_k`` shared by the chunks, Alg. 1 l.17); ``x̂0`` from :func:`generator_prediction`;
    ``s`` from the score distribution, independent of ``u`` (docs/method.md §5); ``z_s = (1 - sigma_s) sg(x̂0) + sigma_s eps'``;
    per-element surrogate whose gradient w.r.t. ``x̂0`` is ``(f - r)/norm`` (norm per sample over the whole video,
    docs/method.md §5), reduced with the chunk weighting (docs/method.md §3.5).

    Returns:
        ``(loss, logs)``: float64 scalar with grad; logs ``dmd_loss``, ``dmd_loss_chunk_<c>``, ``dmd_norm``, ``u``, ``s``.
    """
    batch = rollout.endpoints.shape[0]
    device = rollout.endpoints.device
    k = sample_generator_step_index(batch, num_steps=len(rollout.timesteps), generator=generator)
    x0_pred, u = student_prediction(student_train, config.history, rollout, k, text, generator=generator,
                                    data_latents=data_latents)
    s = sample_score_timesteps(batch, generator=generator).to(device)
    z_s = add_noise(x0_pred.detach(), _randn(x0_pred.shape, generator, device), sigma_from_timestep(s))
    fake_x0, real_x0 = _x0_predictions(critic, teacher, z_s, s, text, negative_text, config.guidance_scale)
    per_element = dmd_per_element_surrogate(x0_pred, fake_x0, real_x0, loss_type=config.dmd_loss_type)
    loss = chunk_weighted_loss(per_element, frames_per_chunk, config.chunk_weighting, world_size=config.world_size)
    logs = {
        "dmd_loss": float(loss.detach()),
        "dmd_norm": float(dmd_normalizer(x0_pred, real_x0).mean()),
        "u": float(u.float().mean()),
        "s": float(s.float().mean()),
    }
    for c, value in enumerate(per_chunk_means(per_element, frames_per_chunk).tolist()):
        logs[f"dmd_loss_chunk_{c}"] = value
    return loss, logs


def optimizer_step(parameters, optimizer, max_grad_norm: Optional[float], clip_fn: Optional[Callable] = None) -> tuple:
    """Clip, then step unless the gradient norm is non-finite (docs/method.md §5: NaN/Inf grad norm -> skip the step).

    Args:
        clip_fn: ``accelerator.clip_grad_norm_`` (handles DDP/FSDP/mixed precision); default ``torch.nn.utils``.
    Returns:
        ``(grad_norm: float, skipped: bool)``; gradients are zeroed in both cases.
    """
    parameters = [p for p in parameters if p.grad is not None]
    clip = clip_fn or torch.nn.utils.clip_grad_norm_
    max_norm = float("inf") if max_grad_norm is None or max_grad_norm <= 0 else max_grad_norm
    grad_norm = clip(parameters, max_norm) if parameters else 0.0
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor norm
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


@dataclass
class TrainState:
    """What one iteration touches. ``student`` is the :class:`GeneratorForward` around the causal transformer
    (rollout, EMA); ``student_train`` is what the generator step calls: the same module as Accelerate prepared it
    (DDP-wrapped, FSDP2-sharded, or itself on one process); ``critic_train`` likewise for the critic."""

    student: GeneratorForward
    student_train: torch.nn.Module
    critic_train: torch.nn.Module
    teacher: torch.nn.Module
    student_optimizer: torch.optim.Optimizer
    critic_optimizer: torch.optim.Optimizer
    ema: object = None
    backward: Callable = None  # accelerator.backward
    clip_fn: Callable = None  # accelerator.clip_grad_norm_
    autocast: Callable = contextlib.nullcontext  # accelerator.autocast


def _backward(state: TrainState, loss: torch.Tensor) -> None:
    (state.backward or torch.Tensor.backward)(loss)


def raven_iteration(
    state: TrainState,
    iteration: int,
    text: torch.Tensor,
    negative_text: Optional[torch.Tensor],
    latent_shape,
    config: RavenConfig,
    generator: torch.Generator,
    data_latents: Optional[torch.Tensor] = None,
) -> dict:
    """One iteration of Alg. 1. Returns a flat dict of floats (losses per chunk, grad norms, the DMD
    normaliser, ``time_rollout/critic/generator`` in seconds, ``skipped_*`` flags)."""
    logs: dict = {}
    device = text.device
    frames_per_chunk = state.student.transformer.chunk_sizes(int(latent_shape[2]))

    # 1. rollout (no grad), student CFG per --rollout_guidance_scale (docs/method.md §5)
    tic = time.perf_counter()
    noise = _randn(latent_shape, generator, device)
    with state.autocast():
        rollout = _rollout(state, text, negative_text, latent_shape, config, generator, noise)
    logs["time_rollout"] = time.perf_counter() - tic

    # 2. critic step, every iteration (Alg. 1 l.11-15)
    tic = time.perf_counter()
    state.critic_train.train()
    with state.autocast():
        loss_c, critic_logs = critic_loss(state.critic_train, rollout.endpoints, text, generator, frames_per_chunk)
    _backward(state, loss_c)
    grad_norm, skipped = optimizer_step(
        [p for g in state.critic_optimizer.param_groups for p in g["params"]], state.critic_optimizer,
        config.max_grad_norm, state.clip_fn,
    )
    logs.update(critic_logs, critic_loss=float(loss_c.detach()), grad_norm_critic=grad_norm,
                skipped_critic=float(skipped), time_critic=time.perf_counter() - tic)

    # 3. generator step every `ttur` iterations, critic frozen (its predictions are under no_grad)
    if is_generator_step(iteration, config.ttur):
        tic = time.perf_counter()
        state.student_train.train()
        with state.autocast():
            loss_g, gen_logs = generator_loss(
                state.student_train, state.critic_train, state.teacher, rollout, text, negative_text, config,
                generator, frames_per_chunk, data_latents=data_latents,
            )
        _backward(state, loss_g)
        grad_norm, skipped = optimizer_step(
            [p for g in state.student_optimizer.param_groups for p in g["params"]], state.student_optimizer,
            config.max_grad_norm, state.clip_fn,
        )
        if state.ema is not None and not skipped:
            state.ema.update(state.student.transformer)
        logs.update(gen_logs, grad_norm_generator=grad_norm, skipped_generator=float(skipped),
                    time_generator=time.perf_counter() - tic)
    return logs


def _rollout(state, text, negative_text, latent_shape, config, generator, noise) -> Rollout:
    """The rollout draws its step noise from a generator forked off the iteration generator (reproducible)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    step_generator = torch.Generator(device=noise.device).manual_seed(seed)
    return state.student.rollout(text, latent_shape, generator=step_generator, timesteps=config.timesteps,
                                 guidance_scale=config.rollout_guidance_scale, negative_text=negative_text,
                                 latents=noise)
