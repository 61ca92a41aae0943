"""Preallocated per-layer KV cache for chunk-by-chunk streaming (docs/method.md §2, Alg. 1 l.1-10).

Stored keys are post-RMSNorm, post-RoPE (so their order in the buffer does not matter: attention is permutation
invariant over keys). Buffers are allocated once and written by position, which makes writes idempotent (re-running
the cache pass of a chunk overwrites the same slots) and keeps addresses stable for CUDA graphs.

Layout of one layer's buffer, in latent-frame slots of ``tokens_per_frame`` tokens each:

- unlimited history (``local_attn_size=-1``): slot ``f`` holds frame ``f``; capacity ``max_frames``;
- window + sink (LongLive-style): slots ``[0, sink_size)`` hold the first frames forever; the remaining
  ``local_attn_size - sink_size - frames_per_block`` slots are a ring buffer over later frames. With equal-size
  chunks this holds exactly the history frames the attention window lets a chunk see (see
  :mod:`raven_video.models.attention_layout`), so streaming equals the windowed block-causal full sequence.

The text K/V of cross-attention are cached too (computed at the first call, reused afterwards); a prompt switch
calls :meth:`WanKVCache.reset_text`. ``cache_text=False`` keeps them out: every forward then recomputes them from the
text embeddings (with gradient, for training; the history K/V stay cached and detached). Bookkeeping is plain Python
(no device syncs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CachePlan:
    """What one streaming forward reads and writes: token ranges into every layer's buffer."""

    read_ranges: tuple[tuple[int, int], ...]
    write_ranges: tuple[tuple[int, int, int, int], ...]  # (buffer_start, buffer_end, chunk_start, chunk_end)
    # (start, end) token range of the chunk's own slots when the visible history is exactly the buffer's
    # [0, start): the chunk's K/V can then be written there and attention reads one view, no concatenation
    span: tuple[int, int] | None = None


class WanKVCache:
    """Self-attention K/V and cross-attention text K/V for every transformer block.

    Args:
        num_layers, num_heads, head_dim: the transformer's shape.
        batch_size: streams decoded together (e.g. ``2 * B`` for classifier-free guidance).
        tokens_per_frame: tokens of one latent frame after patchify (1560 at 480x832).
        max_frames: history capacity in latent frames when ``local_attn_size == -1``.
        local_attn_size: attention window in latent frames including the current chunk and the sink (-1 = unlimited).
        sink_size: first latent frames that stay visible forever.
        frames_per_block: latent frames per chunk (size of the ring's blind spot, see module docstring).
        cache_text: keep the cross-attention text K/V after the first forward (streaming); ``False``: never (each
            forward recomputes them, e.g. a training forward that must reach the text projections).
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        batch_size: int,
        tokens_per_frame: int,
        max_frames: int | None = None,
        local_attn_size: int = -1,
        sink_size: int = 0,
        frames_per_block: int = 3,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        cache_text: bool = True,
    ):
        if local_attn_size == -1:
            if max_frames is None or max_frames < 1:
                raise ValueError(
                    f"max_frames={max_frames}: an unlimited-history cache needs the number of latent frames it must "
                    "hold; pass max_frames or set local_attn_size for a rolling window."
                )
            self.ring_frames = 0
            capacity = max_frames
        else:
            if local_attn_size < sink_size + frames_per_block:
                raise ValueError(
                    f"local_attn_size={local_attn_size} must be >= sink_size + frames_per_block = "
                    f"{sink_size + frames_per_block}."
                )
            self.ring_frames = local_attn_size - sink_size - frames_per_block
            capacity = sink_size + self.ring_frames
        self.num_layers = num_layers
        self.cache_text = cache_text
        self.batch_size = batch_size
        self.tokens_per_frame = tokens_per_frame
        self.local_attn_size = local_attn_size
        self.sink_size = sink_size
        self.capacity_frames = capacity
        shape = (batch_size, max(capacity, 1) * tokens_per_frame, num_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.text_keys: list[torch.Tensor | None] = [None] * num_layers
        self.text_values: list[torch.Tensor | None] = [None] * num_layers
        self._text_storage = ([None] * num_layers, [None] * num_layers)  # kept across `reset_text` (see set_text)
        self.slot_frame = [-1] * capacity  # video frame index held by each slot, -1 = empty

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget all history and the text K/V (a new stream). Buffers stay allocated."""
        self.slot_frame = [-1] * self.capacity_frames
        self.reset_text()

    def reset_text(self) -> None:
        """Forget the cached text K/V (prompt switch); history K/V are kept."""
        self.text_keys = [None] * self.num_layers
        self.text_values = [None] * self.num_layers

    @property
    def has_text(self) -> bool:
        return self.text_keys[0] is not None

    @property
    def num_cached_frames(self) -> int:
        return sum(f >= 0 for f in self.slot_frame)

    def cached_frames(self) -> list[int]:
        """Video frame indices currently held, in ascending order."""
        return sorted(f for f in self.slot_frame if f >= 0)

    # ------------------------------------------------------------------ planning
    def _slot(self, frame: int) -> int:
        if self.local_attn_size == -1:
            if frame >= self.capacity_frames:
                raise ValueError(
                    f"frame {frame} does not fit the KV cache of {self.capacity_frames} latent frames; allocate a "
                    "larger max_frames or stream with a local attention window (local_attn_size / sink_size)."
                )
            return frame
        if frame < self.sink_size:
            return frame
        if self.ring_frames == 0:
            return -1
        return self.sink_size + (frame - self.sink_size) % self.ring_frames

    def plan(self, frame_start: int, num_frames: int, write: bool) -> CachePlan:
        """Token ranges to read (visible history before ``frame_start``) and, if ``write``, to write."""
        chunk_end = frame_start + num_frames
        visible = []
        for slot, f in enumerate(self.slot_frame):
            if f < 0 or f >= frame_start:
                continue
            if self.local_attn_size > 0 and not (
                f < self.sink_size or f >= chunk_end - (self.local_attn_size - self.sink_size)
            ):
                continue
            visible.append(slot)
        tpf = self.tokens_per_frame
        read = _merge([(s * tpf, (s + 1) * tpf) for s in sorted(visible)])
        writes = []
        if write:
            for i in range(num_frames):
                slot = self._slot(frame_start + i)
                if slot >= 0:
                    writes.append((slot * tpf, (slot + 1) * tpf, i * tpf, (i + 1) * tpf))
        span = None
        if self.local_attn_size == -1 and chunk_end <= self.capacity_frames:
            # full history: frame f lives in slot f, and slots >= frame_start are read by nobody before the
            # chunk's cache pass overwrites them, so even a denoising pass may put its K/V there
            start, end = frame_start * tpf, chunk_end * tpf
            if tuple(read) in ((), ((0, start),)):
                span = (start, end)
        return CachePlan(tuple(read), tuple(_merge_writes(writes)), span)

    def commit(self, frame_start: int, num_frames: int) -> None:
        """Record that frames ``[frame_start, frame_start + num_frames)`` were written."""
        for i in range(num_frames):
            slot = self._slot(frame_start + i)
            if slot >= 0:
                self.slot_frame[slot] = frame_start + i

    def layer(self, index: int, plan: CachePlan) -> "KVCacheLayer":
        return KVCacheLayer(self, index, plan)


class KVCacheLayer:
    """One block's view of the cache for one forward: the explicit argument the attention processor receives."""

    def __init__(self, cache: WanKVCache, index: int, plan: CachePlan):
        self.cache, self.index, self.plan = cache, index, plan
        self._in_buffer = False  # the chunk's K/V already sit in their slots (see `extend`)

    def extend(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[cached visible K ; key]`` along the sequence axis. ``key``: ``[B, L, H, D]``.

        With a full-history plan (``plan.span``) and no gradient to keep, the chunk's K/V are written into their own
        slots and the result is a view of the buffer (copying only the chunk, not the whole history); otherwise a
        concatenation.
        """
        keys = self.cache.keys[self.index]
        values = self.cache.values[self.index]
        span = self.plan.span
        if (span is not None and span[1] - span[0] == key.shape[1] and keys.shape[0] == key.shape[0]
                and not (torch.is_grad_enabled() and (key.requires_grad or value.requires_grad))):
            keys[:, span[0]:span[1]] = key
            values[:, span[0]:span[1]] = value
            self._in_buffer = True
            return keys[:, :span[1]], values[:, :span[1]]
        if not self.plan.read_ranges:
            return key, value
        ks = [keys[:, a:b] for a, b in self.plan.read_ranges] + [key]
        vs = [values[:, a:b] for a, b in self.plan.read_ranges] + [value]
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)

    def write(self, key: torch.Tensor, value: torch.Tensor) -> None:
        if self._in_buffer:  # `extend` already put exactly these K/V in their slots
            return
        for a, b, s, e in self.plan.write_ranges:
            self.cache.keys[self.index][:, a:b] = key[:, s:e].detach()
            self.cache.values[self.index][:, a:b] = value[:, s:e].detach()

    def text(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.cache.text_keys[self.index], self.cache.text_values[self.index]

    def set_text(self, key: torch.Tensor, value: torch.Tensor) -> None:
        if not self.cache.cache_text:
            return
        # text K/V of a new prompt go into the previous prompt's storage when it fits, so their memory addresses stay
        # fixed across prompts and streams (CUDA graphs captured once keep reading the right tensors)
        store = self.cache._text_storage
        for i, (tensor, slot) in enumerate(((key, self.cache.text_keys), (value, self.cache.text_values))):
            tensor = tensor.detach()
            old = store[i][self.index]
            if (old is not None and old.shape == tensor.shape and old.dtype == tensor.dtype
                    and old.device == tensor.device and not torch.is_grad_enabled()):
                tensor = old.copy_(tensor)
            store[i][self.index] = tensor
            slot[self.index] = tensor


def _merge(ranges):
    out = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _merge_writes(ranges):
    out = []
    for a, b, s, e in ranges:
        if out and out[-1][1] == a and out[-1][3] == s:
            out[-1] = (out[-1][0], b, out[-1][2], e)
        else:
            out.append((a, b, s, e))
    return out
