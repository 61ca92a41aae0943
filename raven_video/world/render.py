"""Deterministic anti-aliased renderer of the video world, with per-frame ground truth.

Motion (closed form in the frame index ``t``, so any clip length works and frames never depend on earlier ones):

* straight lines at ``LINEAR_SPEED * scale`` px/frame (diagonals: the same speed along the path); the object's
  extent (not its centre) reflects elastically off the frame walls;
* ``orbits``: clockwise on screen around the frame centre at the same linear speed (angular speed speed/radius);
* ``grows``: in place, size ``+GROWTH_RATE * scale`` px/frame until frame ``GROW_FRAMES``, then constant;
* ``still``: nothing moves.

Objects never collide with each other; later objects are drawn on top. Each pixel is the mean of
``supersample**2`` point samples (anti-aliasing), composited as ``pixel += coverage * (colour - pixel)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .captions import caption
from .scene import (
    BACKGROUNDS,
    COLOURS,
    FPS,
    GROW_FRAMES,
    GROWTH_RATE,
    LINEAR_MOTIONS,
    LINEAR_SPEED,
    ObjectInit,
    ObjectSpec,
    SceneInit,
    SceneSpec,
    initial_state,
    resolution_scale,
    sample_scene,
)

__all__ = ["WALL_BITS", "Track", "Clip", "bounce_walls", "count_bounces", "render", "render_clip", "prompt_for_seed"]

#: Bits of :attr:`Track.bounce`: which wall(s) the object bounced off between frame ``t - 1`` and ``t``.
WALL_BITS: dict[str, int] = {"left": 1, "right": 2, "top": 4, "bottom": 8}


@dataclass(frozen=True)
class Track:
    """Ground truth of one object; every array has shape ``[F]``.

    ``x, y``: centre of the object's ``size x size`` box in px (pixel ``(row, col)`` covers
    ``[col, col + 1) x [row, row + 1)``); ``vx, vy``: velocity in px/frame just after frame ``t``;
    ``visible``: fraction of the object's coverage not hidden by objects drawn later (1.0 when alone);
    ``bounce``: :data:`WALL_BITS` mask of the walls hit in ``(t - 1, t]``.
    """

    x: np.ndarray
    y: np.ndarray
    size: np.ndarray
    vx: np.ndarray
    vy: np.ndarray
    visible: np.ndarray
    bounce: np.ndarray


@dataclass(frozen=True)
class Clip:
    """A rendered clip: ``frames`` ``uint8 [F, H, W, 3]``, its caption and the ground truth behind it.

    ``tracks``: one :class:`Track` per object (drawing order); ``bounces``: per object, the wall bounces in the
    captioned frames (the prompt writes 2 or more as "walls").
    """

    frames: np.ndarray
    prompt: str
    scene: SceneSpec
    init: SceneInit
    tracks: tuple[Track, ...]
    bounces: tuple[int, ...]
    seed: int
    fps: int = FPS


def bounce_walls(mask: int) -> tuple[str, ...]:
    """Wall names of a :attr:`Track.bounce` entry."""
    return tuple(name for name, bit in WALL_BITS.items() if int(mask) & bit)


def _fold(start: float, velocity: float, lo: float, hi: float,
          t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reflect ``start + velocity * t`` into ``[lo, hi]``.

    Returns ``(position, velocity, hit_lo, hit_hi)``, each ``[F]``; ``hit_*[t]`` marks a reflection in
    ``(t - 1, t]``.
    """
    if velocity == 0.0:
        none = np.zeros(t.shape, dtype=bool)
        return np.full(t.shape, start), np.zeros(t.shape), none, none
    span = hi - lo
    unfolded = start - lo + velocity * t
    lap = np.floor(unfolded / span).astype(np.int64)
    rest = unfolded - lap * span
    forward = lap % 2 == 0
    position = lo + np.where(forward, rest, span - rest)
    signed = np.where(forward, velocity, -velocity)
    crossed = np.zeros(t.shape, dtype=bool)
    crossed[1:] = lap[1:] != lap[:-1]
    boundary = np.zeros(t.shape, dtype=np.int64)
    boundary[1:] = np.maximum(lap[1:], lap[:-1])  # the crossed boundary sits at boundary * span
    hit_hi = crossed & (boundary % 2 == 1)
    return position, signed, crossed & ~hit_hi, hit_hi


def _trajectory(obj: ObjectSpec, start: ObjectInit, num_frames: int, height: int,
                width: int) -> tuple[np.ndarray, ...]:
    """Closed-form ``(x, y, size, vx, vy, bounce)`` of one object, each ``[F]``."""
    t = np.arange(num_frames, dtype=np.float64)
    scale = resolution_scale(height, width)
    size = np.full(num_frames, start.size)
    zeros = np.zeros(num_frames)
    bounce = np.zeros(num_frames, dtype=np.uint8)
    if obj.motion in LINEAR_MOTIONS:
        speed = LINEAR_SPEED[obj.speed] * scale
        dx, dy = LINEAR_MOTIONS[obj.motion]
        half = start.size / 2
        x, vx, left, right = _fold(start.x, speed * dx, half, width - half, t)
        y, vy, top, bottom = _fold(start.y, speed * dy, half, height - half, t)
        for hits, wall in ((left, "left"), (right, "right"), (top, "top"), (bottom, "bottom")):
            bounce |= np.where(hits, WALL_BITS[wall], 0).astype(np.uint8)
        return x, y, size, vx, vy, bounce
    if obj.motion == "orbits":
        speed = LINEAR_SPEED[obj.speed] * scale
        angle = start.phase + speed / start.radius * t
        x = width / 2 + start.radius * np.cos(angle)
        y = height / 2 + start.radius * np.sin(angle)
        return x, y, size, -speed * np.sin(angle), speed * np.cos(angle), bounce
    if obj.motion == "grows":
        size = start.size + GROWTH_RATE[obj.speed] * scale * np.minimum(t, GROW_FRAMES)
    return np.full(num_frames, start.x), np.full(num_frames, start.y), size, zeros, zeros.copy(), bounce


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Point-in-shape test for offsets from the box centre (``dy`` points down)."""
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    return (dy <= half) & (np.abs(dx) <= (dy + half) / 2)  # apex at dy = -half, base at dy = +half


def _coverage(shape: str, x: float, y: float, size: float, height: int, width: int,
              supersample: int) -> np.ndarray:
    """Fraction of each pixel covered by the shape, ``float32 [H, W]`` (computed on its bounding patch only)."""
    alpha = np.zeros((height, width), dtype=np.float32)
    half = size / 2
    r0, r1 = max(math.floor(y - half), 0), min(math.ceil(y + half), height)
    c0, c1 = max(math.floor(x - half), 0), min(math.ceil(x + half), width)
    if r0 >= r1 or c0 >= c1:
        return alpha
    offsets = (np.arange(supersample) + 0.5) / supersample
    ys = (np.arange(r0, r1)[:, None] + offsets).reshape(-1, 1) - y
    xs = (np.arange(c0, c1)[:, None] + offsets).reshape(1, -1) - x
    inside = _inside(shape, xs, ys, half).astype(np.float32)
    alpha[r0:r1, c0:c1] = inside.reshape(r1 - r0, supersample, c1 - c0, supersample).mean(axis=(1, 3))
    return alpha


def _composite(scene: SceneSpec, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draw one frame from per-object coverage ``[N, H, W]``: ``(uint8 [H, W, 3], visible fraction [N])``."""
    canvas = np.empty(alphas.shape[1:] + (3,), dtype=np.float32)
    canvas[:] = BACKGROUNDS[scene.background]
    for obj, alpha in zip(scene.objects, alphas):
        canvas += alpha[..., None] * (np.asarray(COLOURS[obj.colour], dtype=np.float32) - canvas)
    # uncovered[i] = product over objects drawn after i of (1 - alpha)
    uncovered = np.ones_like(alphas)
    for i in range(len(alphas) - 2, -1, -1):
        uncovered[i] = uncovered[i + 1] * (1.0 - alphas[i + 1])
    total = alphas.sum(axis=(1, 2))
    visible = (alphas * uncovered).sum(axis=(1, 2)) / np.maximum(total, 1e-12)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), visible


def render(scene: SceneSpec, init: SceneInit, num_frames: int,
           supersample: int = 4) -> tuple[np.ndarray, tuple[Track, ...]]:
    """Render ``num_frames`` frames of ``scene`` from ``init`` (a pure function).

    Returns:
        ``(frames uint8 [F, H, W, 3], tracks)``, one :class:`Track` per object in drawing order.
    """
    if num_frames < 1 or supersample < 1:
        raise ValueError(f"num_frames={num_frames} and supersample={supersample} must both be >= 1.")
    if len(init.objects) != len(scene.objects):
        raise ValueError(f"init has {len(init.objects)} objects for a scene of {len(scene.objects)}; build it with "
                         f"initial_state(seed, scene, ...).")
    height, width = init.height, init.width
    paths = [_trajectory(obj, start, num_frames, height, width) for obj, start in zip(scene.objects, init.objects)]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    visible = np.empty((len(paths), num_frames))
    for t in range(num_frames):
        alphas = np.stack([_coverage(obj.shape, float(p[0][t]), float(p[1][t]), float(p[2][t]), height, width,
                                     supersample) for obj, p in zip(scene.objects, paths)])
        frames[t], visible[:, t] = _composite(scene, alphas)
    tracks = tuple(Track(x=x, y=y, size=size, vx=vx, vy=vy, visible=visible[i], bounce=bounce)
                   for i, (x, y, size, vx, vy, bounce) in enumerate(paths))
    return frames, tracks


def count_bounces(scene: SceneSpec, init: SceneInit, num_frames: int) -> tuple[int, ...]:
    """Per object, the number of wall reflections in frames ``[0, num_frames)`` (a corner hit counts twice)."""
    counts = []
    for obj, start in zip(scene.objects, init.objects):
        bounce = _trajectory(obj, start, num_frames, init.height, init.width)[-1]
        counts.append(sum(len(bounce_walls(mask)) for mask in bounce if mask))
    return tuple(counts)


def _captioned_scene(seed: int, split: str, height: int, width: int, caption_frames: int,
                     max_objects: int) -> tuple[SceneSpec, SceneInit, tuple[int, ...]]:
    """Scene, initial state and captioned bounce counts of ``seed``."""
    if caption_frames < 1:
        raise ValueError(f"caption_frames={caption_frames} must be >= 1 (81 = 5 s at 16 fps).")
    scene = sample_scene(seed, split=split, max_objects=max_objects)
    init = initial_state(seed, scene, height, width)
    return scene, init, count_bounces(scene, init, caption_frames)


def prompt_for_seed(seed: int, split: str = "train", height: int = 64, width: int = 64, caption_frames: int = 81,
                    max_objects: int = 3) -> str:
    """The prompt of ``render_clip(seed, ...)`` without rendering pixels (cheap)."""
    scene, _, bounces = _captioned_scene(seed, split, height, width, caption_frames, max_objects)
    return caption(scene, bounces)


def render_clip(seed: int, num_frames: int = 81, height: int = 64, width: int = 64, split: str = "train",
                caption_frames: int = 81, max_objects: int = 3, supersample: int = 4) -> Clip:
    """Sample, caption and render the clip of ``seed``.

    Args:
        seed: scene and initial-state seed (see :mod:`raven_video.world.scene` for the train/eval seed ranges).
        num_frames: clip length (any >= 1; 81 = 5 s at 16 fps).
        height, width: multiples of 16, >= 32.
        split: ``"train"`` or ``"heldout"``.
        caption_frames: the bounce clause counts bounces in the first ``caption_frames`` frames, whatever
            ``num_frames`` is, so a prompt means the same thing for every clip length.
        max_objects: 1-3.
        supersample: anti-aliasing factor per axis.
    """
    scene, init, bounces = _captioned_scene(seed, split, height, width, caption_frames, max_objects)
    frames, tracks = render(scene, init, num_frames, supersample=supersample)
    return Clip(frames=frames, prompt=caption(scene, bounces), scene=scene, init=init, tracks=tracks,
                bounces=bounces, seed=int(seed))
