"""Ground-truth metrics of the video world: an object detector, prompt-conditioned video scores, Fréchet distance.

Detector (:func:`detect_objects`, per frame, no learning): every pixel is explained as a mix of the background
and one palette colour, ``pixel ~ bg + alpha * (colour - bg)``; the colour with the smallest residual wins. A
colour's pixels with ``alpha >= 0.5`` and a residual below ``max_residual`` form its mask; connected components
with no 2x2 block (1-px slivers where two objects' anti-aliased edges mix into a third colour) or a tiny area are
dropped. Each component is measured with its soft ``alpha`` weights (sub-pixel centroid, area) and its shape is
classified from normalised central moments: an upright triangle is vertically skewed (skewness -0.57), a square
is heavier-tailed along its diagonals than along its axes (kurtosis 2.4 vs 1.8), a circle is isotropic.

Scores (:func:`score_video`): the prompt is parsed back into objects; an object is tracked by its colour (its
identity in this world) as the largest component of that colour in each frame. A detection is *reliable* unless
it touches another object and (for sizes that should be constant) its area is off by more than 10 %, i.e. it may
be partly hidden; only reliable frames are used to judge shape, size and motion. Per window of ``window`` frames
(81 by default, so drift shows at 2x and 4x lengths) the accuracies in [0, 1] are:

* ``count_accuracy``: frames whose object count equals the prompt's (distinct colours, plus any second
  component of a colour at least half as large as its largest);
* ``colour_accuracy``: prompted objects found (by colour), averaged over frames;
* ``shape_accuracy``: of the reliable detections of prompted objects, those with the prompted shape;
* ``background_accuracy``: frames whose estimated background is nearest the prompted one;
* ``direction_accuracy``: motion steps (``lag`` frames apart, between reliable frames whose areas differ by at
  most 15 %) that agree with the prompt: straight lines move along the prompted direction, away from a wall
  after each wall contact, at >= 40 % of the prompted speed along each moving axis, and not across it; still
  objects drift < 0.2 px/frame; orbits turn clockwise around the frame centre; growing objects grow in place;
* ``speed_accuracy``: objects whose median measured speed is nearer (in log ratio) the prompted speed word than
  the other one; ``speed_error`` (not an accuracy) is ``|measured - prompted| / prompted``;
* ``bounce_accuracy`` (straight-line objects): the fraction of right bounce events: after a bounce (the closest
  approach to the wall it was heading for) the object must move away; a reversal away from the walls is wrong;
  and (if the video is that long) the bounces in the first ``caption_frames`` frames must match the prompt;
* ``persistence_accuracy``: frames where an object is found and, when reliable, keeps the window's modal shape,
  its median size (within 25 %, not for ``grows``) and does not jump more than ``3 * 1.6`` px/frame (at 64 px).

A *cluttered* frame, with more than ``CLUTTER_MARGIN`` (2) components beyond the prompted objects, shows none of
them (decoded noise would otherwise find every colour somewhere and collect colour, motion and persistence credit).

An accuracy that does not apply (no straight-line object for ``bounce_accuracy``, an object never measurable)
is NaN, and ``world_score`` is the mean of the others. A prompted object never found in a window scores 0 on
every motion metric there. Lengths are px at the video's resolution; speeds are scaled by ``min(H, W) / 64``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import linalg, ndimage

from .captions import parse_caption
from .scene import BACKGROUNDS, BASE_RESOLUTION, COLOURS, GROWTH_RATE, LINEAR_MOTIONS, LINEAR_SPEED, ObjectSpec

__all__ = [
    "ACCURACY_KEYS",
    "Detection",
    "VideoScore",
    "detect_objects",
    "estimate_background",
    "score_video",
    "world_score_of",
    "score_videos",
    "feature_statistics",
    "frechet_distance",
]

ACCURACY_KEYS: tuple[str, ...] = ("count_accuracy", "colour_accuracy", "shape_accuracy", "background_accuracy",
                                  "direction_accuracy", "speed_accuracy", "bounce_accuracy", "persistence_accuracy")
#: Area of each shape over the area of its ``size x size`` box.
_AREA_FACTOR = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
_TRIANGLE_SKEW = -0.25      # vertical skewness below this: triangle (ideal -0.57, circle and square 0)
_SQUARE_KURTOSIS_GAP = 0.3  # diagonal minus axis kurtosis above this: square (ideal 0.6, circle 0)
_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _PALETTE_NAMES], dtype=np.float32)  # [K, 3]
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Detection:
    """One detected object in one frame, in px.

    ``x, y``: centre of its ``size x size`` box (from the soft centroid); ``area``: soft area; ``size`` from
    the area and the shape; ``box``: sub-pixel extent ``(left, top, right, bottom)`` of its visible pixels;
    ``touching``: another colour lies within 2 px (so the object may be partly hidden, and its shape, size and
    centroid are less reliable).
    """

    colour: str
    shape: str
    x: float
    y: float
    size: float
    area: float
    box: tuple[float, float, float, float]
    touching: bool


# ------------------------------------------------------------------------------------------------ detector

#: A frame with more than ``prompted objects + CLUTTER_MARGIN`` components counts as showing none of them.
CLUTTER_MARGIN = 2


def _as_float_video(frames: np.ndarray) -> np.ndarray:
    """``[F, H, W, 3]`` uint8, or float in [0, 1] (rounded) -> ``float32 [F, H, W, 3]`` in [0, 255]."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got shape {tuple(frames.shape)}; pass one video.")
    if frames.dtype == np.uint8:
        return frames.astype(np.float32)
    if np.issubdtype(frames.dtype, np.floating):
        return np.rint(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.float32)
    raise ValueError(f"frames dtype {frames.dtype} is not supported; pass uint8 in [0, 255] or float in [0, 1].")


def estimate_background(frame: np.ndarray) -> np.ndarray:
    """Background colour of one frame ``[H, W, 3]`` (0-255): median of the pixels farther than 70 from every
    object colour (all backgrounds are >= 140 away), or of all pixels if none is. Returns ``[3]``."""
    pixels = np.asarray(frame, dtype=np.float32).reshape(-1, 3)
    squared = (pixels ** 2).sum(1, keepdims=True) - 2 * pixels @ _PALETTE.T + (_PALETTE ** 2).sum(1)  # [P, K]
    far = squared.min(axis=1) > 70.0 ** 2
    return np.median(pixels[far] if far.any() else pixels, axis=0)


def _background_name(colour: np.ndarray) -> str:
    names = list(BACKGROUNDS)
    distances = [np.linalg.norm(colour - np.asarray(BACKGROUNDS[name])) for name in names]
    return names[int(np.argmin(distances))]


def _background_rgb(background: str | Sequence[float]) -> np.ndarray:
    if isinstance(background, str):
        if background not in BACKGROUNDS:
            raise ValueError(f"unknown background {background!r}; use one of {list(BACKGROUNDS)} or an RGB triple.")
        return np.asarray(BACKGROUNDS[background], dtype=np.float32)
    return np.asarray(background, dtype=np.float32).reshape(3)


def _explain_pixels(frame: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel of ``float32 [H, W, 3]``: best palette index, its alpha and its residual, each ``[H, W]``."""
    offset = frame - background                                            # [H, W, 3]
    directions = _PALETTE - background                                     # [K, 3]
    lengths = np.maximum((directions ** 2).sum(1), 1.0)                    # [K]
    projection = offset @ directions.T                                     # [H, W, K]
    alpha = np.clip(projection / lengths, 0.0, 1.0)
    squared = (offset ** 2).sum(-1, keepdims=True) - 2 * alpha * projection + alpha ** 2 * lengths
    best = squared.argmin(axis=-1)
    pick = best[..., None]
    residual = np.sqrt(np.maximum(np.take_along_axis(squared, pick, -1)[..., 0], 0.0))
    return best, np.take_along_axis(alpha, pick, -1)[..., 0], residual


def _moments(weights: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[float, float, float, str]:
    """Soft area, centroid ``(x, y)`` and shape class of a weight patch ``[h, w]`` at pixel centres."""
    area = float(weights.sum())
    x = cols + 0.5
    y = rows + 0.5
    cx = float((weights * x).sum() / area)
    cy = float((weights * y).sum() / area)
    dx, dy = x - cx, y - cy

    def central(values: np.ndarray, power: int) -> float:
        return float((weights * values ** power).sum() / area)

    var_y = max(central(dy, 2), 1e-9)
    skew_y = central(dy, 3) / var_y ** 1.5
    u, v = (dx + dy) / math.sqrt(2.0), (dx - dy) / math.sqrt(2.0)
    kurtosis = [central(c, 4) / max(central(c, 2), 1e-9) ** 2 for c in (dx, dy, u, v)]
    gap = (kurtosis[2] + kurtosis[3] - kurtosis[0] - kurtosis[1]) / 2
    if skew_y < _TRIANGLE_SKEW:
        shape = "triangle"
    elif gap > _SQUARE_KURTOSIS_GAP:
        shape = "square"
    else:
        shape = "circle"
    return area, cx, cy, shape


def _extent(weights: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[float, float, float, float]:
    """Sub-pixel ``(left, top, right, bottom)`` of a weight patch ``[h, w]``: along each row (column), its first
    and last covered pixel extend the shape by their coverage from the side facing the inside."""
    covered = weights > 0.05
    sides = []
    for axis, coords in ((1, cols), (0, rows)):
        lines = covered.any(axis=axis)
        cover = np.moveaxis(np.where(covered, weights, 0.0), axis, -1)[lines]       # [lines, along]
        coord = np.moveaxis(coords, axis, -1)[lines]
        first = np.argmax(cover > 0, axis=-1)
        last = cover.shape[-1] - 1 - np.argmax(cover[:, ::-1] > 0, axis=-1)
        line = np.arange(cover.shape[0])
        sides.append((float(np.min(coord[line, first] + 1 - cover[line, first])),
                      float(np.max(coord[line, last] + cover[line, last]))))
    (left, right), (top, bottom) = sides
    return left, top, right, bottom


def _measure(component: np.ndarray, soft: np.ndarray, others: np.ndarray, colour: str) -> Detection:
    """A :class:`Detection` from a component mask, its colour's soft alpha and the other colours' pixels
    (all ``[H, W]``)."""
    height, width = component.shape
    rows, cols = np.nonzero(component)
    r0, r1 = max(rows.min() - 2, 0), min(rows.max() + 3, height)
    c0, c1 = max(cols.min() - 2, 0), min(cols.max() + 3, width)
    near = ndimage.binary_dilation(component[r0:r1, c0:c1], _EIGHT, iterations=2)
    weights = np.where(near, soft[r0:r1, c0:c1], 0.0)
    grid_r, grid_c = np.mgrid[r0:r1, c0:c1]
    area, cx, cy, shape = _moments(weights, grid_r, grid_c)
    size = math.sqrt(area / _AREA_FACTOR[shape])
    if shape == "triangle":  # the centroid of an upright triangle lies size / 6 below its box centre
        cy -= size / 6
    touching = bool((near & others[r0:r1, c0:c1]).any())
    return Detection(colour=colour, shape=shape, x=cx, y=cy, size=size, area=area,
                     box=_extent(weights, grid_r, grid_c), touching=touching)


def _detect_frame(frame: np.ndarray, background: np.ndarray, min_area: float,
                  max_residual: float) -> list[Detection]:
    best, alpha, residual = _explain_pixels(frame, background)
    trusted = residual < max_residual
    claimed = trusted & (alpha >= 0.5)
    detections = []
    for index in np.unique(best[claimed]):
        mask = claimed & (best == index)
        others = claimed & (best != index)
        labels, _ = ndimage.label(mask, structure=_EIGHT)
        solid = np.unique(labels[ndimage.binary_erosion(mask, np.ones((2, 2), dtype=bool))])
        soft = np.where(trusted & (best == index) & ~others, alpha, 0.0)
        soft[soft < 0.05] = 0.0
        for label in solid[solid > 0]:
            detection = _measure(labels == label, soft, others, _PALETTE_NAMES[index])
            if detection.area >= min_area:
                detections.append(detection)
    return sorted(detections, key=lambda d: (_PALETTE_NAMES.index(d.colour), -d.area))


def detect_objects(frames: np.ndarray, background: str | Sequence[float] | None = None,
                   min_area: float | None = None, max_residual: float = 60.0) -> list[list[Detection]]:
    """Detect palette-coloured objects in every frame.

    Args:
        frames: ``uint8 [F, H, W, 3]`` (or float in [0, 1]).
        background: a background name, an RGB triple, or ``None`` to estimate it per frame
            (:func:`estimate_background`).
        min_area: smallest soft area in px kept (default ``4 * (min(H, W) / 64) ** 2``).
        max_residual: largest RGB distance between a pixel and its background-to-colour mix.
    Returns:
        Per frame, the detections sorted by palette order, then by decreasing area.
    """
    return _detect_video(_as_float_video(frames), background, min_area, max_residual)[0]


def _detect_video(video: np.ndarray, background: str | Sequence[float] | None, min_area: float | None,
                  max_residual: float) -> tuple[list[list[Detection]], np.ndarray]:
    """:func:`detect_objects` of a ``float32 [F, H, W, 3]`` video in [0, 255], and the backgrounds ``[F, 3]``."""
    if background is None:
        backgrounds = np.stack([estimate_background(frame) for frame in video])
    else:
        backgrounds = np.broadcast_to(_background_rgb(background), (video.shape[0], 3))
    scale = min(video.shape[1:3]) / BASE_RESOLUTION
    area = 4.0 * scale ** 2 if min_area is None else min_area
    detections = [_detect_frame(frame, bg, area, max_residual) for frame, bg in zip(video, backgrounds)]
    return detections, backgrounds


# ------------------------------------------------------------------------------------------ video scores


@dataclass(frozen=True)
class VideoScore:
    """Scores of one video: ``summary`` (whole video) and one dict per window, same keys.

    Keys: :data:`ACCURACY_KEYS` (in [0, 1], NaN when not applicable), ``speed_error`` (>= 0, NaN when no
    object moves) and ``world_score`` (mean of the available accuracies). ``summary`` is the frame-weighted
    mean of the windows. ``window_bounds[i]`` is window ``i``'s ``(start, stop)`` frame range.
    """

    summary: dict[str, float]
    windows: tuple[dict[str, float], ...]
    window_bounds: tuple[tuple[int, int], ...]

    @property
    def world_score(self) -> float:
        return self.summary["world_score"]


@dataclass(frozen=True)
class _Track:
    """An object followed by colour, per frame ``[F]`` (NaN, ``""`` or ``False`` where it is not found).

    ``left, top, right, bottom``: :attr:`Detection.box`; ``reliable``: found, and either not touching another
    object or (unless it grows) with an area within 10 % of its median untouched area, i.e. not partly hidden;
    only reliable frames are measured for shape, size and motion.
    """

    x: np.ndarray
    y: np.ndarray
    size: np.ndarray
    area: np.ndarray
    left: np.ndarray
    top: np.ndarray
    right: np.ndarray
    bottom: np.ndarray
    shape: np.ndarray
    reliable: np.ndarray

    @property
    def present(self) -> np.ndarray:
        return ~np.isnan(self.x)


@dataclass(frozen=True)
class _Motion:
    """Motion checks of one object over the whole video, indexed by frame.

    ``checked[t]`` / ``correct[t]``: the step from ``t`` to ``t + lag`` was checked / agreed with the prompt;
    ``speed[t]``: its measured speed (NaN if not measured); ``events``: ``(frame, correct)`` bounce events.
    """

    lag: int
    checked: np.ndarray
    correct: np.ndarray
    speed: np.ndarray
    events: list[tuple[int, bool]]


def _reliable(area: np.ndarray, touching: np.ndarray, grows: bool) -> np.ndarray:
    """See :class:`_Track`; ``area`` is NaN where the object is not found."""
    present = ~np.isnan(area)
    clear = present & ~touching
    if grows or not present.any():
        return clear
    median = np.median(area[clear] if clear.any() else area[present])
    with np.errstate(invalid="ignore"):
        return clear | (present & (np.abs(area - median) <= 0.1 * median))


def _tracks(detections: list[list[Detection]], objects: Sequence[ObjectSpec]) -> dict[str, _Track]:
    """Per prompted object, its colour's largest detection in each frame."""
    num_frames = len(detections)
    tracks = {}
    for obj in objects:
        values = np.full((8, num_frames), np.nan)
        shapes = np.full(num_frames, "", dtype=object)
        touching = np.zeros(num_frames, dtype=bool)
        for t, frame in enumerate(detections):
            found = [d for d in frame if d.colour == obj.colour]
            if found:
                best = max(found, key=lambda d: d.area)
                values[:, t] = best.x, best.y, best.size, best.area, *best.box
                shapes[t], touching[t] = best.shape, best.touching
        reliable = _reliable(values[3], touching, obj.motion == "grows")
        tracks[obj.colour] = _Track(*values, shape=shapes, reliable=reliable)
    return tracks


def _object_count(frame: list[Detection]) -> int:
    """Distinct colours, plus further components of a colour at least half as large as its largest."""
    count = 0
    for colour in {d.colour for d in frame}:
        areas = [d.area for d in frame if d.colour == colour]
        count += sum(area >= 0.5 * max(areas) for area in areas)
    return count


def _ahead(values: np.ndarray, lag: int) -> np.ndarray:
    """``[F]``: ``values[t + lag]``, NaN past the end."""
    out = np.full(values.shape, np.nan)
    if lag < values.shape[0]:
        out[:-lag] = values[lag:]
    return out


def _lagged(values: np.ndarray, lag: int) -> np.ndarray:
    """``[F]``: ``(values[t + lag] - values[t]) / lag``, NaN past the end."""
    return (_ahead(values, lag) - values) / lag


def _steady(track: _Track, lag: int) -> np.ndarray:
    """``[F]``: both ends of the step ``t -> t + lag`` are reliable and their areas differ by at most 15 %."""
    later = _ahead(track.area, lag)
    with np.errstate(invalid="ignore"):
        return _both_reliable(track, lag) & (np.abs(later - track.area) <= 0.15 * np.maximum(later, track.area))


def _both_reliable(track: _Track, lag: int) -> np.ndarray:
    """``[F]``: frames ``t`` and ``t + lag`` are both reliable."""
    return track.reliable & (_ahead(track.reliable.astype(np.float64), lag) == 1.0)


def _around(mask: np.ndarray, before: int, after: int) -> np.ndarray:
    """``[F]``: ``mask`` is true somewhere in ``[t - before, t + after]``."""
    window = np.ones(before + after + 1)
    return np.convolve(mask, window, mode="full")[after: after + mask.shape[0]] > 0


def _closest_approaches(gap: np.ndarray, tol: float) -> list[int]:
    """One frame per visit of the zone ``gap <= tol`` (a run of found frames): its smallest gap. An object
    resting on a wall makes one visit, however long."""
    frames = np.flatnonzero(~np.isnan(gap))
    inside = np.concatenate([[False], gap[frames] <= tol, [False]])
    edges = np.flatnonzero(inside[1:] != inside[:-1])  # alternating starts and stops, in ``frames`` indices
    visits = [frames[start:stop] for start, stop in zip(edges[::2], edges[1::2])]
    return [int(visit[np.argmin(gap[visit])]) for visit in visits]


def _wall_contacts(low: np.ndarray, high: np.ndarray, sign: int,
                   tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Follow one axis of a straight-line motion from the gaps ``[F]`` to its low and high walls (NaN where
    the object is not found).

    A *contact* is a closest approach to a wall (:func:`_closest_approaches`). The expected sign starts as the
    prompted one and points away from the wall after each contact; a contact with the wall it pointed at is a
    *bounce*. Returns ``(expected sign, contact, bounce)``, each ``[F]``.
    """
    contacts = {t: wall for wall, gap in ((-1, low), (1, high)) for t in _closest_approaches(gap, tol)}
    expected = np.zeros(low.shape, dtype=np.int64)
    contact = np.zeros(low.shape, dtype=bool)
    bounce = np.zeros(low.shape, dtype=bool)
    for t in range(low.shape[0]):
        if t in contacts:
            contact[t], bounce[t] = True, sign == contacts[t]
            sign = -contacts[t]
        expected[t] = sign
    return expected, contact, bounce


def _wall_gaps(track: _Track, shape_hw: tuple[int, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per axis, the gaps ``[F]`` to the low and high walls: from the centre and size when reliable, else from
    the visible extent (an object partly hidden near a wall still shows its wall side)."""
    height, width = shape_hw
    half = track.size / 2
    return {
        "x": (np.where(track.reliable, track.x - half, track.left),
              np.where(track.reliable, width - track.x - half, width - track.right)),
        "y": (np.where(track.reliable, track.y - half, track.top),
              np.where(track.reliable, height - track.y - half, height - track.bottom)),
    }


def _linear_motion(track: _Track, obj: ObjectSpec, claimed: int, shape_hw: tuple[int, int], scale: float,
                   lag: int, caption_frames: int) -> _Motion:
    """Straight lines: each axis moves with its expected sign (or stays still if the prompt has no motion
    along it); steps that may include a bounce (those within ``tol / speed`` frames of a contact) are not
    checked; bounces are scored as events."""
    speed = LINEAR_SPEED[obj.speed] * scale
    steady = _steady(track, lag)
    checked = np.zeros(steady.shape, dtype=bool)
    correct = steady.copy()
    clear = steady.copy()  # no wall contact near the step: its speed is measurable
    events: list[tuple[int, bool]] = []
    bounces = 0
    unit_x, unit_y = LINEAR_MOTIONS[obj.motion]
    gaps = _wall_gaps(track, shape_hw)
    for centre, unit, (low, high) in ((track.x, unit_x, gaps["x"]), (track.y, unit_y, gaps["y"])):
        step = _lagged(centre, lag)
        if unit == 0.0:
            with np.errstate(invalid="ignore"):
                correct &= np.abs(step) <= max(0.4 * speed, 0.2 * scale)
            checked |= steady
            continue
        axis_speed = speed * abs(unit)
        tol = 0.5 * axis_speed + max(scale, 1.0)
        expected, contact, bounce = _wall_contacts(low, high, int(np.sign(unit)), tol)
        reach = math.ceil(tol / axis_speed)
        near = _around(contact, reach, lag + reach)
        axis_checked = steady & ~near
        with np.errstate(invalid="ignore"):
            fast = np.abs(step) >= 0.4 * axis_speed
            agrees = (np.sign(step) == expected) & fast
            wrong_way = axis_checked & (np.sign(step) == -expected) & fast
        correct &= agrees | ~axis_checked
        checked |= axis_checked
        clear &= ~near
        for t in np.flatnonzero(bounce):
            later = np.flatnonzero(axis_checked[t + 1:])
            if later.size:
                events.append((int(t), bool(agrees[t + 1 + later[0]])))
        starts = np.flatnonzero(wrong_way & ~np.concatenate([[False], wrong_way[:-1]]))
        events.extend((int(t), False) for t in starts)  # reversals away from a wall
        bounces += int(bounce[:caption_frames].sum())
    if track.x.shape[0] >= caption_frames:  # the prompt's bounce clause, when the video covers its frames
        events.append((0, min(bounces, 2) == claimed))
    step_speed = np.hypot(_lagged(track.x, lag), _lagged(track.y, lag))
    return _Motion(lag, checked, correct & checked, np.where(checked & clear, step_speed, np.nan), events)


def _still_motion(track: _Track, scale: float, lag: int) -> _Motion:
    steady = _steady(track, lag)
    drift = np.hypot(_lagged(track.x, lag), _lagged(track.y, lag))
    with np.errstate(invalid="ignore"):
        correct = steady & (drift <= 0.2 * scale)
    return _Motion(lag, steady, correct, np.full(drift.shape, np.nan), [])


def _grow_motion(track: _Track, obj: ObjectSpec, scale: float, lag: int) -> _Motion:
    """Growth is slow (0.05-0.1 px/frame), so it is measured over ``4 * lag`` frames, between reliable frames."""
    lag = 4 * lag
    checked = _both_reliable(track, lag)
    growth = _lagged(track.size, lag)
    drift = np.hypot(_lagged(track.x, lag), _lagged(track.y, lag))
    with np.errstate(invalid="ignore"):
        correct = checked & (growth >= 0.4 * GROWTH_RATE[obj.speed] * scale) & (drift <= 0.2 * scale)
    return _Motion(lag, checked, correct, np.where(checked, growth, np.nan), [])


def _orbit_motion(track: _Track, obj: ObjectSpec, shape_hw: tuple[int, int], scale: float, lag: int) -> _Motion:
    """Clockwise on screen (the angle atan2(y - cy, x - cx) increases, y pointing down)."""
    steady = _steady(track, lag)
    dx, dy = track.x - shape_hw[1] / 2, track.y - shape_hw[0] / 2
    turn = _lagged(np.arctan2(dy, dx), lag) * lag
    turn = (turn + np.pi) % (2 * np.pi) - np.pi
    orbit_speed = np.hypot(dx, dy) * turn / lag
    with np.errstate(invalid="ignore"):
        correct = steady & (turn > 0) & (orbit_speed >= 0.4 * LINEAR_SPEED[obj.speed] * scale)
    return _Motion(lag, steady, correct, np.where(steady, np.abs(orbit_speed), np.nan), [])


def _motion(track: _Track, obj: ObjectSpec, claimed: int, shape_hw: tuple[int, int], scale: float, lag: int,
            caption_frames: int) -> _Motion:
    if obj.motion in LINEAR_MOTIONS:
        return _linear_motion(track, obj, claimed, shape_hw, scale, lag, caption_frames)
    if obj.motion == "still":
        return _still_motion(track, scale, lag)
    if obj.motion == "grows":
        return _grow_motion(track, obj, scale, lag)
    return _orbit_motion(track, obj, shape_hw, scale, lag)


def _window_bounds(num_frames: int, window: int) -> tuple[tuple[int, int], ...]:
    """Consecutive windows of ``window`` frames; a last one shorter than ``window / 2`` joins the previous one."""
    starts = list(range(0, num_frames, window))
    if len(starts) > 1 and num_frames - starts[-1] < window / 2:
        starts.pop()
    return tuple((start, stops) for start, stops in zip(starts, starts[1:] + [num_frames]))


def _prompted_speed(obj: ObjectSpec, scale: float) -> tuple[float, float]:
    """``(prompted speed, slow/quick boundary)`` in px/frame (size px/frame for ``grows``)."""
    table = GROWTH_RATE if obj.motion == "grows" else LINEAR_SPEED
    return table[obj.speed] * scale, math.sqrt(table["slowly"] * table["quickly"]) * scale


def _object_window(track: _Track, motion: _Motion, obj: ObjectSpec, start: int, stop: int,
                   scale: float) -> dict[str, float]:
    """Motion scores of one object in frames ``[start, stop)``: all 0 when it is never found there, NaN when it
    is found but no step could be checked (e.g. it touches another object throughout)."""
    nan = float("nan")
    moving = obj.motion != "still"
    linear = obj.motion in LINEAR_MOTIONS
    if not track.present[start:stop].any():
        return {"direction": 0.0, "speed_accuracy": 0.0 if moving else nan, "speed_error": 1.0 if moving else nan,
                "bounce": 0.0 if linear else nan}
    steps = slice(start, max(start, stop - motion.lag))
    checked = motion.checked[steps]
    scores = {"direction": float(motion.correct[steps].sum() / checked.sum()) if checked.any() else nan,
              "speed_accuracy": nan, "speed_error": nan, "bounce": nan}
    measured = motion.speed[steps][~np.isnan(motion.speed[steps])]
    if moving and measured.size:
        measured = float(np.median(measured))
        prompted, boundary = _prompted_speed(obj, scale)
        scores["speed_accuracy"] = float((measured > boundary) == (obj.speed == "quickly"))
        scores["speed_error"] = abs(measured - prompted) / prompted
    events = [correct for frame, correct in motion.events if start <= frame < stop]
    if events:
        scores["bounce"] = float(np.mean(events))
    return scores


def _persistence(track: _Track, obj: ObjectSpec, start: int, stop: int, jump: float) -> float:
    """Fraction of frames in ``[start, stop)`` where the object is found and, when reliable, keeps the window's
    modal shape and median size (not for ``grows``) and does not jump from the previous reliable frame."""
    present = track.present[start:stop]
    if not present.any():
        return 0.0
    reliable = track.reliable[start:stop]
    judged = reliable if reliable.any() else present
    shapes = track.shape[start:stop]
    values, counts = np.unique(shapes[judged].astype(str), return_counts=True)
    keeps = shapes == values[np.argmax(counts)]
    if obj.motion != "grows":
        size = track.size[start:stop]
        median = np.median(size[judged])
        with np.errstate(invalid="ignore"):
            keeps &= np.abs(size - median) <= 0.25 * median
    moved = np.hypot(np.diff(track.x[start:stop]), np.diff(track.y[start:stop]))
    keeps[1:] &= ~((moved > jump) & reliable[1:] & reliable[:-1])
    return float((present & (keeps | ~reliable)).mean())


def _nanmean(values: Iterable[float]) -> float:
    values = np.asarray(list(values), dtype=np.float64)
    return float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() else float("nan")


def _with_world_score(scores: dict[str, float]) -> dict[str, float]:
    return {**scores, "world_score": _nanmean(scores[key] for key in ACCURACY_KEYS)}


@dataclass(frozen=True)
class _Evidence:
    """What :func:`score_video` measured: per prompted object (rows ``[N, F]``) and per frame (``[F]``)."""

    objects: tuple[ObjectSpec, ...]
    tracks: dict[str, _Track]
    motions: list[_Motion]
    count_ok: np.ndarray
    found: np.ndarray
    reliable: np.ndarray
    right_shape: np.ndarray
    background_ok: np.ndarray
    scale: float


def _gather(video: np.ndarray, prompt: str, caption_frames: int, lag: int,
            background: str | Sequence[float] | None) -> _Evidence:
    parsed = parse_caption(prompt)
    height, width = video.shape[1:3]
    scale = min(height, width) / BASE_RESOLUTION
    detections, backgrounds = _detect_video(video, background, None, 60.0)
    objects = parsed.scene.objects
    # a cluttered frame (decoded noise, a broken sample) shows no prompted object: without this, blobs of every colour
    # would collect colour, motion and persistence credit
    detections = [frame if len(frame) <= len(objects) + CLUTTER_MARGIN else [] for frame in detections]
    tracks = _tracks(detections, objects)
    return _Evidence(
        objects=objects,
        tracks=tracks,
        motions=[_motion(tracks[obj.colour], obj, claimed, (height, width), scale, lag, caption_frames)
                 for obj, claimed in zip(objects, parsed.bounces)],
        count_ok=np.array([_object_count(frame) == len(objects) for frame in detections]),
        found=np.stack([tracks[obj.colour].present for obj in objects]),
        reliable=np.stack([tracks[obj.colour].reliable for obj in objects]),
        right_shape=np.stack([tracks[obj.colour].shape == obj.shape for obj in objects]),
        background_ok=np.array([_background_name(bg) == parsed.scene.background for bg in backgrounds]),
        scale=scale,
    )


def _window_scores(evidence: _Evidence, start: int, stop: int) -> dict[str, float]:
    """Every score of frames ``[start, stop)``."""
    frames = slice(start, stop)
    per_object = [_object_window(evidence.tracks[obj.colour], motion, obj, start, stop, evidence.scale)
                  for obj, motion in zip(evidence.objects, evidence.motions)]
    found = evidence.found[:, frames]
    judged = evidence.reliable[:, frames] if evidence.reliable[:, frames].any() else found
    jump = 3 * LINEAR_SPEED["quickly"] * evidence.scale
    return _with_world_score({
        "count_accuracy": float(evidence.count_ok[frames].mean()),
        "colour_accuracy": float(found.mean()),
        "shape_accuracy": float(evidence.right_shape[:, frames][judged].mean()) if judged.any() else 0.0,
        "background_accuracy": float(evidence.background_ok[frames].mean()),
        "direction_accuracy": _nanmean(s["direction"] for s in per_object),
        "speed_accuracy": _nanmean(s["speed_accuracy"] for s in per_object),
        "bounce_accuracy": _nanmean(s["bounce"] for s in per_object),
        "persistence_accuracy": _nanmean(_persistence(evidence.tracks[obj.colour], obj, start, stop, jump)
                                         for obj in evidence.objects),
        "speed_error": _nanmean(s["speed_error"] for s in per_object),
    })


def score_video(frames: np.ndarray, prompt: str, window: int = 81, caption_frames: int = 81, lag: int = 4,
                background: str | Sequence[float] | None = None) -> VideoScore:
    """Score a video against its world prompt (see the module docstring for every key).

    Args:
        frames: ``uint8 [F, H, W, 3]`` (or float in [0, 1]), any length and size.
        prompt: a caption of the world grammar (``ValueError`` otherwise).
        window: frames per reported window (81 = the training length).
        caption_frames: frames the prompt's bounce clause refers to.
        lag: frames between the two ends of a motion step (4 times that for ``grows``).
        background: passed to :func:`detect_objects` (``None``: estimated per frame).
    """
    if window < 2 or lag < 1:
        raise ValueError(f"window={window} must be >= 2 and lag={lag} >= 1; the defaults are 81 and 4.")
    video = _as_float_video(frames)
    evidence = _gather(video, prompt, caption_frames, lag, background)
    bounds = _window_bounds(video.shape[0], window)
    windows = tuple(_window_scores(evidence, start, stop) for start, stop in bounds)
    lengths = np.array([stop - start for start, stop in bounds], dtype=np.float64)
    summary = {key: _weighted_nanmean([w[key] for w in windows], lengths) for key in windows[0] if key != "world_score"}
    return VideoScore(summary=_with_world_score(summary), windows=windows, window_bounds=bounds)


def world_score_of(item: tuple[np.ndarray, str], window: int = 81, lag: int = 4) -> float:
    """``score_video(video, prompt).summary["world_score"]`` of one ``(video, prompt)`` pair: a module-level function
    (torch-free) that a worker process can import to score rewards in parallel."""
    video, prompt = item
    return score_video(video, prompt, window=window, lag=lag).summary["world_score"]


def _weighted_nanmean(values: Sequence[float], weights: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(values)
    return float((values[keep] * weights[keep]).sum() / weights[keep].sum()) if keep.any() else float("nan")


def score_videos(videos: Iterable[np.ndarray], prompts: Sequence[str], **kwargs) -> dict[str, float]:
    """Mean scores over videos: the summary keys, plus ``"window{i}/{key}"`` for each window index ``i``.

    NaN entries (not applicable) are left out of each mean. ``kwargs`` go to :func:`score_video`.
    """
    collected: dict[str, list[float]] = {}
    count = 0
    for video in videos:
        if count == len(prompts):
            raise ValueError(f"got more videos than the {len(prompts)} prompts; pass one video per prompt.")
        score = score_video(video, prompts[count], **kwargs)
        count += 1
        for key, value in score.summary.items():
            collected.setdefault(key, []).append(value)
        for index, window_scores in enumerate(score.windows):
            for key, value in window_scores.items():
                collected.setdefault(f"window{index}/{key}", []).append(value)
    if count != len(prompts):
        raise ValueError(f"got {count} videos for {len(prompts)} prompts; pass one video per prompt.")
    return {key: _nanmean(values) for key, values in collected.items()}


# ------------------------------------------------------------------------------------------ Fréchet distance


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased) of features ``[N, D]``, ``N >= 2``."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {features.shape}; pass more samples.")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``. If the matrix square root is not finite
    (singular covariances), ``eps * I`` is added to both covariances; a negligible imaginary part is dropped.
    Returns a float >= 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    dim = mu1.shape[0]
    if mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape}; pass means [D] and covariances [D, D] of one feature size.")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(dim) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(f"the covariance product has a square root with imaginary part "
                             f"{np.abs(covmean.imag).max():.3g}; check that the covariances are valid.")
        covmean = covmean.real
    diff = mu1 - mu2
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return max(distance, 0.0)  # rounding can leave about -1e-8 for identical statistics
