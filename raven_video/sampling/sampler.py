"""The chunk-by-chunk few-step sampler over a KV cache (``docs/method.md`` §2, Alg. 1): the one sampling loop of
``CausalWanPipeline.__call__`` / ``stream()`` and of the training rollouts.

For every chunk ``c`` (latent frames ``[s, s + n)``, RoPE offset ``s``): run the ``K`` few-step updates
``z <- kernel(v_theta(z, t_k), z, sigma_k, sigma_{k+1}, eps_k)`` while attending to the cached history, hand the
clean chunk to the caller, then one *cache pass* of the clean chunk at ``t = 0`` writes its keys and values into the
cache for the chunks after it (the last chunk needs none).

The network is reached through a :class:`Denoiser`: ``denoiser(latents, timestep, text, cache, frame_offset,
update_cache) -> velocity``, plus ``denoiser.kv_cache(...)`` to allocate the cache. :class:`TransformerDenoiser` is the
eager transformer; accelerators (``StreamingGraphs``, CUDA graphs) implement the same two methods and replace it from
outside, so this loop has no accelerator branches. Training records what it needs (the pre-step states of every
chunk) through the ``observer`` callback, not through the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Protocol, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from .flow import consistency_step, guidance_combine

__all__ = ["Denoiser", "TransformerDenoiser", "SampledChunk", "ChunkSampler", "initial_noise"]

# kernel(velocity, sample, sigma, sigma_next, noise) -> next sample (the consistency step or, for CM-GRPO's baseline,
# EulerMaruyamaScheduler.transition)
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Denoiser(Protocol):
    """The streaming network as the sampler calls it."""

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, text: Optional[torch.Tensor], cache,
                 frame_offset: int, update_cache: bool = False) -> torch.Tensor:
        """Velocity ``[B, C, n, h, w]`` of one chunk; ``text`` is ``None`` once the cache holds the text K/V."""

    def kv_cache(self, batch_size: int, latent_height: int, latent_width: int, **kwargs):
        """A KV cache for a stream of this shape (``CausalWanTransformer3DModel.new_kv_cache`` arguments)."""


class TransformerDenoiser:
    """The eager :class:`~raven_video.CausalWanTransformer3DModel` streaming forward as a :class:`Denoiser`."""

    def __init__(self, transformer):
        self.transformer = transformer

    def __call__(self, latents, timestep, text, cache, frame_offset, update_cache=False):
        return self.transformer(latents.to(self.transformer.dtype), timestep, text, kv_cache=cache,
                                frame_offset=frame_offset, update_cache=update_cache).sample

    def kv_cache(self, batch_size, latent_height, latent_width, **kwargs):
        return self.transformer.new_kv_cache(batch_size, latent_height, latent_width, **kwargs)


@dataclass
class SampledChunk:
    """One sampled chunk: ``latents`` ``[B, C, n, h, w]`` (float32, clean) at latent frames ``[start, start + n)``."""

    index: int
    start: int
    latents: torch.Tensor


def initial_noise(shape: Sequence[int], generator, device) -> torch.Tensor:
    """The full-length initial noise ``[B, C, F, h, w]`` (float32), drawn before any step noise (Alg. 1 l.1)."""
    return randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float32)


class ChunkSampler:
    r"""
    Chunk-by-chunk sampling of a causal few-step student over a KV cache (Alg. 1).

    Args:
        denoiser: a :class:`Denoiser` (the eager :class:`TransformerDenoiser` or an accelerated one).
        timesteps: the few-step list ``[t_0, ..., t_{K-1}]`` fed to the network (e.g. ``[1000, 938, 833, 625]``).
        sigmas: ``K + 1`` sigmas the kernel steps between (``flow.scheduler_sigmas``: ``t_k / 1000`` and a final 0).
        kernel: ``(velocity, sample, sigma, sigma_next, noise) -> next sample``; default the consistency step.
    """

    def __init__(self, denoiser: Denoiser, timesteps: Sequence[int], sigmas: torch.Tensor,
                 kernel: Kernel = consistency_step):
        if len(sigmas) != len(timesteps) + 1:
            raise ValueError(f"{len(timesteps)} timesteps need {len(timesteps) + 1} sigmas, got {len(sigmas)}.")
        self.denoiser, self.kernel = denoiser, kernel
        self.timesteps = [float(t) for t in timesteps]
        self.sigmas = sigmas

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    # ------------------------------------------------------------------------------------------------ one call
    def predict(self, latents, t, text, cache, frame_offset, guidance_scale=1.0) -> torch.Tensor:
        """Velocity of one chunk; with guidance the batch is ``[neg; pos]`` and the result ``neg + w (pos - neg)``."""
        model_in = torch.cat([latents, latents]) if guidance_scale > 1.0 else latents
        v = self.denoiser(model_in, t.expand(model_in.shape[0]), text, cache, frame_offset)  # fp32 timesteps
        if guidance_scale > 1.0:
            v_neg, v_pos = v.chunk(2)
            v = guidance_combine(v_pos, v_neg, guidance_scale)
        return v

    def cache_pass(self, clean, text, cache, frame_offset, guidance_scale=1.0) -> None:
        """Write the clean chunk's keys and values into the cache: one forward at ``t = 0`` (Alg. 1 l.8)."""
        model_in = torch.cat([clean, clean]) if guidance_scale > 1.0 else clean
        zero = torch.zeros(model_in.shape[0], dtype=torch.float32, device=clean.device)
        self.denoiser(model_in, zero, text, cache, frame_offset, update_cache=True)

    def step_noise(self, shape, generator, device) -> torch.Tensor:
        """The chunk's ``K`` step noises ``[K, *shape]``, drawn in the order ``FlowMatchLCMScheduler.step`` draws them,
        moved to the device in one non-blocking copy (a CPU generator would otherwise force a host sync per step)."""
        first = generator[0] if isinstance(generator, list) else generator
        draw_device = first.device if first is not None else device
        noise = torch.stack([randn_tensor(shape, generator=generator, device=draw_device, dtype=torch.float32)
                             for _ in range(self.num_steps)])
        if noise.device != torch.device(device):
            if torch.device(device).type == "cuda":
                return noise.pin_memory().to(device, non_blocking=True)
            return noise.to(device)
        return noise

    # ------------------------------------------------------------------------------------------------ the loop
    def sample(
        self,
        latents: torch.Tensor,
        text: torch.Tensor,
        cache,
        chunk_sizes: Sequence[int],
        generator=None,
        guidance_scale: float = 1.0,
        text_switches: Optional[Mapping[int, torch.Tensor]] = None,
        recache_on_switch: bool = True,
        observer: Optional[Callable[[int, int, torch.Tensor], None]] = None,
    ) -> Iterator[SampledChunk]:
        """Sample every chunk of ``latents`` (the initial noise ``[B, C, F, h, w]``, float32).

        Args:
            text: ``[B, L, D]`` embeddings (``[2B, L, D]`` as ``[neg; pos]`` when ``guidance_scale > 1``).
            cache: an empty KV cache (``denoiser.kv_cache``).
            chunk_sizes: latent frames per chunk (``transformer.chunk_sizes(F)``).
            generator: draws the step noise.
            text_switches: ``{chunk_index: text}`` switches the prompt from that chunk on: the cached text K/V are
                dropped and, with ``recache_on_switch``, the cached history is re-encoded with the new text
                (LongLive's re-cache).
            observer: ``observer(chunk_index, k, z)`` sees every step's input ``z`` before the step (training
                rollouts record the trajectory with it).

        Yields:
            :class:`SampledChunk` as soon as a chunk is done; its cache pass runs when the caller asks for the next.
        """
        history = torch.zeros_like(latents)
        timesteps = torch.tensor(self.timesteps, dtype=torch.float32, device=latents.device)
        start = 0
        for index, n in enumerate(chunk_sizes):
            if text_switches and index in text_switches:
                text = text_switches[index]
                cache.reset_text()
                if recache_on_switch:
                    self._recache(cache, history[:, :, :start], text, chunk_sizes, guidance_scale)
            z = latents[:, :, start : start + n]
            noise = None
            for k in range(self.num_steps):
                if observer is not None:
                    observer(index, k, z)
                v = self.predict(z, timesteps[k], None if cache.has_text else text, cache, start, guidance_scale)
                if noise is None:  # all K at once (no sync per step), drawn while the first forward runs on a GPU
                    noise = self.step_noise(z.shape, generator, latents.device)
                z = self.kernel(v, z, self.sigmas[k], self.sigmas[k + 1], noise[k])
            history[:, :, start : start + n] = z
            yield SampledChunk(index, start, z)
            # the cache pass of chunk c is only needed by chunk c + 1: it runs after the caller had the chunk
            if index < len(chunk_sizes) - 1:
                self.cache_pass(z, None if cache.has_text else text, cache, start, guidance_scale)
            start += n

    def _recache(self, cache, history, text, chunk_sizes, guidance_scale) -> None:
        """Re-run the cache pass over every cached frame with new text, chunk by chunk as the frames were cached."""
        frames = cache.cached_frames()
        start = 0
        for n in chunk_sizes:
            piece = [f for f in frames if start <= f < start + n]
            if piece:
                a, b = piece[0], piece[-1] + 1
                self.cache_pass(history[:, :, a:b], None if cache.has_text else text, cache, a, guidance_scale)
            start += n
            if start >= history.shape[2]:
                break
