"""One CM-GRPO step (Alg. 2) on a LoRA policy, split into small testable functions.

    group rollouts (no grad, trajectory kept)  ->  VAE decode  ->  rewards  ->  group advantages (all ranks)
        ->  one random transition per rollout  ->  transition-kernel regression (micro-batched)  ->  AdamW  ->  EMA

* :func:`lora_config` / :data:`DEFAULT_LORA_TARGET_MODULES`  docs/method.md §4.1: r = alpha = 256 on the 16 module types.
* :class:`EulerMaruyamaScheduler`  Flow-GRPO's SDE sampler as a drop-in scheduler, so the baseline policy's rollouts
  are sampled *with the kernel whose likelihood is trained* (on-kernel policy gradient).
* :func:`group_rollouts`   Alg. 2 l.1-13: ``group_size`` rollouts of one prompt in calls of ``groups_per_infer``.
* ``decode_videos`` (``pipelines/vae_streaming.py``) endpoints -> ``[B, F, 3, H, W]`` in [-1, 1] (what the rewards take).
* :func:`policy_loss`      Alg. 2 l.22; Eq. 9: interleaved forward at ``t_k``, kernel regression, chunk weighting, optional
  KL to the reference (the base model with the adapters disabled, Eq. 10).
* :func:`cm_grpo_step`     the whole step; returns a flat dict of logs.

All randomness of a step comes from one CPU ``torch.Generator`` seeded per step and rank by the caller, so a resumed run
replays the same draws (exact continuation).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from diffusers import FlowMatchLCMScheduler

from ..pipelines.vae_streaming import decode_videos
from .chunk_weighting import chunk_weighted_loss, per_chunk_means
from ..sampling.flow import DEFAULT_SHIFT, DEFAULT_TIMESTEPS, sigma_from_timestep
from .cm_grpo import consistency_kernel_loss, gather_group_advantages, kl_to_reference_loss, prompt_group_id
from .euler_maruyama import EulerMaruyamaScheduler, euler_maruyama_kernel_loss, euler_maruyama_kl_loss
from .raven_step import optimizer_step
from .rollout import GeneratorForward, Rollout, generator_prediction, self_rollout, student_prediction
from .timesteps import check_policy_steps, sample_policy_step_index


__all__ = [
    "DEFAULT_LORA_TARGET_MODULES",
    "POLICY_KERNELS",
    "CMGRPOConfig",
    "CMGRPOState",
    "lora_config",
    "lora_parameter_names",
    "group_rollouts",
    "policy_loss",
    "adapters_disabled_reference",
    "rollout_scheduler",
    "cm_grpo_step",
]

#: docs/method.md §4.1 LoRA targets in diffusers names: ``text_embedding.0/.2, time_embedding.0/.2,
#: time_projection.1, self_attn.{q,k,v,o}, cross_attn.{q,k,v,o}, ffn.0, ffn.2, head.head`` (16 module types).
DEFAULT_LORA_TARGET_MODULES = (
    "condition_embedder.text_embedder.linear_1",
    "condition_embedder.text_embedder.linear_2",
    "condition_embedder.time_embedder.linear_1",
    "condition_embedder.time_embedder.linear_2",
    "condition_embedder.time_proj",
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
    "proj_out",
)
POLICY_KERNELS = ("consistency", "euler_maruyama")


def lora_config(rank: int = 256, alpha: float = 256.0, target_modules: Sequence[str] = DEFAULT_LORA_TARGET_MODULES,
                dropout: float = 0.0):
    """peft ``LoraConfig`` of docs/method.md §4.1: PEFT defaults (B = 0 init, so the policy starts exactly at the base model)."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank {rank} must be >= 1 (CM-GRPO: 256).")
    if not alpha > 0:
        raise ValueError(f"lora_alpha {alpha} must be > 0 (CM-GRPO: 256, i.e. scale 1).")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True,
                      target_modules=list(target_modules))


def lora_parameter_names(model: torch.nn.Module) -> List[str]:
    """Names of the trainable LoRA parameters (``...lora_A.default.weight`` / ``lora_B``)."""
    return [n for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


@dataclass
class CMGRPOConfig:
    """Hyper-parameters of one step (defaults: the reference code's recipe, unguided rollouts; docs/method.md §5)."""

    timesteps: tuple = DEFAULT_TIMESTEPS
    group_size: int = 4  # rollouts of the prompt on this process (Alg. 2 l.1-13)
    groups_per_infer: int = 4  # rollouts per inference call
    policy_kernel: str = "consistency"
    noise_level: float = 0.7  # Euler-Maruyama kernel only (Flow-GRPO default)
    skip_timesteps: int = 1  # Alg. 2 l.22, docs/method.md §5
    chunk_weighting: str = "-1"  # docs/method.md §3.5, alpha = -1 on policy (and KL) losses
    policy_loss_scaling: float = 100.0
    beta: float = 0.0  # KL weight (Eq. 10); 0 in the paper recipe
    adv_clip_max: float = 5.0
    slices_per_step: int = 2  # rollouts per forward/backward (micro-batch)
    rollout_guidance_scale: float = 1.0
    max_grad_norm: Optional[float] = 1000.0
    world_size: int = 1
    fps: float = 16.0

    def __post_init__(self):
        if self.policy_kernel not in POLICY_KERNELS:
            raise ValueError(f"policy_kernel={self.policy_kernel!r}; choose one of {POLICY_KERNELS}.")
        if self.group_size < 1 or self.groups_per_infer < 1 or self.slices_per_step < 1:
            raise ValueError(f"group_size={self.group_size}, groups_per_infer={self.groups_per_infer} and "
                             f"slices_per_step={self.slices_per_step} must all be >= 1.")
        if self.policy_kernel == "euler_maruyama" and not self.noise_level > 0:
            raise ValueError(f"noise_level={self.noise_level}: the Euler-Maruyama policy needs noise_level > 0 "
                             "(Flow-GRPO: 0.7), else its kernel is deterministic and has no likelihood.")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta} must be >= 0.")
        # the trained transitions k < K - skip_timesteps must have sigma_next > 0 (docs/method.md §5)
        check_policy_steps(len(self.timesteps), self.skip_timesteps)


def rollout_scheduler(config: CMGRPOConfig):
    """The sampler of the policy: consistency (Eq. 6) or Euler-Maruyama (Flow-GRPO baseline)."""
    if config.policy_kernel == "euler_maruyama":
        return EulerMaruyamaScheduler(shift=DEFAULT_SHIFT, noise_level=config.noise_level)
    return FlowMatchLCMScheduler(shift=DEFAULT_SHIFT)


# ---------------------------------------------------------------------------------------------- rollouts
@torch.no_grad()
def group_rollouts(transformer, text: torch.Tensor, latent_shape, config: CMGRPOConfig, generator: torch.Generator,
                   negative_text: Optional[torch.Tensor] = None) -> Rollout:
    """``group_size`` rollouts of one prompt (independent noise), ``groups_per_infer`` per call (Alg. 2 l.1-13).

    Args:
        text: ``[1, L, D]`` (or ``[group_size, L, D]``) embeddings of the prompt; negative_text likewise.
        latent_shape: ``(C, F, H, W)`` of one video.
    Returns:
        :class:`Rollout` with ``trajectory [K, group_size, C, F, H, W]``, ``endpoints [group_size, C, F, H, W]``.
    """
    device = text.device
    parts = []
    done = 0
    while done < config.group_size:
        n = min(config.groups_per_infer, config.group_size - done)
        noise = torch.randn((n, *latent_shape), generator=generator, dtype=torch.float32).to(device)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        step_generator = torch.Generator(device=device).manual_seed(seed)
        neg = negative_text[:1].expand(n, -1, -1) if negative_text is not None else None
        parts.append(self_rollout(
            transformer, text[:1].expand(n, -1, -1), (n, *latent_shape), generator=step_generator,
            timesteps=config.timesteps, guidance_scale=config.rollout_guidance_scale, negative_text=neg, latents=noise,
            scheduler=rollout_scheduler(config),
        ))
        done += n
    return Rollout(trajectory=torch.cat([p.trajectory for p in parts], dim=1),
                   endpoints=torch.cat([p.endpoints for p in parts]), timesteps=parts[0].timesteps)


# ---------------------------------------------------------------------------------------------- policy loss
def _sigmas(timesteps, k: torch.Tensor, device):
    """``(sigma_t, sigma_s)`` of the transitions ``t_k -> t_{k+1}`` (``t_K = 0``), float64 ``[b]``."""
    table = sigma_from_timestep(torch.tensor([*timesteps, 0], device=device), dtype=torch.float64)
    k = k.to(device)
    return table[k], table[k + 1]


def policy_loss(
    policy,
    rollout: Rollout,
    step_index: torch.Tensor,
    text: torch.Tensor,
    advantages: torch.Tensor,
    config: CMGRPOConfig,
    frames_per_chunk,
    reference: Optional[Callable] = None,
) -> tuple:
    """Transition-kernel regression of Eq. 9 for a slice of rollouts (Alg. 2 l.21-31).

    The interleaved forward on ``[trajectory[k]_c, X_c, ...]`` at ``t_k`` (no CFG) gives ``x̂0``; the realised next
    state is ``trajectory[k + 1]``; the per-element loss has gradient ``-A grad_x0 log pi(z_s | z_t)`` for the
    chosen kernel; chunk-weighted (docs/method.md §3.5) and scaled by ``policy_loss_scaling``. With ``beta > 0`` the KL to the
    reference consistency model (``reference(rollout, k, text) -> x0_ref``, under no_grad) is added, same weighting.

    Args:
        policy: the (possibly DDP-wrapped) :class:`GeneratorForward`.
        rollout: the slice's trajectory ``[K, b, C, F, H, W]`` and endpoints ``[b, C, F, H, W]``.
        step_index: ``[b]`` long, ``k`` per rollout (``k < K - skip_timesteps``).
        text: ``[b, L, D]``. advantages: ``[b]`` clipped group advantages.
    Returns:
        ``(loss, logs)``: scalar (float64, with grad) and a dict of floats.
    """
    device = rollout.endpoints.device
    batch = rollout.endpoints.shape[0]
    x0_pred, _ = student_prediction(policy, "raven", rollout, step_index, text)
    rows = torch.arange(batch, device=device)
    k = step_index.to(device)
    z_t = rollout.trajectory[k, rows]
    z_next = rollout.trajectory[k + 1, rows]
    sigma_t, sigma_s = _sigmas(rollout.timesteps, k, device)
    adv = advantages.to(device, torch.float64)
    if config.policy_kernel == "consistency":
        per_element = consistency_kernel_loss(x0_pred, z_next, sigma_s, adv)
    else:
        per_element = euler_maruyama_kernel_loss(x0_pred, z_t, z_next, sigma_t, sigma_s, adv,
                                                 noise_level=config.noise_level)
    loss_policy = chunk_weighted_loss(per_element, frames_per_chunk, config.chunk_weighting, world_size=config.world_size)
    loss = config.policy_loss_scaling * loss_policy
    logs = {"policy_loss": float(loss_policy.detach()), "x0_abs_mean": float(x0_pred.detach().abs().mean())}
    for c, value in enumerate(per_chunk_means(per_element.detach(), frames_per_chunk).tolist()):
        logs[f"policy_loss_chunk_{c}"] = value
    if config.beta > 0:
        if reference is None:
            raise ValueError("beta > 0 needs a reference model (reference=...).")
        with torch.no_grad():
            x0_ref = reference(rollout, step_index, text)
        if config.policy_kernel == "consistency":
            kl_element = kl_to_reference_loss(x0_pred, x0_ref, sigma_s)
        else:
            kl_element = euler_maruyama_kl_loss(x0_pred, x0_ref, z_t, sigma_t, sigma_s, config.noise_level)
        loss_kl = chunk_weighted_loss(kl_element, frames_per_chunk, config.chunk_weighting,
                                      world_size=config.world_size)
        loss = loss + config.beta * loss_kl
        logs["kl_loss"] = float(loss_kl.detach())
        logs["kl_x0_mse"] = float(((x0_pred.detach().double() - x0_ref.double()) ** 2).mean())
    return loss, logs


def adapters_disabled_reference(transformer) -> Callable:
    """The reference consistency model of Eq. 10 = the base model: the same module with its LoRA adapters
    disabled (peft), so no second copy of the weights is kept."""

    def reference(rollout: Rollout, step_index: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        transformer.disable_adapters()
        try:
            x0_ref, _ = generator_prediction(transformer, "raven", rollout, step_index, text)
        finally:
            transformer.enable_adapters()
        return x0_ref.detach()

    return reference


# ---------------------------------------------------------------------------------------------- the step
@dataclass
class CMGRPOState:
    """What one step touches. ``policy`` is the :class:`GeneratorForward` around the LoRA transformer (rollouts,
    EMA, reference); ``policy_train`` is what the loss calls: the same module as Accelerate prepared it (DDP-wrapped,
    or itself on one process)."""

    policy: GeneratorForward
    policy_train: torch.nn.Module
    vae: torch.nn.Module
    composer: object  # RewardComposer
    optimizer: torch.optim.Optimizer
    ema: object = None
    backward: Callable = None  # accelerator.backward
    clip_fn: Callable = None  # accelerator.clip_grad_norm_
    autocast: Callable = contextlib.nullcontext  # accelerator.autocast
    no_sync: Callable = None  # accelerator.no_sync (skip DDP all-reduce on all but the last micro-batch)
    reference: Optional[Callable] = None
    process_group: object = None  # for the advantage all-gather (None = the default group)


def cm_grpo_step(
    state: CMGRPOState,
    prompt: str,
    text: torch.Tensor,
    negative_text: Optional[torch.Tensor],
    latent_shape,
    config: CMGRPOConfig,
    generator: torch.Generator,
    rewards_hook: Optional[Callable] = None,
) -> dict:
    """One CM-GRPO step on this process (Alg. 2). ``text``: ``[1, L, D]`` of ``prompt``; ``latent_shape``:
    ``(C, F, H, W)``. Returns a flat dict: per-field reward means ``reward_<field>``, ``reward_total``, advantages,
    losses, ``grad_norm``, ``skipped``, and ``time_{rollout,decode,reward,policy}`` in seconds."""
    logs: dict = {}
    device = text.device
    transformer = state.policy.transformer
    frames_per_chunk = transformer.chunk_sizes(int(latent_shape[1]))

    # 1. group rollouts with the trajectory (no grad, eval mode), unguided by default (docs/method.md §5)
    tic = time.perf_counter()
    with state.autocast():
        rollout = group_rollouts(transformer, text, latent_shape, config, generator, negative_text)
    logs["time_rollout"] = time.perf_counter() - tic

    # 2. decode + rewards; rank-local aggregation over this prompt's rollouts (Alg. 2 l.14-20), then per-prompt advantages
    #    over every process (all-gather), clipped
    tic = time.perf_counter()
    videos = decode_videos(state.vae, rollout.endpoints, batch_size=config.groups_per_infer)
    logs["time_decode"] = time.perf_counter() - tic
    tic = time.perf_counter()
    prompts = [prompt] * config.group_size
    scores = state.composer(videos, prompts, fps=config.fps, group_ids=[0] * config.group_size)
    if rewards_hook is not None:
        rewards_hook(videos, scores)
    logs["time_reward"] = time.perf_counter() - tic
    for field, value in scores.items():
        logs[f"reward_{field}"] = float(torch.as_tensor(value).double().mean())
    total = torch.as_tensor(scores["total"]).double().to(device)
    ids = torch.full((config.group_size,), prompt_group_id(prompt), dtype=torch.int64, device=device)
    advantages = gather_group_advantages(total, ids, clip=config.adv_clip_max, process_group=state.process_group)
    logs["advantage_abs_mean"] = float(advantages.abs().mean())

    # 3. one transition per rollout (k < K - skip), slices in random order, micro-batches of slices_per_step
    tic = time.perf_counter()
    k = sample_policy_step_index(config.group_size, len(rollout.timesteps), generator=generator,
                                 skip_timesteps=config.skip_timesteps)
    order = torch.randperm(config.group_size, generator=generator)
    state.policy_train.train()
    batches = order.split(config.slices_per_step)
    accumulated: dict = {}
    for i, idx in enumerate(batches):
        idx_d = idx.to(device)
        piece = Rollout(trajectory=rollout.trajectory[:, idx_d], endpoints=rollout.endpoints[idx_d],
                        timesteps=rollout.timesteps)
        sync = contextlib.nullcontext() if (state.no_sync is None or i == len(batches) - 1) else \
            state.no_sync(state.policy_train)
        with sync:
            with state.autocast():
                loss, step_logs = policy_loss(
                    state.policy_train, piece, k[idx], text[:1].expand(len(idx), -1, -1), advantages[idx_d],
                    config, frames_per_chunk, reference=state.reference,
                )
            (state.backward or torch.Tensor.backward)(loss * (len(idx) / config.group_size))
        for key, value in step_logs.items():
            accumulated[key] = accumulated.get(key, 0.0) + value * len(idx) / config.group_size
    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    grad_norm, skipped = optimizer_step(params, state.optimizer, config.max_grad_norm, state.clip_fn)
    if state.ema is not None and not skipped:
        state.ema.update(transformer)
    logs.update(accumulated, grad_norm=grad_norm, skipped=float(skipped), time_policy=time.perf_counter() - tic,
                step_index_mean=float(k.float().mean()))
    if not math.isfinite(logs["policy_loss"]):
        logs["skipped"] = 1.0
    return logs
