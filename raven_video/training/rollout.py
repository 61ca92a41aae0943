"""Self-rollout and the generator "history" layouts of RAVEN training (``docs/method.md`` §3, Alg. 1 l.1-10, l.19-21).

Two pieces:

* :func:`self_rollout` -- the no-grad, KV-cached, chunk-by-chunk few-step sampling of the current student (Alg. 1
  l.1-10), recording the pre-step noisy input of every chunk at every step (``trajectory[k]``) and the clean
  endpoints. It runs :class:`~raven_video.sampling.sampler.ChunkSampler`, the sampler of ``CausalWanPipeline``, with a
  recording observer, so training rollouts are the inference sampler by construction (tested).
* :func:`generator_prediction` -- the differentiable generator forward of one history mode (Table 2), giving the
  student's ``x0`` prediction for the whole video, which the DMD loss (Alg. 1 l.21-28) then supervises.

History modes (``--history``):

``raven`` (default; Eq. 5, Alg. 1 l.19-20). The training-time test: one differentiable forward over the interleaved
sequence ``[z_1^u, x_1, z_2^u, x_2, ..., z_N^u]`` where ``z_c^u = trajectory[k]_c`` (the rollout's own step-k input)
and ``x_c`` is the rollout's own clean endpoint (t=0, shared RoPE positions, mask of Figure 1(d)). Everything is one
graph, so later-chunk losses back-propagate through attention into the K/V of the clean copies at every layer
(``h_t = H(x_<t)`` without a stop-gradient). The noisy-chunk predictions equal the rollout's (DESIGN invariant 2).

``self_forcing`` (Table 2 "SF"; ``h_t = sg(H(x_<t))``). Chunk by chunk at the same ``u`` on the same step-k inputs,
but the history is a KV cache filled under ``no_grad`` from the *current* forward's detached ``x̂0`` of each previous
chunk (a t=0 cache pass). A chunk's loss reaches only that chunk's own forward; no gradient reaches the history.

``teacher_forcing`` (Table 2 "TF"). The interleaved forward of ``raven`` with ``x_c`` = the *data* latents (ground
truth history) and ``z_c^u`` = the data latents noised to ``u`` with fresh noise (``u = 1000`` is pure noise), i.e.
the standard teacher-forcing input; needs ``--latent_dataset``.

``diffusion_forcing`` (Table 2 "DF"). No clean copies: one block-causal forward over the data latents where every
chunk is noised to its own independently drawn few-step time ``u_c`` (per-frame timesteps); each chunk's
``x̂0 = z_c - sigma_{u_c} v_c``. The history a chunk sees is the *noisy* data of earlier chunks; needs
``--latent_dataset``.

``df_self_rollout`` (Table 2 "DF w/ Self Rollout"). As ``diffusion_forcing`` but the sequence is built from the
self-rollout's endpoints instead of data latents (no real videos needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from diffusers import FlowMatchLCMScheduler

from ..sampling.flow import DEFAULT_SHIFT, DEFAULT_TIMESTEPS, add_noise, scheduler_sigmas, sigma_from_timestep, \
    x0_from_velocity
from ..sampling.sampler import ChunkSampler, TransformerDenoiser, initial_noise

HISTORY_MODES = ("raven", "self_forcing", "teacher_forcing", "diffusion_forcing", "df_self_rollout")
DATA_HISTORY_MODES = ("teacher_forcing", "diffusion_forcing")

__all__ = ["Rollout", "self_rollout", "generator_prediction", "GeneratorForward", "student_prediction", "HISTORY_MODES",
           "DATA_HISTORY_MODES"]


@dataclass
class Rollout:
    """A no-grad self-rollout (Alg. 1 l.1-10).

    Attributes:
        trajectory: ``[K, B, C, F, H, W]`` float32; ``trajectory[k]`` = the pre-step noisy input of every chunk at
            sampling step ``k`` (``trajectory[0]`` = the initial noise).
        endpoints: ``[B, C, F, H, W]`` float32 clean endpoints ``X`` (the video's latents).
        timesteps: the few-step list ``[t_0, ..., t_{K-1}]`` (e.g. ``[1000, 938, 833, 625]``).
    """

    trajectory: torch.Tensor
    endpoints: torch.Tensor
    timesteps: tuple


class _TrajectoryRecorder:
    """The sampler's observer: keeps every chunk's input at every step, then assembles ``[K, B, C, F, H, W]``."""

    def __init__(self, num_steps: int):
        self.steps: list[list[torch.Tensor]] = [[] for _ in range(num_steps)]

    def __call__(self, chunk_index: int, k: int, z: torch.Tensor) -> None:
        self.steps[k].append(z.clone())

    def trajectory(self) -> torch.Tensor:
        return torch.stack([torch.cat(chunks, dim=2) for chunks in self.steps]).float()


@torch.no_grad()
def self_rollout(
    transformer,
    text_embeds: torch.Tensor,
    latent_shape: Sequence[int],
    generator: Optional[torch.Generator] = None,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    guidance_scale: float = 1.0,
    negative_text: Optional[torch.Tensor] = None,
    latents: Optional[torch.Tensor] = None,
    scheduler=None,
) -> Rollout:
    """Streaming self-rollout of the student (Alg. 1 l.1-10), under ``no_grad``, exactly as the pipeline samples.

    Args:
        transformer: the causal student (unwrapped ``CausalWanTransformer3DModel``).
        text_embeds: ``[B, 512, text_dim]`` prompt embeddings.
        latent_shape: ``(B, C, F, H, W)`` of the latent video; ``F`` must fit the chunking.
        generator: draws the initial noise and the fresh noise of every step (as the pipeline does).
        timesteps: the few-step list.
        guidance_scale: student CFG ``neg + w(pos - neg)``; 1 = unguided (default, ``docs/method.md`` §5); >1
            reproduces the reference code's guided rollouts and needs ``negative_text``.
        latents: optional initial noise ``[B, C, F, H, W]`` (else drawn from ``generator``).
        scheduler: the sampler's kernel and sigmas: default ``FlowMatchLCMScheduler(shift=5)`` (the consistency step);
            an :class:`~raven_video.training.euler_maruyama.EulerMaruyamaScheduler` samples CM-GRPO's baseline kernel.
    Returns:
        :class:`Rollout` with the trajectory ``[K, B, C, F, H, W]`` and the endpoints ``[B, C, F, H, W]``.
    """
    shape = tuple(int(s) for s in latent_shape)
    if text_embeds.shape[0] != shape[0]:
        raise ValueError(f"text_embeds has batch {text_embeds.shape[0]} but latent_shape has batch {shape[0]}.")
    if guidance_scale > 1.0 and negative_text is None:
        raise ValueError(f"rollout guidance_scale={guidance_scale} > 1 needs negative_text (the negative prompt).")
    device = text_embeds.device
    scheduler = scheduler or FlowMatchLCMScheduler(shift=DEFAULT_SHIFT)
    kernel = getattr(scheduler, "transition", None)
    sampler = ChunkSampler(TransformerDenoiser(transformer), timesteps, scheduler_sigmas(scheduler, timesteps, device),
                           **({"kernel": kernel} if kernel is not None else {}))
    latents = initial_noise(shape, generator, device) if latents is None else latents.to(device, torch.float32)
    text = text_embeds if guidance_scale <= 1.0 else torch.cat([negative_text, text_embeds])
    text = text.to(transformer.dtype)
    cache = transformer.new_kv_cache(text.shape[0], shape[3], shape[4], max_frames=shape[2], device=device)
    recorder = _TrajectoryRecorder(sampler.num_steps)
    was_training = transformer.training
    transformer.eval()
    try:
        chunks = [c.latents for c in sampler.sample(latents, text, cache, transformer.chunk_sizes(shape[2]),
                                                     generator, guidance_scale, observer=recorder)]
    finally:
        transformer.train(was_training)
    return Rollout(trajectory=recorder.trajectory(), endpoints=torch.cat(chunks, dim=2).float(),
                   timesteps=tuple(int(t) for t in timesteps))


# ---------------------------------------------------------------------------------------------- generator forward
def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, for the equivalence tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _model_dtype(transformer) -> torch.dtype:
    return next(transformer.parameters()).dtype


def _per_chunk_timesteps(sizes, timesteps, batch, generator, device) -> torch.Tensor:
    """Independent few-step time per (sample, chunk), expanded to per-frame ``[B, F]`` (diffusion forcing)."""
    table = torch.tensor(list(timesteps), dtype=torch.float32)
    index = torch.randint(len(table), (batch, len(sizes)), generator=generator)
    per_chunk = table[index]
    return torch.repeat_interleave(per_chunk, torch.tensor(sizes), dim=1).to(device)


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)


def generator_prediction(
    transformer,
    history: str,
    rollout: Rollout,
    step_index: torch.Tensor,
    text: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    data_latents: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable student prediction of one history mode (module docstring; Eq. 5, Alg. 1 l.19-20).

    Args:
        transformer: the causal student (a ``CausalWanTransformer3DModel``; under DDP/FSDP it is called inside
            :class:`GeneratorForward`, the wrapped module).
        history: one of :data:`HISTORY_MODES`.
        rollout: the no-grad self-rollout of this iteration.
        step_index: ``[B]`` long, the few-step index ``k`` per sample (``u = t_k``, shared by the chunks).
        text: ``[B, 512, text_dim]``.
        generator: CPU ``torch.Generator`` for the fresh noise / per-chunk times of the data modes.
        data_latents: ``[B, C, F, H, W]`` real-video latents (``teacher_forcing``, ``diffusion_forcing``).
    Returns:
        ``(x0_pred, timestep)``: ``x0_pred`` ``[B, C, F, H, W]`` float32 with grad; ``timestep`` ``[B]`` (u) or
        ``[B, F]`` (per-frame u of the diffusion-forcing modes), for logging.
    """
    if history not in HISTORY_MODES:
        raise ValueError(f"history={history!r}; choose one of {HISTORY_MODES}.")
    if history in DATA_HISTORY_MODES and data_latents is None:
        raise ValueError(f"history={history!r} builds its history from real-video latents: pass --latent_dataset.")
    dtype = _model_dtype(transformer)
    device = rollout.endpoints.device
    batch = rollout.endpoints.shape[0]
    table = torch.tensor(rollout.timesteps, dtype=torch.float32, device=device)
    u = table[step_index.to(device)]  # [B]
    noisy_k = rollout.trajectory[step_index.to(device), torch.arange(batch, device=device)]  # [B, C, F, H, W]

    if history in ("raven", "teacher_forcing"):
        if history == "raven":
            noisy, clean = noisy_k, rollout.endpoints
        else:
            clean = _wide(data_latents.to(device))
            noisy = add_noise(clean, _noise_like(clean, generator), sigma_from_timestep(u, clean))
        v = transformer.forward_interleaved(noisy.to(dtype), clean.to(dtype), u.float(), text.to(dtype))
        return x0_from_velocity(noisy, _wide(v), sigma_from_timestep(u, noisy)), u

    if history == "self_forcing":
        return _self_forcing_prediction(transformer, noisy_k, u, text.to(dtype)), u

    # diffusion forcing: block-causal forward with independent per-chunk times on noised latents
    source = rollout.endpoints if history == "df_self_rollout" else _wide(data_latents.to(device))
    sizes = transformer.chunk_sizes(source.shape[2])
    frame_t = _per_chunk_timesteps(sizes, rollout.timesteps, batch, generator, device)  # [B, F]
    sigma = sigma_from_timestep(frame_t, source)
    noisy = add_noise(source, _noise_like(source, generator), sigma)
    v = transformer(noisy.to(dtype), frame_t.float(), text.to(dtype), causal=True).sample
    return x0_from_velocity(noisy, _wide(v), sigma), frame_t


def _self_forcing_prediction(model, noisy: torch.Tensor, u: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Chunk-by-chunk prediction with a no-grad KV cache of the detached ``x̂0``. The text K/V are not cached
    (``cache_text=False``): each chunk recomputes them with gradient, and gradient-checkpoint recomputation takes the
    same path as the forward."""
    batch, _, frames, height, width = noisy.shape
    dtype = text.dtype
    cache = model.new_kv_cache(batch, height, width, max_frames=frames, dtype=dtype, device=noisy.device,
                               cache_text=False)
    sizes = model.chunk_sizes(frames)
    sigma = sigma_from_timestep(u, noisy)
    outputs, start = [], 0
    for index, n in enumerate(sizes):
        z = noisy[:, :, start : start + n]
        v = model(z.to(dtype), u.float(), text, kv_cache=cache, frame_offset=start).sample
        x0 = x0_from_velocity(z, _wide(v), sigma)
        outputs.append(x0)
        if index < len(sizes) - 1:
            with torch.no_grad():
                zero = torch.zeros(batch, dtype=dtype, device=noisy.device)
                model(x0.detach().to(dtype), zero, text, kv_cache=cache, frame_offset=start, update_cache=True)
        start += n
    return torch.cat(outputs, dim=2)


class GeneratorForward(torch.nn.Module):
    """The student as the training steps use it: :meth:`forward` is the differentiable generator forward of every
    history mode (what Accelerate ``prepare``s), :meth:`rollout` the no-grad self-rollout.

    DDP only synchronises gradients, and FSDP2 only unshards the root parameters, when the wrapped module is
    *called*; ``forward_interleaved`` and the chunk loop of ``self_forcing`` are not ``forward``. Wrapping the whole
    :func:`generator_prediction` in this module's ``forward`` makes every history mode one wrapped call (one
    forward per backward, as DDP requires). Parameter names gain the prefix ``transformer.``.
    """

    _no_split_modules = ["CausalWanTransformerBlock"]

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, history, trajectory, endpoints, timesteps, step_index, text, generator=None, data_latents=None):
        """:func:`generator_prediction` of a rollout given as tensors (what DDP / FSDP2 hooks see as inputs)."""
        rollout = Rollout(trajectory=trajectory, endpoints=endpoints, timesteps=tuple(timesteps))
        return generator_prediction(self.transformer, history, rollout, step_index, text, generator=generator,
                                    data_latents=data_latents)


    def rollout(self, *args, **kwargs) -> Rollout:
        """:func:`self_rollout` of the wrapped transformer. Under FSDP2 the script registers this method with
        ``torch.distributed.fsdp.register_fsdp_forward_method`` so the rollout runs through the root module's hooks
        (all-gather of the parameters outside the blocks; the blocks stay children of this root)."""
        return self_rollout(self.transformer, *args, **kwargs)


def student_prediction(student_train, history: str, rollout: Rollout, step_index: torch.Tensor, text: torch.Tensor,
                       generator: Optional[torch.Generator] = None, data_latents: Optional[torch.Tensor] = None):
    """Call a :class:`GeneratorForward`, possibly DDP/FSDP-wrapped, on a rollout: :func:`generator_prediction` through
    the wrapper's hooks (gradient sync, parameter all-gather)."""
    return student_train(history, rollout.trajectory, rollout.endpoints, list(rollout.timesteps), step_index, text,
                         generator=generator, data_latents=data_latents)
