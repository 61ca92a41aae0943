"""Vocabulary, scene specifications and deterministic scene sampling of the procedural video world.

A *scene* is what a caption says: 1-3 objects, each a (colour, shape, motion, speed), on a background.
Colours are distinct within a scene, so an object's colour is its identity. What the caption does not say
(pixel positions, sizes, orbit radius and phase) is the *initial state*, sampled by :func:`initial_state`.

Units: pixels at the rendered resolution and frames (16 fps). Sizes and speeds are given for 64 px and scale
with ``min(height, width) / 64``. Every shape fits a ``size x size`` box centred on the object's position:
circle (diameter), axis-aligned square (side), upright isosceles triangle (base = height = size).

Determinism: :func:`sample_scene` draws from ``numpy.random.default_rng(seed)``; :func:`initial_state` draws
from ``default_rng([seed, 1])`` (a second stream of the same seed), so both are functions of the seed only.

Train / held-out split (compositional generalisation):

* the (colour, shape) pairs in :data:`HELDOUT_COLOUR_SHAPE` and the (shape, motion) pairs in
  :data:`HELDOUT_SHAPE_MOTION` never occur in ``split="train"`` scenes;
* every ``split="heldout"`` scene contains at least one of them;
* seeds: training data uses seeds ``0 <= seed < HELDOUT_SEED_OFFSET`` (``10**9``); evaluation uses seeds
  ``>= HELDOUT_SEED_OFFSET`` (both splits), so evaluation clips are never training clips.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "COLOURS",
    "BACKGROUNDS",
    "SHAPES",
    "MOTIONS",
    "LINEAR_MOTIONS",
    "SPEEDS",
    "SPLITS",
    "HELDOUT_COLOUR_SHAPE",
    "HELDOUT_SHAPE_MOTION",
    "HELDOUT_SEED_OFFSET",
    "FPS",
    "BASE_RESOLUTION",
    "SIZE_RANGE",
    "LINEAR_SPEED",
    "GROWTH_RATE",
    "GROW_START",
    "GROW_FRAMES",
    "ObjectSpec",
    "SceneSpec",
    "ObjectInit",
    "SceneInit",
    "resolution_scale",
    "check_resolution",
    "is_heldout_object",
    "sample_scene",
    "initial_state",
]

#: Object colours (RGB). Pairwise distance >= 100 and >= 140 from every background (tested).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "green": (30, 190, 30),
    "blue": (30, 60, 235),
    "yellow": (235, 235, 40),
    "purple": (190, 30, 210),
    "cyan": (20, 210, 230),
    "orange": (255, 140, 0),
}
#: Background colours (RGB).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Straight-line motions and their unit direction (dx, dy); y points down the image.
LINEAR_MOTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up_left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "up_right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "down_left": (-math.sqrt(0.5), math.sqrt(0.5)),
    "down_right": (math.sqrt(0.5), math.sqrt(0.5)),
}
#: ``orbits`` circles the frame centre clockwise on screen; ``grows`` stays in place and grows.
MOTIONS: tuple[str, ...] = (*LINEAR_MOTIONS, "still", "grows", "orbits")
SPEEDS: tuple[str, ...] = ("slowly", "quickly")
SPLITS: tuple[str, ...] = ("train", "heldout")

HELDOUT_COLOUR_SHAPE: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "square"), ("blue", "circle"))
HELDOUT_SHAPE_MOTION: tuple[tuple[str, str], ...] = (("square", "orbits"), ("triangle", "grows"))
HELDOUT_SEED_OFFSET = 10**9

FPS = 16
BASE_RESOLUTION = 64
#: Object size range in px at 64 px (uniform).
SIZE_RANGE: tuple[float, float] = (10.0, 16.0)
#: Speed of linear and orbit motions in px/frame at 64 px (along the path).
LINEAR_SPEED: dict[str, float] = {"slowly": 0.6, "quickly": 1.6}
#: ``grows``: size increase in px/frame at 64 px, from ``GROW_START * size`` until frame ``GROW_FRAMES``
#: (the end of a 4x = 321-frame clip), then constant. A 16 px object growing quickly reaches 41.6 px.
GROWTH_RATE: dict[str, float] = {"slowly": 0.05, "quickly": 0.1}
GROW_START = 0.6
GROW_FRAMES = 320

_MAX_SEED = 2**63
_CANDIDATES = 32


@dataclass(frozen=True)
class ObjectSpec:
    """One captioned object. ``speed`` is ``None`` exactly when ``motion == "still"``."""

    shape: str
    colour: str
    motion: str
    speed: str | None

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.colour, tuple(COLOURS))
        _check_choice("motion", self.motion, MOTIONS)
        if self.motion == "still" and self.speed is not None:
            raise ValueError(f"a still object has speed=None, got speed={self.speed!r}; drop the speed.")
        if self.motion != "still":
            _check_choice("speed", self.speed, SPEEDS)


@dataclass(frozen=True)
class SceneSpec:
    """Everything a caption says: objects in drawing order (later on top) and the background."""

    objects: tuple[ObjectSpec, ...]
    background: str

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene has 1 to 3 objects, got {len(self.objects)}; pass between 1 and 3.")
        colours = [obj.colour for obj in self.objects]
        if len(set(colours)) != len(colours):
            raise ValueError(f"object colours must be distinct (colour is identity), got {colours}; recolour one.")
        _check_choice("background", self.background, tuple(BACKGROUNDS))


@dataclass(frozen=True)
class ObjectInit:
    """Initial state of one object in px: centre at frame 0, size at frame 0, orbit radius and phase (rad)."""

    x: float
    y: float
    size: float
    radius: float = 0.0
    phase: float = 0.0


@dataclass(frozen=True)
class SceneInit:
    """Initial state of a scene at a given resolution (one :class:`ObjectInit` per object)."""

    objects: tuple[ObjectInit, ...]
    height: int
    width: int


def _check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; use one of {list(choices)}.")


def check_resolution(height: int, width: int) -> None:
    """Raise ``ValueError`` unless both sides are multiples of 16 and at least 32."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or value < 32 or value % 16:
            raise ValueError(f"{name}={value!r} must be an int multiple of 16 and >= 32, e.g. 64.")


def resolution_scale(height: int, width: int) -> float:
    """Factor applied to sizes and speeds: ``min(height, width) / 64``."""
    return min(height, width) / BASE_RESOLUTION


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed={seed!r} must be an int in [0, 2**63); training uses seeds < {HELDOUT_SEED_OFFSET}.")


def is_heldout_object(obj: ObjectSpec) -> bool:
    """Whether the object carries a held-out (colour, shape) or (shape, motion) pair."""
    return (obj.colour, obj.shape) in HELDOUT_COLOUR_SHAPE or (obj.shape, obj.motion) in HELDOUT_SHAPE_MOTION


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _sample_object(rng: np.random.Generator, colour: str, shape: str | None, motion: str | None,
                   train: bool) -> ObjectSpec:
    """Fill the free attributes; in train mode only with pairs that are not held out."""
    if shape is None:
        shape = _pick(rng, [s for s in SHAPES if not (train and (colour, s) in HELDOUT_COLOUR_SHAPE)])
    if motion is None:
        motion = _pick(rng, [m for m in MOTIONS if not (train and (shape, m) in HELDOUT_SHAPE_MOTION)])
    speed = None if motion == "still" else _pick(rng, list(SPEEDS))
    return ObjectSpec(shape=shape, colour=colour, motion=motion, speed=speed)


def sample_scene(seed: int, split: str = "train", max_objects: int = 3) -> SceneSpec:
    """Sample a scene from ``numpy.random.default_rng(seed)``.

    Args:
        seed: any int in ``[0, 2**63)`` (see the module docstring for the train/evaluation seed ranges).
        split: ``"train"`` (no held-out pair) or ``"heldout"`` (at least one held-out pair).
        max_objects: 1, 2 or 3; the number of objects is uniform in ``[1, max_objects]``.
    """
    _check_seed(seed)
    _check_choice("split", split, SPLITS)
    if max_objects not in (1, 2, 3):
        raise ValueError(f"max_objects={max_objects!r} must be 1, 2 or 3.")
    rng = np.random.default_rng(seed)
    num = int(rng.integers(1, max_objects + 1))
    colours = [str(c) for c in rng.permutation(list(COLOURS))[:num]]
    special, forced_shape, forced_motion = -1, None, None
    if split == "heldout":
        special = int(rng.integers(num))
        pairs = [(c, s, None) for c, s in HELDOUT_COLOUR_SHAPE] + [(None, s, m) for s, m in HELDOUT_SHAPE_MOTION]
        forced_colour, forced_shape, forced_motion = pairs[int(rng.integers(len(pairs)))]
        if forced_colour is not None:
            colours = [c for c in colours if c != forced_colour][: num - 1]
            colours.insert(special, forced_colour)
    objects = tuple(
        _sample_object(rng, colour, *((forced_shape, forced_motion) if i == special else (None, None)),
                       train=split == "train")
        for i, colour in enumerate(colours)
    )
    background = _pick(rng, list(BACKGROUNDS))
    return SceneSpec(objects=objects, background=background)


def _placement(obj: ObjectSpec, size: float, u: float, v: float, height: int, width: int,
               scale: float) -> ObjectInit:
    """Map uniform draws ``u, v`` in [0, 1) to a fully visible initial position (and orbit phase/radius)."""
    if obj.motion == "orbits":
        max_radius = min(height, width) / 2 - size / 2 - scale
        radius = (0.55 + 0.45 * u) * max_radius
        phase = 2 * math.pi * v
        return ObjectInit(width / 2 + radius * math.cos(phase), height / 2 + radius * math.sin(phase),
                          size, radius, phase)
    extent = size
    if obj.motion == "grows":
        size = GROW_START * size
        extent = size + GROWTH_RATE[obj.speed] * scale * GROW_FRAMES
    x = extent / 2 + u * (width - extent)
    y = extent / 2 + v * (height - extent)
    return ObjectInit(x, y, size)


def _overlap(a: ObjectInit, b: ObjectInit) -> bool:
    reach = (a.size + b.size) / 2 + 1.0
    return abs(a.x - b.x) < reach and abs(a.y - b.y) < reach


def initial_state(seed: int, scene: SceneSpec, height: int = 64, width: int = 64) -> SceneInit:
    """Sizes, positions and orbit phases for ``scene``, drawn from ``default_rng([seed, 1])``.

    Sizes are uniform in ``SIZE_RANGE * scale``; ``_CANDIDATES`` position sets are drawn up front (a fixed number
    of draws) and the first whose frame-0 boxes are over 1 px apart is used (else the last). Objects are fully
    on screen at frame 0 (and, for ``grows``, up to frame ``GROW_FRAMES``); orbit radii keep them on screen.
    """
    _check_seed(seed)
    check_resolution(height, width)
    scale = resolution_scale(height, width)
    rng = np.random.default_rng([seed, 1])
    num = len(scene.objects)
    sizes = rng.uniform(*SIZE_RANGE, size=num) * scale
    draws = rng.random((_CANDIDATES, num, 2))
    for candidate in draws:
        objects = tuple(_placement(obj, float(sizes[i]), float(candidate[i, 0]), float(candidate[i, 1]),
                                   height, width, scale) for i, obj in enumerate(scene.objects))
        if not any(_overlap(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]):
            break
    return SceneInit(objects=objects, height=height, width=width)
