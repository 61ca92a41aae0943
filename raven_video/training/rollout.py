"""Self-rollout and the generator "history" layouts of RAVEN training (spec §3, §4.3, Appendix B.1-B.2).

Two pieces:

* :func:`self_rollout` -- the no-grad, KV-cached, chunk-by-chunk 4-step consistency sampling of the current student
  (Appendix B.1), recording the pre-step noisy input of every chunk at every step (``trajectory[k]``) and the clean
  endpoints. It *drives* :meth:`CausalWanPipeline.stream` (``output_type="latent"``, ``return_trajectory=True``,
  ``prompt_embeds=...``), so training rollouts are the inference sampler by construction (tested).
* :func:`generator_prediction` -- the differentiable generator forward of one history mode (paper Table 2), giving the
  student's ``x0`` prediction for the whole video, which the DMD loss (spec §4.3) then supervises.

History modes (``--history``):

``raven`` (default; spec §3, B.2 step 3a). The training-time test: one differentiable forward over the interleaved
sequence ``[z_1^u, x_1, z_2^u, x_2, ..., z_N^u]`` where ``z_c^u = trajectory[k]_c`` (the rollout's own step-k input)
and ``x_c`` is the rollout's own clean endpoint (t=0, shared RoPE positions, mask of §3.2). Everything is one graph, so
later-chunk losses back-propagate through attention into the K/V of the clean copies at every layer ("downstream
chunk losses supervise history", §3.5). The noisy-chunk predictions equal the rollout's (DESIGN invariant 2).

``self_forcing`` (spec §3.5 "contrast"; the reference ablation ``CausalWan2_1_T2V_SF``). Chunk by chunk at the same
``u`` on the same step-k inputs, but the history is a KV cache filled under ``no_grad`` from the *current* forward's
detached ``x̂0`` of each previous chunk (a t=0 cache pass). A chunk's loss reaches only that chunk's own forward; no
gradient reaches the history.

``teacher_forcing`` (paper Table 2, "TF"). The interleaved forward of ``raven`` with ``x_c`` = the *data* latents
(ground truth history) and ``z_c^u`` = the data latents noised to ``u`` with fresh noise (``u = 1000`` is pure noise),
i.e. the standard teacher-forcing input; needs ``--latent_dataset``.

``diffusion_forcing`` (paper Table 2, "DF"). No clean copies: one block-causal forward over the data latents where
every chunk is noised to its own independently drawn few-step time ``u_c`` (per-frame timesteps); each chunk's
``x̂0 = z_c - sigma_{u_c} v_c``. The history a chunk sees is the *noisy* data of earlier chunks; needs
``--latent_dataset``.

``df_self_rollout``. As ``diffusion_forcing`` but the sequence is built from the self-rollout's endpoints instead of
data latents (no real videos needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..pipelines.pipeline_causal_wan import DEFAULT_DENOISING_TIMESTEPS


HISTORY_MODES = ("raven", "self_forcing", "teacher_forcing", "diffusion_forcing", "df_self_rollout")
DATA_HISTORY_MODES = ("teacher_forcing", "diffusion_forcing")

__all__ = ["Rollout", "self_rollout", "generator_prediction", "GeneratorForward", "HISTORY_MODES", "DATA_HISTORY_MODES"]


@dataclass
class Rollout:
    """A no-grad self-rollout (Appendix B.2 step 1).

    Attributes:
        trajectory: ``[K, B, C, F, H, W]`` float32; ``trajectory[k]`` = the pre-step noisy input of every chunk at
            sampling step ``k`` (``trajectory[0]`` = the initial noise).
        endpoints: ``[B, C, F, H, W]`` float32 clean endpoints ``X`` (the video's latents).
        timesteps: the few-step list ``[t_0, ..., t_{K-1}]`` (e.g. ``[1000, 938, 833, 625]``).
    """

    trajectory: torch.Tensor
    endpoints: torch.Tensor
    timesteps: tuple


def _sampling_pipeline(transformer, timesteps, scheduler=None):
    """A component-less :class:`CausalWanPipeline` (no text encoder / VAE) around ``transformer``."""
    from diffusers import FlowMatchLCMScheduler

    from ..pipelines.pipeline_causal_wan import CausalWanPipeline

    pipe = CausalWanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler or FlowMatchLCMScheduler(shift=5.0),
        transformer=transformer, denoising_timesteps=list(timesteps),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sampler_step(scheduler):
    """A non-consistency sampler (CM-GRPO's Euler-Maruyama baseline) as the pipeline's ``sampler_step`` hook."""
    if not hasattr(scheduler, "transition"):
        return None

    def step(velocity, sample, k, noise):
        return scheduler.transition(velocity, sample, scheduler.sigmas[k], scheduler.sigmas[k + 1], noise)

    return step


@torch.no_grad()
def self_rollout(
    transformer,
    text_embeds: torch.Tensor,
    latent_shape: Sequence[int],
    generator: Optional[torch.Generator] = None,
    timesteps: Sequence[int] = DEFAULT_DENOISING_TIMESTEPS,
    guidance_scale: float = 1.0,
    negative_text: Optional[torch.Tensor] = None,
    latents: Optional[torch.Tensor] = None,
    scheduler=None,
) -> Rollout:
    """Streaming self-rollout of the student (spec Appendix B.1; B.2 step 1), under ``no_grad``.

    Args:
        transformer: the causal student (unwrapped ``CausalWanTransformer3DModel``).
        text_embeds: ``[B, 512, text_dim]`` prompt embeddings.
        latent_shape: ``(B, C, F, H, W)`` of the latent video; ``F`` must fit the chunking.
        generator: draws the initial noise and the fresh noise of every consistency step (as the pipeline does).
        timesteps: the few-step list (spec §1.3).
        guidance_scale: student CFG ``neg + w(pos - neg)``; 1 = unguided (default, spec §10.1); >1 reproduces the
            reference's guided rollouts and needs ``negative_text``.
        latents: optional initial noise ``[B, C, F, H, W]`` (else drawn from ``generator``).
        scheduler: the sampler step (default ``FlowMatchLCMScheduler(shift=5)``, the consistency sampler of §1.4);
            CM-GRPO's Euler-Maruyama baseline passes its SDE scheduler so rollouts sample the trained kernel.
    Returns:
        :class:`Rollout` with the trajectory ``[K, B, C, F, H, W]`` and the endpoints ``[B, C, F, H, W]``.
    """
    batch, channels, frames, height, width = (int(s) for s in latent_shape)
    if text_embeds.shape[0] != batch:
        raise ValueError(f"text_embeds has batch {text_embeds.shape[0]} but latent_shape has batch {batch}.")
    if guidance_scale > 1.0 and negative_text is None:
        raise ValueError(f"rollout guidance_scale={guidance_scale} > 1 needs negative_text (the negative prompt).")
    was_training = transformer.training
    transformer.eval()
    pipe = _sampling_pipeline(transformer, timesteps, scheduler)
    try:
        chunks = list(
            pipe.stream(
                prompt_embeds=text_embeds,
                negative_prompt_embeds=negative_text if guidance_scale > 1.0 else None,
                num_frames=pipe.vae_scale_factor_temporal * (frames - 1) + 1,
                height=height * pipe.vae_scale_factor_spatial,
                width=width * pipe.vae_scale_factor_spatial,
                guidance_scale=guidance_scale,
                generator=generator,
                latents=latents,
                output_type="latent",
                return_trajectory=True,
                sampler_step=_sampler_step(scheduler),
            )
        )
    finally:
        transformer.train(was_training)
    endpoints = torch.cat([c.latents for c in chunks], dim=2).float()
    steps = len(chunks[0].trajectory)
    trajectory = torch.stack([torch.cat([c.trajectory[k] for c in chunks], dim=2) for k in range(steps)]).float()
    if endpoints.shape[1] != channels:
        raise ValueError(f"rollout produced {endpoints.shape[1]} channels, latent_shape says {channels}.")
    return Rollout(trajectory=trajectory, endpoints=endpoints, timesteps=tuple(int(t) for t in timesteps))


# ---------------------------------------------------------------------------------------------- generator forward
def _sigma(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t / 1000`` broadcast against ``ref`` ``[B, C, F, H, W]``: ``t`` is ``[B]`` or ``[B, F]``."""
    sigma = t.to(torch.float32) / 1000.0
    if sigma.ndim == 1:
        return sigma.view(-1, 1, 1, 1, 1)
    return sigma.view(sigma.shape[0], 1, sigma.shape[1], 1, 1)


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
    unwrapped=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable student prediction of one history mode (module docstring; spec §3, B.2 step 3a).

    Args:
        transformer: the student as called for training (possibly DDP/FSDP-wrapped; ``forward_interleaved`` and
            KV-cache calls go through ``unwrapped``).
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
    model = unwrapped if unwrapped is not None else transformer
    if history not in HISTORY_MODES:
        raise ValueError(f"history={history!r}; choose one of {HISTORY_MODES}.")
    if history in DATA_HISTORY_MODES and data_latents is None:
        raise ValueError(f"history={history!r} builds its history from real-video latents: pass --latent_dataset.")
    dtype = _model_dtype(model)
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
            noisy = (1 - _sigma(u, clean)) * clean + _sigma(u, clean) * _noise_like(clean, generator)
        v = model.forward_interleaved(noisy.to(dtype), clean.to(dtype), u.float(), text.to(dtype))
        return noisy - _sigma(u, noisy) * _wide(v), u

    if history == "self_forcing":
        return _self_forcing_prediction(model, noisy_k, u, text.to(dtype)), u

    # diffusion forcing: block-causal forward with independent per-chunk times on noised latents
    source = rollout.endpoints if history == "df_self_rollout" else _wide(data_latents.to(device))
    sizes = model.chunk_sizes(source.shape[2])
    frame_t = _per_chunk_timesteps(sizes, rollout.timesteps, batch, generator, device)  # [B, F]
    sigma = _sigma(frame_t, source)
    noisy = (1 - sigma) * source + sigma * _noise_like(source, generator)
    v = transformer(noisy.to(dtype), frame_t.float(), text.to(dtype), causal=True).sample
    return noisy - sigma * _wide(v), frame_t


def _self_forcing_prediction(model, noisy: torch.Tensor, u: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Chunk-by-chunk prediction with a no-grad KV cache of the detached ``x̂0`` (spec §3.5 contrast)."""
    batch, _, frames, height, width = noisy.shape
    dtype = text.dtype
    cache = _text_free(model.new_kv_cache(batch, height, width, max_frames=frames, dtype=dtype, device=noisy.device))
    sizes = model.chunk_sizes(frames)
    sigma = _sigma(u, noisy)
    outputs, start = [], 0
    for index, n in enumerate(sizes):
        z = noisy[:, :, start : start + n]
        v = model(z.to(dtype), u.float(), text, kv_cache=cache, frame_offset=start).sample
        x0 = z - sigma * _wide(v)
        outputs.append(x0)
        if index < len(sizes) - 1:
            with torch.no_grad():
                zero = torch.zeros(batch, dtype=dtype, device=noisy.device)
                model(x0.detach().to(dtype), zero, text, kv_cache=cache, frame_offset=start, update_cache=True)
        start += n
    return torch.cat(outputs, dim=2)


def _text_free(cache):
    """Make a KV cache never hold the text K/V, so each chunk's forward recomputes them *with* gradient.

    The streaming cache stores detached text K/V after its first call, which would (a) cut the text-projection
    gradients of every later chunk and (b) make gradient-checkpoint recomputation (run after all chunks) take a
    different path than the forward. The self-attention history K/V stay cached (and detached) as intended.
    """
    base = type(cache)

    class TextFreeCache(base):
        @property
        def has_text(self) -> bool:
            return False

        def layer(self, index, plan):
            layer = base.layer(self, index, plan)
            layer.set_text = lambda key, value: None
            return layer

    cache.reset_text()
    cache.__class__ = TextFreeCache
    return cache


class GeneratorForward(torch.nn.Module):
    """The student's differentiable generator forward as a module ``forward`` (what Accelerate should ``prepare``).

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
        rollout = Rollout(trajectory=trajectory, endpoints=endpoints, timesteps=tuple(timesteps))
        return generator_prediction(self.transformer, history, rollout, step_index, text, generator=generator,
                                    data_latents=data_latents)

    def rollout(self, *args, **kwargs) -> Rollout:
        """:func:`self_rollout` of the wrapped transformer. Under FSDP2 the script registers this method with
        ``torch.distributed.fsdp.register_fsdp_forward_method`` so the rollout runs through the root module's hooks
        (all-gather of the parameters outside the blocks; the blocks stay children of this root)."""
        return self_rollout(self.transformer, *args, **kwargs)
