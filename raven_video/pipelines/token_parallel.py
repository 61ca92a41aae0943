"""The streaming transformer over several GPUs, token-parallel (``enable_realtime(devices=..., transformer_split=...)``).

Every device holds a full replica of the weights and computes a contiguous share of each chunk's tokens through every
block. Before each self-attention the devices exchange the chunk K/V they computed, so every query still attends to
the whole chunk and the whole cached history (each device keeps a full copy of the KV cache): the result equals the
one-device forward up to GEMM rounding.

Why tokens, not layers or heads: at batch 1 without guidance a chunk's forward is one sequential pass over the blocks
(layers on different GPUs would take turns, not overlap), and Wan's QK RMSNorm spans all heads (heads on different
GPUs need a reduction inside every attention plus an all-reduce after the output projection and after the FFN).
Everything in a block except the self-attention is per token when there is one timestep per sample (modulation, QK
norm, RoPE, cross-attention, FFN), so one exchange per block is all it costs: ~14 MB per device at 480x832.

With CUDA (and ``cuda_graphs=True``) each forward is replayed as one CUDA graph per device and per block boundary
(the exchanges are peer copies between the replays, ordered by ``Tensor.copy_``'s cross-device stream barriers), so
launching stays cheap for the host; the graphs share one memory pool per device and are always replayed in the order
they were captured. On CPU (tests) the same sequence runs eagerly.

Measured on two H200s with FlashAttention-4 (BENCHMARKS.md, 480x832, 81 frames): the transformer alone takes
1.84 s on one GPU, 1.10 s split evenly. With the Wan VAE decoding on the second GPU and every forward split, the whole
stream takes 1.83-1.86 s: the decode shares that GPU with transformer work the first one waits for at every block, so
it does not hide. With ``unsplit_forwards=2`` (the default, see below) it takes 1.65-1.70 s. Giving the second GPU a
smaller share did not help (0.65: 2.08 s without unsplit forwards; 0.58 with two: 1.75 s): the first GPU's attention
then needs a third wave of 128-query tiles (12 heads x tiles over 132 SMs).

The replicas are copies made when it is built: load weights and LoRA adapters before ``enable_realtime``. Graphs are
captured per chunk position (as :mod:`~raven_video.pipelines.cuda_graphs` does), times the block boundaries and the
devices: 13 positions x 31 x 2 for an 81-frame video. A one-minute windowed stream (969 frames, ``unsplit_forwards=2``)
captured 81 split calls, ~5,000 graphs, in a 46 s warm-up on two H200s, then ran at 37.6 FPS (BENCHMARKS.md).

Calls it does not split run on the first device's transformer, eagerly: gradients, per-frame timesteps, a cache it did
not allocate, and caches without the text K/V (``cache_text=False``).

``unsplit_forwards=n`` gives the decode a window: a chunk's decode is queued on the second device just before the
chunk's cache pass (Alg. 1 l.8), so that pass (``n >= 1``) and the next chunk's first ``n - 1`` denoising forwards run
whole on the first device (CUDA graphs of :class:`~raven_video.pipelines.cuda_graphs.StreamingGraphs` on its
replica) while the second decodes uncontested. After the cache pass the chunk's K/V of every layer are copied into
the other devices' caches (peer copies, ~0.9 GB at 480x832). Each whole forward takes longer than a split one (~54
against ~32 ms); the gain is the decode (~0.11 s per chunk) no longer delaying the lockstep. On two H200s: 1.83-1.86 s
with 0, 1.67 s with 1, 1.65-1.70 s with 2, 1.81 s with 3.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from ..models.kv_cache import WanKVCache
from .cuda_graphs import StreamingGraphs, text_up_front

logger = logging.getLogger(__name__)

TOKEN_ALIGN = 64  # share boundaries fall on multiples of this many tokens (GEMM and attention tiles)


def token_bounds(num_tokens: int, shares, align: int = TOKEN_ALIGN) -> list[tuple[int, int]]:
    """Contiguous ``(start, end)`` token ranges, one per device, proportional to ``shares`` and cut at multiples of
    ``align`` (1 for chunks under ``16 * align`` tokens; the last range ends at ``num_tokens``). Raises if a device
    would get no token."""
    align = align if num_tokens >= 16 * align else 1
    total = float(sum(shares))
    cuts, acc = [0], 0.0
    for share in shares[:-1]:
        acc += share
        cuts.append(min(num_tokens, int(round(num_tokens * acc / total / align)) * align))
    cuts.append(num_tokens)
    bounds = list(zip(cuts[:-1], cuts[1:]))
    if any(end <= start for start, end in bounds):
        raise ValueError(f"token shares {tuple(shares)} leave a device without tokens for a chunk of {num_tokens} "
                         f"tokens (boundaries at multiples of {align}); use more balanced shares.")
    return bounds


def check_unsplit_forwards(value) -> int:
    """``unsplit_forwards`` as an int, or a one-line error naming the bad value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
        raise ValueError(f"unsplit_forwards={value!r}: give a whole number >= 0 (0 splits every forward, 1 runs each "
                         "cache pass whole on the first device, 2 also the next chunk's first step).")
    return int(value)


@dataclass
class _State:
    """One device's activations between segments of a forward."""
    hidden: torch.Tensor
    temb: torch.Tensor
    proj: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    query: torch.Tensor | None = None


@dataclass
class _Exchange:
    """Fixed buffers of one chunk size: ``stage[d]`` = device ``d``'s chunk K/V ``[2, B, L_d, H, D]``;
    ``incoming[d][e]`` = device ``e``'s K/V, copied onto device ``d``."""
    bounds: list[tuple[int, int]]
    stage: list[torch.Tensor]
    incoming: list[dict[int, torch.Tensor]]


@dataclass
class _Captured:
    exchange: _Exchange
    inputs: list[torch.Tensor]
    timesteps: list[torch.Tensor]
    graphs: list[list[torch.cuda.CUDAGraph]]  # [segment][device]
    outputs: list[torch.Tensor]
    keep: list = field(default_factory=list)  # RoPE tables the replays read (built before capture)


class TokenParallelDenoiser:
    r"""
    A :class:`~raven_video.sampling.sampler.Denoiser` that runs each streaming forward token-parallel over ``devices``.

    Args:
        transformer: the streaming transformer, on ``devices[0]``, in eval mode, already set up (FP8, compiled
            halves, attention kernel): the other devices get deep copies of it.
        devices: one per replica, e.g. ``("cuda:0", "cuda:1")`` (a device may repeat: tests on CPU).
        shares: relative share of each chunk's tokens per device (default: equal; on two H200s equal shares were
            fastest even with the VAE decoding on the second, see the module docstring).
        cuda_graphs: capture and replay the forwards as CUDA graphs (CUDA only).
        warmup_calls: eager runs of each distinct call before it is captured.
        unsplit_forwards: forwards per chunk run whole on the first device, leaving the others free for the decode:
            0 splits every forward, 1 runs each cache pass whole, 2 (default, the fastest measured) also the next
            chunk's first step, ... (module docstring).

    Use through ``pipe.enable_realtime(devices=("cuda:0", "cuda:1"), transformer_split=0.5)``.
    """

    def __init__(self, transformer, devices, shares=None, cuda_graphs: bool = True, warmup_calls: int = 1,
                 unsplit_forwards: int = 2):
        self.devices = [torch.device(d) for d in devices]
        if len(self.devices) < 2:
            raise ValueError(f"devices={tuple(devices)}: token parallelism needs at least two devices.")
        shares = tuple(float(s) for s in (shares or [1.0] * len(self.devices)))
        if len(shares) != len(self.devices) or any(not s > 0 for s in shares):
            raise ValueError(f"shares={shares}: give one positive share per device ({len(self.devices)}).")
        unsplit_forwards = check_unsplit_forwards(unsplit_forwards)
        if transformer.device != self.devices[0]:
            raise ValueError(f"the transformer is on {transformer.device}, devices[0] is {self.devices[0]}: call "
                             f"pipe.to({str(self.devices[0])!r}) first.")
        self.shares = shares
        self.replicas = [transformer] + [copy.deepcopy(transformer).to(d) for d in self.devices[1:]]
        self.cuda_graphs = cuda_graphs and all(d.type == "cuda" for d in self.devices)
        self.warmup_calls = warmup_calls
        self.caches: list[WanKVCache] = []
        self._cache_key = None
        self._exchanges: dict[int, _Exchange] = {}
        self.graphs: dict[tuple, _Captured] = {}
        self.calls: Counter = Counter()
        self.pools = None
        self.disabled_reason: str | None = None
        self.unsplit_forwards = unsplit_forwards
        self._unsplit_left = 0  # denoising forwards still to run whole after the last whole cache pass
        self._whole = None  # CUDA graphs of the first device's whole forwards (unsplit_forwards > 0)
        if self.unsplit_forwards and self.cuda_graphs:
            self._whole = StreamingGraphs(transformer, warmup_calls=warmup_calls)

    @property
    def transformer(self):
        return self.replicas[0]

    # ------------------------------------------------------------------ the Denoiser protocol
    def kv_cache(self, batch_size: int, latent_height: int, latent_width: int, **kwargs) -> WanKVCache:
        """The first device's KV cache of a stream of this shape (the others are kept here); reset between streams."""
        key = (batch_size, latent_height, latent_width, tuple(sorted(kwargs.items(), key=lambda kv: kv[0])))
        if self.caches and key == self._cache_key:
            for cache in self.caches:
                cache.reset()
            return self.caches[0]
        self.graphs.clear()
        self.calls.clear()
        self._exchanges.clear()
        kwargs.pop("device", None)
        self.caches = [rep.new_kv_cache(batch_size, latent_height, latent_width, device=dev, **kwargs)
                       for rep, dev in zip(self.replicas, self.devices)]
        self._cache_key = key
        self._unsplit_left = 0
        if self._whole is not None:  # its graphs read and write the first device's cache
            self._whole.use_cache(self.caches[0])
        return self.caches[0]

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor | None, cache: WanKVCache,
                 frame_offset: int, update_cache: bool = False) -> torch.Tensor:
        """``transformer(latents, timestep, text, kv_cache=cache, frame_offset=..., update_cache=...).sample``."""
        model_in = latents.to(self.transformer.dtype)
        if text_up_front(text, cache, self._cache0):
            for rep, dev, device_cache in zip(self.replicas, self.devices, self.caches):
                rep.cache_text(text.to(dev), device_cache)
        if cache is not self._cache0 or not cache.has_text or timestep.ndim != 1 or torch.is_grad_enabled():
            return self.transformer(model_in, timestep, text, kv_cache=cache, frame_offset=frame_offset,
                                    update_cache=update_cache).sample
        frames = model_in.shape[2]
        if update_cache and self.unsplit_forwards:
            self._unsplit_left = self.unsplit_forwards - 1
            return self._whole_cache_pass(latents, timestep, frame_offset)
        if self._unsplit_left > 0 and not update_cache:
            self._unsplit_left -= 1
            return self._on_first(latents, timestep, frame_offset, update_cache=False)
        plan = cache.plan(frame_offset, frames, update_cache)
        out = self._gather(self._run(model_in, timestep, frame_offset, update_cache, plan), model_in.shape)
        if update_cache:
            for device_cache in self.caches:
                device_cache.commit(frame_offset, frames)
        return out

    def _run(self, model_in, timestep, frame_offset, update_cache, plan) -> list[torch.Tensor]:
        """Each device's output-head tokens: eagerly, or captured (second occurrence of a call) and replayed."""
        if not self.cuda_graphs or self.disabled_reason is not None:
            return self._forward(model_in, timestep, frame_offset, update_cache, plan)
        key = (frame_offset, tuple(model_in.shape), model_in.dtype, tuple(timestep.shape), update_cache, plan)
        captured = self.graphs.get(key)
        if captured is None:
            self.calls[key] += 1
            if self.calls[key] > self.warmup_calls:
                captured = self._capture(key, model_in, timestep, frame_offset, update_cache, plan)
            if captured is None:
                return self._forward(model_in, timestep, frame_offset, update_cache, plan)
        return self._replay(captured, model_in, timestep)

    def _whole_cache_pass(self, latents, timestep, frame_offset) -> torch.Tensor:
        """The cache pass on the first device alone, then the chunk's K/V slots of every layer copied to the others
        (each ``copy_`` runs on the first device's stream and orders both devices' streams, like ``_send``)."""
        frames = latents.shape[2]
        plans = [cache.plan(frame_offset, frames, True) for cache in self.caches[1:]]
        out = self._on_first(latents, timestep, frame_offset, update_cache=True)
        source = self.caches[0]
        for cache, plan in zip(self.caches[1:], plans):
            for layer in range(cache.num_layers):
                for a, b, _, _ in plan.write_ranges:
                    cache.keys[layer][:, a:b].copy_(source.keys[layer][:, a:b], non_blocking=True)
                    cache.values[layer][:, a:b].copy_(source.values[layer][:, a:b], non_blocking=True)
            cache.commit(frame_offset, frames)
        return out

    def _on_first(self, latents, timestep, frame_offset, update_cache: bool) -> torch.Tensor:
        """One whole forward on the first device's replica and cache (replayed as a CUDA graph where it can be)."""
        with torch.cuda.device(self.devices[0]) if self.devices[0].type == "cuda" else nullcontext():
            if self._whole is None:  # no CUDA graphs
                return self.transformer(latents.to(self.transformer.dtype), timestep, None, kv_cache=self.caches[0],
                                        frame_offset=frame_offset, update_cache=update_cache).sample
            return self._whole(latents, timestep, None, self.caches[0], frame_offset, update_cache=update_cache)

    @property
    def _cache0(self):
        return self.caches[0] if self.caches else None

    # ------------------------------------------------------------------ one forward, in segments
    def _exchange(self, num_tokens: int) -> _Exchange:
        """The K/V exchange buffers of a chunk of ``num_tokens`` tokens (allocated once per chunk size)."""
        if num_tokens not in self._exchanges:
            bounds = token_bounds(num_tokens, self.shares)
            cfg = self.transformer.config
            batch = self.caches[0].batch_size
            heads, head_dim, dtype = cfg.num_attention_heads, cfg.attention_head_dim, self.transformer.dtype

            def buffer(tokens, device):
                return torch.empty(2, batch, tokens, heads, head_dim, dtype=dtype, device=device)

            stage = [buffer(b - a, dev) for (a, b), dev in zip(bounds, self.devices)]
            incoming = [{e: buffer(be - ae, dev) for e, (ae, be) in enumerate(bounds) if e != d}
                        for d, dev in enumerate(self.devices)]
            self._exchanges[num_tokens] = _Exchange(bounds, stage, incoming)
        return self._exchanges[num_tokens]

    def _segment(self, index: int, d: int, states: list, inputs, timesteps, positions, exchange: _Exchange,
                 plan, update_cache: bool):
        """Device ``d``'s work between two exchanges: segment 0 embeds and projects block 0's Q/K/V; segment ``i``
        attends in block ``i - 1`` and projects block ``i``'s Q/K/V; the last one attends in the last block and
        applies the output head (returned)."""
        rep = self.replicas[d]
        num_blocks = len(rep.blocks)
        if index == 0:
            start, end = exchange.bounds[d]
            hidden, temb, proj, (cos, sin) = rep._embed_inputs(inputs[d], timesteps[d], positions)
            states[d] = _State(hidden[:, start:end].contiguous(), temb, proj, (cos[:, start:end], sin[:, start:end]))
        else:
            block = rep.blocks[index - 1]
            state = states[d]
            parts = [exchange.stage[d] if e == d else exchange.incoming[d][e] for e in range(len(self.devices))]
            keys_values = torch.cat(parts, dim=2)
            layer = self.caches[d].layer(index - 1, plan)
            attn = block.attn1.processor.attend(state.query, keys_values[0], keys_values[1], None, layer, update_cache)
            state.hidden = block._post_attention(block, state.hidden, attn, state.proj, *layer.text())
        state = states[d]
        if index == num_blocks:
            return rep._head(state.hidden, state.temb)
        block = rep.blocks[index]
        state.query, key, value = block._pre_attention(block, state.hidden, state.proj, state.rope)
        exchange.stage[d][0].copy_(key)
        exchange.stage[d][1].copy_(value)
        return None

    def _send(self, exchange: _Exchange) -> None:
        """Every device's chunk K/V to every other device (``copy_`` orders both devices' current streams)."""
        for d, targets in enumerate(exchange.incoming):
            for e, buffer in targets.items():
                buffer.copy_(exchange.stage[e], non_blocking=True)

    def _gather(self, outputs: list[torch.Tensor], latent_shape) -> torch.Tensor:
        head = torch.cat([out.to(self.devices[0], non_blocking=True) for out in outputs], dim=1)
        _, _, frames, height, width = latent_shape
        _, p_h, p_w = self.transformer.config.patch_size
        return self.transformer._unpatchify(head, frames, height // p_h, width // p_w)

    def _inputs(self, model_in, timestep, frame_offset, static: bool):
        """A call's exchange buffers, RoPE positions and per-device inputs (own copies when ``static``: a capture's)."""
        frames, height, width = model_in.shape[2:]
        exchange = self._exchange(frames * self.transformer.tokens_per_frame_for(height, width))
        positions = list(range(frame_offset, frame_offset + frames))
        place = (lambda t, dev: t.to(dev).clone()) if static else (lambda t, dev: t.to(dev))
        return (exchange, positions, [place(model_in, dev) for dev in self.devices],
                [place(timestep, dev) for dev in self.devices])

    def _forward(self, model_in, timestep, frame_offset, update_cache, plan) -> list[torch.Tensor]:
        exchange, positions, inputs, timesteps = self._inputs(model_in, timestep, frame_offset, static=False)
        states, outputs = [None] * len(self.devices), [None] * len(self.devices)
        num_blocks = len(self.transformer.blocks)
        for index in range(num_blocks + 1):
            for d, dev in enumerate(self.devices):
                with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
                    outputs[d] = self._segment(index, d, states, inputs, timesteps, positions, exchange, plan,
                                               update_cache)
            if index < num_blocks:
                self._send(exchange)
        return outputs

    # ------------------------------------------------------------------ CUDA graphs
    def _capture(self, key, model_in, timestep, frame_offset, update_cache, plan) -> _Captured | None:
        exchange, positions, inputs, timesteps = self._inputs(model_in, timestep, frame_offset, static=True)
        frames, height, width = model_in.shape[2:]
        # RoPE tables: built outside the capture (host copies) and held (the transformer's table cache evicts)
        keep = [rep.rotary_tables(frame_offset, frames, height, width, dev)
                for rep, dev in zip(self.replicas, self.devices)]
        if self.pools is None:
            self.pools, self._capture_streams = [], []
            for dev in self.devices:
                with torch.cuda.device(dev):
                    self.pools.append(torch.cuda.graph_pool_handle())
                    self._capture_streams.append(torch.cuda.Stream(dev))
        states, outputs = [None] * len(self.devices), [None] * len(self.devices)
        graphs = []
        try:
            for index in range(len(self.transformer.blocks) + 1):
                row = []
                for d, dev in enumerate(self.devices):
                    graph = torch.cuda.CUDAGraph()
                    with _capturing(graph, dev, self.pools[d], self._capture_streams[d]):
                        outputs[d] = self._segment(index, d, states, inputs, timesteps, positions, exchange, plan,
                                                   update_cache)
                    row.append(graph)
                graphs.append(row)
        except Exception as err:  # noqa: BLE001 - any capture failure: stay eager, say why once
            self.disabled_reason = f"{type(err).__name__}: {err}"
            logger.warning("CUDA graph capture of the token-parallel transformer failed, it stays eager: %s",
                           self.disabled_reason)
            self.graphs.clear()
            for dev in self.devices:
                torch.cuda.synchronize(dev)
            return None
        captured = _Captured(exchange, inputs, timesteps, graphs, outputs, keep)
        self.graphs[key] = captured
        return captured

    def _replay(self, captured: _Captured, model_in, timestep) -> list[torch.Tensor]:
        for static_in, static_t in zip(captured.inputs, captured.timesteps):
            static_in.copy_(model_in, non_blocking=True)
            static_t.copy_(timestep, non_blocking=True)
        last = len(captured.graphs) - 1
        for index, row in enumerate(captured.graphs):
            for graph, dev in zip(row, self.devices):
                with torch.cuda.device(dev):
                    graph.replay()
            if index < last:
                self._send(captured.exchange)
        return captured.outputs


@contextmanager
def _capturing(graph: torch.cuda.CUDAGraph, device: torch.device, pool, stream: torch.cuda.Stream):
    """Capture into ``graph`` on ``device`` as ``torch.cuda.graph`` does, minus its per-capture ``gc.collect()`` and
    ``empty_cache()`` (a forward here is ~60 captures): the capture stream follows the device's current stream."""
    with torch.cuda.device(device):
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=pool)
            try:
                yield
            finally:
                graph.capture_end()
        current.wait_stream(stream)
