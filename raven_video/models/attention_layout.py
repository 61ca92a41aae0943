"""Frame-level sequence layouts and the attention masks they imply.

Every forward mode of :class:`~raven_video.models.CausalWanTransformer3DModel` is a sequence of *segments*; a segment
is a run of latent frames of one chunk, either **noisy** (seen only by itself) or **clean** (seen by itself and by
every later chunk). The layout alone decides RoPE positions, per-frame timesteps and the attention mask
(Eq. 5), so masks can be built once, outside compiled code, and cached by layout (DESIGN invariant 4).

- bidirectional (teacher, critic): one clean segment, no mask;
- block-causal (``causal=True``): one clean segment per chunk -> chunk c sees chunks 1..c;
- training-time test (interleaved): ``[z_1, x_1, z_2, x_2, ..., z_N]`` -> ``z_c`` sees itself + ``x_1..x_{c-1}``,
  ``x_c`` sees itself + ``x_1..x_{c-1}``, nobody sees another noisy segment (Eq. 5, Figure 1(d)).

Local attention window and sink (LongLive-style, for streams longer than the training length): with
``local_attn_size = W`` latent frames (-1 = unlimited) and ``sink_size = S``, a query in a chunk whose last frame is
``b - 1`` sees a clean key frame ``f`` iff ``f < S`` or ``f >= b - (W - S)``. The KV cache implements the same rule
with a ring buffer (:mod:`raven_video.models.kv_cache`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """A run of latent frames of one chunk.

    Attributes:
        num_frames: latent frames in the segment.
        frame_start: video frame index of its first frame (= RoPE temporal position).
        noisy: ``True`` for a noisy state (visible only to itself), ``False`` for clean history.
        chunk: chunk index (0-based).
    """

    num_frames: int
    frame_start: int
    noisy: bool
    chunk: int

    @property
    def frame_end(self) -> int:
        return self.frame_start + self.num_frames


def chunk_sizes(num_frames: int, frames_per_block: int, first_block: int | None = None) -> list[int]:
    """Latent frames per chunk: ``[first_block, frames_per_block, ...]`` (docs/method.md §1.4).

    Raises a ``ValueError`` naming the values and the fix when ``num_frames`` does not fit the chunking.
    """
    first = frames_per_block if first_block is None else first_block
    if frames_per_block < 1 or first < 1:
        raise ValueError(
            f"frames_per_block={frames_per_block} and first_block={first} must be >= 1 latent frames."
        )
    if num_frames < first or (num_frames - first) % frames_per_block != 0:
        valid = [first + k * frames_per_block for k in range(0, 8)]
        raise ValueError(
            f"{num_frames} latent frames do not fit the chunking (first chunk {first}, then chunks of "
            f"{frames_per_block}). Use a latent frame count in {valid}..., i.e. num_frames (video frames, "
            f"4 * (latent - 1) + 1) in {[4 * (n - 1) + 1 for n in valid]}... (81 video frames = 21 latent frames)."
        )
    return [first] + [frames_per_block] * ((num_frames - first) // frames_per_block)


def frames_fit(num_frames: int, frames_per_block: int, first_block: int | None = None, temporal_stride: int = 4) -> bool:
    """True when ``num_frames`` pixel frames (``temporal_stride * k + 1``) fill whole chunks (docs/method.md §1.4)."""
    first = frames_per_block if first_block is None else first_block
    if num_frames < 1 or (num_frames - 1) % temporal_stride:
        return False
    latent = (num_frames - 1) // temporal_stride + 1
    return latent >= first and (latent - first) % frames_per_block == 0


def fitting_num_frames(near: int, frames_per_block: int, first_block: int | None = None,
                       temporal_stride: int = 4) -> tuple[int, int]:
    """Two pixel frame counts that fit the chunking around ``near``: the largest one <= ``near`` and the next (the two
    smallest when ``near`` is below every fit). For error messages: "use 69 or 81"."""
    first = frames_per_block if first_block is None else first_block
    step, smallest = temporal_stride * frames_per_block, temporal_stride * (first - 1) + 1
    below = smallest + max((near - smallest) // step, 0) * step
    return below, below + step


def num_frames_problem(num_frames: int, frames_per_block: int, first_block: int | None = None,
                       temporal_stride: int = 4) -> str | None:
    """``None`` when ``num_frames`` fits the chunking, else what is wrong and two values that work."""
    if frames_fit(num_frames, frames_per_block, first_block, temporal_stride):
        return None
    below, above = fitting_num_frames(num_frames, frames_per_block, first_block, temporal_stride)
    if num_frames < 1 or (num_frames - 1) % temporal_stride:
        problem = f"is not of the form {temporal_stride}k+1"
    else:
        latent = (num_frames - 1) // temporal_stride + 1
        first = frames_per_block if first_block is None else first_block
        problem = (f"({latent} latent frames) does not fit the chunks (first chunk {first}, then {frames_per_block} "
                   "latent frames)")
    return f"{problem}; use {below} or {above}"


@dataclass(frozen=True)
class FrameLayout:
    """An ordered list of segments plus the window rule. Hashable: masks are cached by layout."""

    segments: tuple[Segment, ...]
    causal: bool = True
    local_attn_size: int = -1
    sink_size: int = 0

    # ------------------------------------------------------------------ constructors
    @classmethod
    def bidirectional(cls, num_frames: int, frame_start: int = 0) -> "FrameLayout":
        return cls((Segment(num_frames, frame_start, False, 0),), causal=False)

    @classmethod
    def block_causal(
        cls,
        num_frames: int,
        frames_per_block: int,
        first_block: int | None = None,
        local_attn_size: int = -1,
        sink_size: int = 0,
    ) -> "FrameLayout":
        """One clean segment per chunk: chunk c attends to chunks <= c (the streaming-equivalent full sequence)."""
        segments, start = [], 0
        for c, n in enumerate(chunk_sizes(num_frames, frames_per_block, first_block)):
            segments.append(Segment(n, start, False, c))
            start += n
        return cls(tuple(segments), True, local_attn_size, sink_size)

    @classmethod
    def interleaved(
        cls,
        num_frames: int,
        frames_per_block: int,
        first_block: int | None = None,
        local_attn_size: int = -1,
        sink_size: int = 0,
    ) -> "FrameLayout":
        """The training-time-test sequence ``[z_1, x_1, ..., z_{N-1}, x_{N-1}, z_N]`` (Eq. 5).

        Noisy and clean copies of chunk c share RoPE positions; the last chunk has no clean copy.
        """
        sizes = chunk_sizes(num_frames, frames_per_block, first_block)
        segments, start = [], 0
        for c, n in enumerate(sizes):
            segments.append(Segment(n, start, True, c))
            if c < len(sizes) - 1:
                segments.append(Segment(n, start, False, c))
            start += n
        return cls(tuple(segments), True, local_attn_size, sink_size)

    # ------------------------------------------------------------------ derived quantities
    @property
    def num_frames(self) -> int:
        """Frames in the packed sequence (noisy and clean copies counted separately)."""
        return sum(s.num_frames for s in self.segments)

    def frame_positions(self) -> list[int]:
        """RoPE temporal index of every sequence frame."""
        return [s.frame_start + i for s in self.segments for i in range(s.num_frames)]

    def noisy_frame_mask(self) -> list[bool]:
        return [s.noisy for s in self.segments for _ in range(s.num_frames)]

    def frame_segment_ids(self) -> list[int]:
        return [j for j, s in enumerate(self.segments) for _ in range(s.num_frames)]

    def _visible(self, q: Segment, k: Segment, k_frame: int) -> bool:
        if q is k:
            return True
        if k.noisy:
            return False
        if k.chunk >= q.chunk:
            return False
        if self.local_attn_size > 0:
            recent = self.local_attn_size - self.sink_size
            return k_frame < self.sink_size or k_frame >= q.frame_end - recent
        return True

    def frame_mask(self) -> torch.Tensor | None:
        """Bool ``[F_seq, F_seq]`` (True = query frame may attend to key frame), or ``None`` when not causal."""
        if not self.causal:
            return None
        return _frame_mask(self)


@functools.lru_cache(maxsize=64)
def _frame_mask(layout: FrameLayout) -> torch.Tensor:
    frames = [(s, s.frame_start + i) for s in layout.segments for i in range(s.num_frames)]
    mask = torch.zeros(len(frames), len(frames), dtype=torch.bool)
    for qi, (qs, _) in enumerate(frames):
        for ki, (ks, kf) in enumerate(frames):
            mask[qi, ki] = layout._visible(qs, ks, kf)
    return mask


def validate_window(local_attn_size: int, sink_size: int, frames_per_block: int) -> None:
    """Check the LongLive-style window: it must hold the sink and at least one whole chunk."""
    if sink_size < 0:
        raise ValueError(f"sink_size={sink_size} must be >= 0 latent frames.")
    if local_attn_size == -1:
        return
    if local_attn_size < sink_size + frames_per_block:
        raise ValueError(
            f"local_attn_size={local_attn_size} latent frames cannot hold sink_size={sink_size} plus one chunk of "
            f"{frames_per_block} frames; use local_attn_size >= {sink_size + frames_per_block} or -1 (unlimited)."
        )


@functools.lru_cache(maxsize=16)
def sdpa_token_mask(layout: FrameLayout, tokens_per_frame: int, device: torch.device) -> torch.Tensor | None:
    """Dense bool ``[L, L]`` token mask for ``scaled_dot_product_attention`` (True = attend). CPU / fallback path."""
    fm = layout.frame_mask()
    if fm is None:
        return None
    return fm.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1).to(device)


@functools.lru_cache(maxsize=16)
def flex_block_mask(layout: FrameLayout, tokens_per_frame: int, device: torch.device, block_size: int = 128):
    """flex-attention ``BlockMask`` for the layout (GPU training path), built outside compiled code.

    Built from 128x128 block summaries instead of ``create_block_mask``, which materialises the dense mask (and its
    int64 indices: 27 GiB for the 60 840-token interleaved sequence). A block covers whole frame ranges on both
    axes (every frame it touches has a token in it), so "some / all pairs allowed" is exactly a rectangle sum of the
    frame mask (2-D prefix sums). Partial blocks are resolved by ``mask_mod`` inside the kernel.
    """
    from torch.nn.attention.flex_attention import BlockMask

    fm = layout.frame_mask()
    if fm is None:
        return None
    length = layout.num_frames * tokens_per_frame
    blocks = -(-length // block_size)
    first = torch.arange(blocks) * block_size
    last = torch.clamp(first + block_size, max=length) - 1
    f0, f1 = first // tokens_per_frame, last // tokens_per_frame  # frames touched by each block: [f0, f1]
    prefix = torch.zeros(fm.shape[0] + 1, fm.shape[1] + 1, dtype=torch.int64)
    prefix[1:, 1:] = fm.long().cumsum(0).cumsum(1)
    qa, qb = f0[:, None], f1[:, None] + 1
    ka, kb = f0[None, :], f1[None, :] + 1
    allowed = prefix[qb, kb] - prefix[qa, kb] - prefix[qb, ka] + prefix[qa, ka]  # [blocks, blocks]
    pairs = (qb - qa) * (kb - ka)
    full = allowed == pairs
    if length % block_size:  # blocks holding the padded tail stay partial (as create_block_mask marks them)
        full[-1, :] = False
        full[:, -1] = False
    partial = (allowed > 0) & ~full

    def indices(selected):  # selected blocks first, in ascending order
        order = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return selected.sum(-1).to(torch.int32)[None, None].to(device), order[None, None].to(device)

    frame_mask = fm.to(device)
    tpf, last_frame = tokens_per_frame, fm.shape[0] - 1

    def mask_mod(b, h, q_idx, kv_idx):  # padded positions are clamped to the last frame (they are masked anyway)
        return frame_mask[torch.clamp(q_idx // tpf, max=last_frame), torch.clamp(kv_idx // tpf, max=last_frame)]

    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(length, length))
