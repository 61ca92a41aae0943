"""Chunk-wise loss weighting of RAVEN (docs/method.md §3.5).

A per-element loss map of a video (DMD surrogate, CM-GRPO regression, KL) is split into its causal chunks
along the latent-frame axis; chunk ``c`` gets a weight ``w_c`` that depends only on the chunk sizes and the
weighting function, normalised so that the element-weighted mean weight is 1. The loss is then the
weighted sum divided by the (global) weighted element count.

Weighting functions (docs/method.md §3.5), with participation ``p_c = sum_{k >= c} n_k / sum_k n_k``:

* ``alpha > 0`` ("shift"): ``omega_c = alpha p_c / (1 + (alpha - 1) p_c)`` -- early chunks weigh more;
* ``alpha < 0``: ``rho_c = p_N / p_c``, ``a = -alpha``, ``omega_c = a rho_c / (1 + (a - 1) rho_c)`` -- LATER
  chunks weigh more (RAVEN uses ``alpha = -1``: the last of 7 equal chunks weighs 7x the first, docs/method.md §5);
* ``alpha = 0`` or ``"uniform"``: all ones;
* ``"ln_<m>_<s>"``: mean logit-normal(m, s) density over ``[p_{c+1}, p_c]``;
* ``"mode_<s>"``: mean density of SD3's mode sampling ``f(tau) = 1 - tau - s (cos^2(pi tau / 2) - 1 + tau)``
  over ``[p_{c+1}, p_c]`` (``f^{-1}`` by 32-step bisection, as the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch


__all__ = [
    "ChunkWeighting",
    "parse_chunk_weighting",
    "chunk_weights",
    "chunk_weighted_count",
    "chunk_weighted_loss",
    "per_chunk_means",
]

_ACCEPTED = (
    "a number alpha (e.g. -1, -0.5, 0, 2; RAVEN uses -1), 'uniform', 'mode_<s>' (e.g. mode_0.81, mode_-0.54, "
    "mode_0_81) or 'ln_<loc>_<scale>' (e.g. ln_0_1)"
)
# f(tau) of mode sampling is a decreasing bijection of [0, 1] only for -1 <= s <= 1 / (pi/2 - 1).
_MODE_SCALE_RANGE = (-1.0, 1.0 / (math.pi / 2 - 1.0))


@dataclass(frozen=True)
class ChunkWeighting:
    """A parsed chunk-weighting function (docs/method.md §3.5).

    Attributes:
        kind: ``"shift"`` (a number alpha; 0 means uniform), ``"uniform"``, ``"logit_normal"`` or ``"mode"``.
        alpha: the shift parameter for ``kind == "shift"``.
        loc, scale: logit-normal location/scale, or the mode scale ``s`` (in ``scale``).
        spec: the original text, for logs and error messages.
    """

    kind: str
    alpha: float = 0.0
    loc: float = 0.0
    scale: float = 1.0
    spec: str = ""

    def __str__(self) -> str:
        return self.spec or self.kind


def _bad(value, why: str = "") -> ValueError:
    why = f" ({why})" if why else ""
    return ValueError(f"Invalid chunk weighting {value!r}{why}. Accepted forms: {_ACCEPTED}.")


def parse_chunk_weighting(spec: Union[str, float, int, ChunkWeighting]) -> ChunkWeighting:
    """Parse ``--chunk_weighting`` (docs/method.md §3.5): a number, ``"uniform"``, ``"mode_<s>"`` or ``"ln_<m>_<s>"``.

    Numbers may be given as strings, including negative ones (``"-1"``, ``"-0.5"``, ``"2"``, ``"0"``).
    ``mode_0.81``, ``mode_-0.54`` and ``mode_0_81`` (= 0.81) are accepted like the reference.
    Raises ``ValueError`` naming the value and the accepted forms otherwise.
    """
    if isinstance(spec, ChunkWeighting):
        return spec
    if isinstance(spec, bool):
        raise _bad(spec)
    if isinstance(spec, (int, float)):
        alpha = float(spec)
        if not math.isfinite(alpha):
            raise _bad(spec, "alpha must be finite; use 'uniform' for the |alpha| -> inf limit")
        return ChunkWeighting(kind="shift", alpha=alpha, spec=str(spec))
    if not isinstance(spec, str):
        raise _bad(spec, f"type {type(spec).__name__}")
    text = spec.strip()
    lowered = text.lower()
    if lowered in ("uniform", "none"):
        return ChunkWeighting(kind="uniform", spec=text)
    try:
        alpha = float(text)
    except ValueError:
        alpha = None
    if alpha is not None:
        if not math.isfinite(alpha):
            raise _bad(spec, "alpha must be finite; use 'uniform' for the |alpha| -> inf limit")
        return ChunkWeighting(kind="shift", alpha=alpha, spec=text)
    parts = lowered.split("_")
    try:
        if parts[0] in ("ln", "logitnormal"):
            if len(parts) != 3:
                raise _bad(spec, "logit-normal needs exactly ln_<loc>_<scale>")
            loc, scale = float(parts[1]), float(parts[2])
            if not (math.isfinite(loc) and math.isfinite(scale)) or scale <= 0:
                raise _bad(spec, "logit-normal loc must be finite and scale > 0")
            return ChunkWeighting(kind="logit_normal", loc=loc, scale=scale, spec=text)
        if parts[0] == "mode":
            if len(parts) == 2:
                scale = float(parts[1])
            elif len(parts) == 3:
                scale = float(f"{parts[1]}.{parts[2]}")
            else:
                raise _bad(spec, "mode needs mode_<s> or mode_<int>_<frac>")
            lo, hi = _MODE_SCALE_RANGE
            if not lo <= scale <= hi:
                raise _bad(spec, f"mode scale s={scale} outside [{lo}, {hi:.4f}] where f(tau) is invertible")
            return ChunkWeighting(kind="mode", scale=scale, spec=text)
    except ValueError as err:
        if str(err).startswith("Invalid chunk weighting"):
            raise
        raise _bad(spec, "could not parse its numbers") from err
    raise _bad(spec)


def _participation(sizes: torch.Tensor) -> torch.Tensor:
    """``p_c = sum_{k >= c} n_k / sum_k n_k``, float64 ``[N]`` (docs/method.md §3.5)."""
    tail = torch.flip(torch.cumsum(torch.flip(sizes, dims=[0]), dim=0), dims=[0])
    return tail / tail[0]


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _mode_inverse(p: torch.Tensor, s: float, iterations: int = 32) -> torch.Tensor:
    """``f^{-1}(p)`` for ``f(tau) = 1 - tau - s (cos^2(pi tau/2) - 1 + tau)`` by bisection (decreasing f)."""
    lo, hi = torch.zeros_like(p), torch.ones_like(p)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        value = 1 - mid - s * (torch.cos(math.pi / 2 * mid) ** 2 - 1 + mid)
        above = value > p
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return (lo + hi) / 2


def _raw_weights(p: torch.Tensor, weighting: ChunkWeighting) -> torch.Tensor:
    """Unnormalised ``omega_c`` of docs/method.md §3.5."""
    if weighting.kind == "uniform" or (weighting.kind == "shift" and weighting.alpha == 0):
        return torch.ones_like(p)
    if weighting.kind == "shift":
        if weighting.alpha > 0:
            a, x = weighting.alpha, p
        else:
            a, x = -weighting.alpha, p[-1] / p
        return a * x / (1 + (a - 1) * x)
    upper = p
    lower = torch.cat([p[1:], p.new_zeros(1)])
    if weighting.kind == "logit_normal":

        def cdf(x):
            z = (torch.logit(x.clamp(1e-6, 1 - 1e-6)) - weighting.loc) / weighting.scale
            return _normal_cdf(z)

        upper_cdf = torch.where(upper >= 1, torch.ones_like(upper), cdf(upper))
        lower_cdf = torch.where(lower <= 0, torch.zeros_like(lower), cdf(lower))
        return (upper_cdf - lower_cdf) / (upper - lower)
    if weighting.kind == "mode":
        return (_mode_inverse(lower, weighting.scale) - _mode_inverse(upper, weighting.scale)) / (upper - lower)
    raise ValueError(f"unknown chunk weighting kind {weighting.kind!r}")


def chunk_weights(
    chunk_sizes: Sequence[int], weighting: Union[str, float, ChunkWeighting]
) -> torch.Tensor:
    """Normalised chunk weights ``w_c`` (docs/method.md §3.5), float64 ``[N]``.

    Args:
        chunk_sizes: ``n_c`` per chunk, in elements or in latent frames (only ratios matter; the first chunk
            may differ in size, docs/method.md §1.4).
        weighting: anything ``parse_chunk_weighting`` accepts.
    Returns:
        ``w_c = omega_c * sum(n) / sum(omega_c n_c)``, so ``sum(w_c n_c) == sum(n_c)``.
    Raises:
        ValueError on empty / non-positive sizes or a weighting that yields negative weights.
    """
    weighting = parse_chunk_weighting(weighting)
    sizes = [int(n) for n in chunk_sizes]
    if not sizes or any(n <= 0 for n in sizes):
        raise ValueError(f"chunk_sizes must be a non-empty list of positive ints, got {list(chunk_sizes)}.")
    n = torch.tensor(sizes, dtype=torch.float64)
    raw = _raw_weights(_participation(n), weighting)
    if not torch.isfinite(raw).all() or (raw < 0).any():
        raise ValueError(
            f"chunk weighting {str(weighting)!r} produced invalid weights {raw.tolist()} for chunk sizes {sizes}; "
            f"weights must be finite and >= 0. Accepted forms: {_ACCEPTED}."
        )
    total = (raw * n).sum()
    if total <= 0:
        raise ValueError(f"chunk weighting {str(weighting)!r} gives zero total weight for chunk sizes {sizes}.")
    return raw * n.sum() / total


def _frame_weights(
    per_element: torch.Tensor, frames_per_chunk: Sequence[int], weighting, frame_dim: int
) -> torch.Tensor:
    """Per-frame weight vector float64 ``[F]`` on ``per_element``'s device; validates the chunking."""
    frames = [int(f) for f in frames_per_chunk]
    num_frames = per_element.shape[frame_dim]
    if sum(frames) != num_frames:
        raise ValueError(
            f"frames_per_chunk {frames} sums to {sum(frames)} but the loss map has {num_frames} frames on dim "
            f"{frame_dim} (shape {tuple(per_element.shape)}); pass transformer.chunk_sizes({num_frames})."
        )
    w = chunk_weights(frames, weighting)  # frames are proportional to elements within one sample
    return torch.repeat_interleave(w, torch.tensor(frames)).to(per_element.device)


def chunk_weighted_count(
    per_element: torch.Tensor,
    frames_per_chunk: Sequence[int],
    weighting: Union[str, float, ChunkWeighting],
    frame_dim: int = 2,
) -> torch.Tensor:
    """Local denominator ``sum_samples sum_c w_c n_c`` of docs/method.md §3.5, float64 scalar.

    All-reduce (sum) it across processes and pass it as ``global_weighted_count`` to
    ``chunk_weighted_loss`` for the exact reference reduction. (Because the weights are normalised it equals
    the local element count ``per_element.numel()``; it is computed explicitly for clarity.)
    """
    w = _frame_weights(per_element, frames_per_chunk, weighting, frame_dim)
    elements_per_frame = per_element.numel() // per_element.shape[frame_dim]
    return (w * elements_per_frame).sum()


def chunk_weighted_loss(
    per_element: torch.Tensor,
    frames_per_chunk: Sequence[int],
    weighting: Union[str, float, ChunkWeighting],
    global_weighted_count: Optional[Union[torch.Tensor, float]] = None,
    world_size: int = 1,
    frame_dim: int = 2,
) -> torch.Tensor:
    """Chunk-weighted reduction of a per-element loss map (docs/method.md §3.5).

    ``loss = sum_b sum_c w_c L_{b,c} / D * world_size`` with ``L_{b,c}`` the sum of ``per_element`` over chunk
    ``c`` of sample ``b`` and ``D = sum_{ranks} sum_b sum_c w_c n_c``. With gradient averaging across
    ``world_size`` data-parallel ranks (DDP/FSDP) the effective gradient is the global weighted mean.

    Args:
        per_element: ``[B, C, F, H, W]`` per-element loss (MSE to a target, or a DMD/CM-GRPO surrogate).
            Any layout works if ``frame_dim`` is the latent-frame axis and dim 0 the batch.
        frames_per_chunk: latent frames per chunk, summing to ``F`` (``CausalWanTransformer3DModel.chunk_sizes``).
        weighting: anything ``parse_chunk_weighting`` accepts (RAVEN: ``-1``).
        global_weighted_count: ``D`` already all-reduced over ranks (sum of ``chunk_weighted_count``). If
            ``None``, every rank is assumed to hold the same count: ``D = local_count * world_size``.
        world_size: number of data-parallel processes.
    Returns:
        float64 scalar (backpropagates into ``per_element``).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}.")
    if per_element.dim() < 2:
        raise ValueError(f"per_element must have a batch and a frame axis, got shape {tuple(per_element.shape)}.")
    frame_dim = frame_dim % per_element.dim()
    if frame_dim == 0:
        raise ValueError("frame_dim cannot be the batch axis 0.")
    w = _frame_weights(per_element, frames_per_chunk, weighting, frame_dim)
    other = [d for d in range(1, per_element.dim()) if d != frame_dim]
    per_frame = per_element.double().sum(dim=other) if other else per_element.double()  # [B, F]
    numerator = (per_frame * w).sum()
    if global_weighted_count is None:
        elements_per_frame = per_element.numel() // per_element.shape[frame_dim]
        denominator = (w * elements_per_frame).sum() * world_size
    else:
        denominator = torch.as_tensor(global_weighted_count, dtype=torch.float64, device=per_element.device)
    return numerator / denominator * world_size


def per_chunk_means(per_element: torch.Tensor, frames_per_chunk: Sequence[int], frame_dim: int = 2) -> torch.Tensor:
    """Unweighted mean of ``per_element`` per chunk, detached float64 ``[N]`` (for logging losses per chunk)."""
    frames = [int(f) for f in frames_per_chunk]
    if sum(frames) != per_element.shape[frame_dim]:
        raise ValueError(f"frames_per_chunk {frames} does not sum to {per_element.shape[frame_dim]} frames.")
    chunks = torch.split(per_element.detach().double(), frames, dim=frame_dim)
    return torch.stack([c.mean() for c in chunks])
