"""CUDA graphs of the streaming transformer calls: a chunk's forwards are a few hundred kernel launches each, and the
Python that launches them also has to feed the VAE decode on the side stream.

A stream makes the same calls every time: for chunk ``c`` at latent frame ``s``, the denoising forwards and one cache
pass, whose KV-cache reads and writes (the cache's :class:`~raven_video.models.kv_cache.CachePlan`) depend only on
``s``, the chunk size and the cache's window. :class:`StreamingGraphs` is a :class:`~raven_video.sampling.sampler.Denoiser`
(the sampler calls it like the eager transformer): it keeps one KV cache per stream shape (reset, not reallocated,
between streams, so buffer addresses stay fixed), runs each distinct call eagerly the first time (compilation, cuDNN
plans, RoPE tables), captures it the second time, and replays it afterwards with the inputs copied into static
buffers. The text K/V are computed eagerly at a stream's first forward and written into fixed storage
(``KVCacheLayer.set_text``), so graphs stay valid across prompts.

Calls it cannot replay (text to embed, gradients, CPU tensors, another cache) run eagerly; if a capture fails the
runner logs why and stays eager for good.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from ..models.kv_cache import WanKVCache


logger = logging.getLogger(__name__)


def text_up_front(text: torch.Tensor | None, cache: WanKVCache, own_cache: WanKVCache | None) -> bool:
    """Whether a streaming call should first put the prompt's text K/V into its runner's own ``cache``
    (``transformer.cache_text``): then every forward, the stream's first included, runs without text and can be a
    graph replay. Inference only; a cache kept without text K/V, or another cache, is left alone."""
    return (text is not None and cache is own_cache and cache.cache_text and not cache.has_text
            and not torch.is_grad_enabled())


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: torch.Tensor, timestep: torch.Tensor,
                 output: torch.Tensor, keep: tuple = ()):
        self.graph, self.inputs, self.timestep, self.output = graph, inputs, timestep, output
        self.keep = keep  # tensors allocated outside the graph's pool that its replays read (RoPE tables)


class StreamingGraphs:
    r"""
    Captures and replays a :class:`~raven_video.CausalWanTransformer3DModel`'s streaming forwards.

    Args:
        transformer: the streaming transformer (in eval mode, on a CUDA device).
        warmup_calls: eager runs of each distinct call before it is captured (default 1).

    Use through ``pipe.enable_realtime(cuda_graphs=True)``: the pipeline's sampler then allocates its KV cache with
    :meth:`kv_cache` and makes every transformer call through :meth:`__call__`.
    """

    def __init__(self, transformer, warmup_calls: int = 1):
        self.transformer = transformer
        self.warmup_calls = warmup_calls
        self.graphs: dict[tuple, _Graph] = {}
        self.calls: Counter = Counter()
        self.pool = None
        self.cache: WanKVCache | None = None
        self._cache_key = None
        self.disabled_reason: str | None = None

    def kv_cache(self, batch_size: int, latent_height: int, latent_width: int, **kwargs) -> WanKVCache:
        """The KV cache of a stream of this shape: the previous one, reset, or a new one (dropping old graphs)."""
        key = (batch_size, latent_height, latent_width, tuple(sorted(kwargs.items(), key=lambda kv: kv[0])))
        if self.cache is not None and key == self._cache_key:
            self.cache.reset()
            return self.cache
        self.graphs.clear()
        self.calls.clear()
        self.cache = self.transformer.new_kv_cache(batch_size, latent_height, latent_width, **kwargs)
        self._cache_key = key
        return self.cache

    def use_cache(self, cache: WanKVCache) -> None:
        """Capture and replay the calls on ``cache``, a cache allocated elsewhere (e.g. by a
        :class:`~raven_video.pipelines.token_parallel.TokenParallelDenoiser` that runs its cache passes through this
        runner); graphs of the previous cache are dropped."""
        self.graphs.clear()
        self.calls.clear()
        self.cache, self._cache_key = cache, None

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor | None, cache: WanKVCache,
                 frame_offset: int, update_cache: bool = False) -> torch.Tensor:
        """``transformer(latents, timestep, text, kv_cache=cache, frame_offset=..., update_cache=...).sample``."""
        model_in = latents.to(self.transformer.dtype)
        if text_up_front(text, cache, self.cache):
            self.transformer.cache_text(text, cache)
            text = None

        def eager():
            return self.transformer(model_in, timestep, text, kv_cache=cache, frame_offset=frame_offset,
                                    update_cache=update_cache).sample

        if (text is not None or self.disabled_reason is not None or cache is not self.cache or not cache.has_text
                or model_in.device.type != "cuda" or torch.is_grad_enabled()):
            return eager()
        frames = model_in.shape[2]
        plan = cache.plan(frame_offset, frames, update_cache)
        key = (frame_offset, tuple(model_in.shape), model_in.dtype, tuple(timestep.shape), update_cache, plan)
        graph = self.graphs.get(key)
        if graph is None:
            self.calls[key] += 1
            if self.calls[key] <= self.warmup_calls:
                return eager()
            graph = self._capture(key, model_in, timestep, cache, frame_offset, update_cache)
            if graph is None:
                return eager()
        else:
            graph.inputs.copy_(model_in)
            graph.timestep.copy_(timestep)
            if update_cache:  # the Python bookkeeping of the cache pass, which a replay does not run
                cache.commit(frame_offset, frames)
        graph.graph.replay()
        return graph.output.clone()

    def _capture(self, key, model_in, timestep, cache, frame_offset, update_cache) -> _Graph | None:
        inputs, static_t = model_in.clone(), timestep.clone()
        # RoPE tables: built now (building copies from the host, which a capture cannot hold) and kept by the graph
        # (the transformer's table cache evicts old positions in long streams; a replay must not read freed memory)
        _, _, frames, height, width = model_in.shape
        tables = self.transformer.rotary_tables(frame_offset, frames, height, width, model_in.device)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                output = self.transformer(inputs, static_t, None, kv_cache=cache, frame_offset=frame_offset,
                                          update_cache=update_cache).sample
        except Exception as err:  # noqa: BLE001 - any capture failure: stay eager, say why once
            self.disabled_reason = f"{type(err).__name__}: {err}"
            logger.warning("CUDA graph capture failed, streaming stays eager: %s", self.disabled_reason)
            self.graphs.clear()
            torch.cuda.synchronize()
            return None
        captured = _Graph(graph, inputs, static_t, output, keep=tables)
        self.graphs[key] = captured
        return captured
