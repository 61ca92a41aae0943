"""A procedural video world with exact ground truth, for training and evaluating small text-to-video models.

Scenes of 1-3 coloured shapes (moving, bouncing off the walls, orbiting, growing or still) on a plain
background are sampled from a seed, captioned with a small closed grammar, and rendered anti-aliased at any
length and size (64x64, 16 fps by default). Metrics recover the objects from frames and score a video
against its prompt; a small clip encoder gives a Fréchet distance.

Modules: :mod:`.scene` (vocabulary, sampling, train/held-out split), :mod:`.captions` (grammar),
:mod:`.render` (renderer, ground truth), :mod:`.data` (datasets), :mod:`.metrics` (detector, scores,
Fréchet distance), :mod:`.features` (encoder), :mod:`.stack` (the small model stack), :mod:`.evaluate` (the
report's protocol), :mod:`.recipe` (how ``scripts/world_recipe.py``, VAE -> teacher -> ODE init -> RAVEN -> CM-GRPO, launches its stages),
:mod:`.grid` and :mod:`.report` (issue 13's experiment grid and its report), :mod:`.shipped` (``pretrained()``, the
default model). numpy-only modules are imported eagerly; ``metrics`` (scipy),
``data`` and ``features`` (torch, datasets) load on first use of one of their names.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .captions import VOCABULARY, ParsedCaption, caption, parse_caption, tokenize
from .render import WALL_BITS, Clip, Track, bounce_walls, count_bounces, prompt_for_seed, render, render_clip
from .scene import (
    BACKGROUNDS,
    COLOURS,
    FPS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_SEED_OFFSET,
    HELDOUT_SHAPE_MOTION,
    MOTIONS,
    SHAPES,
    SPEEDS,
    ObjectInit,
    ObjectSpec,
    SceneInit,
    SceneSpec,
    initial_state,
    is_heldout_object,
    sample_scene,
)

_LAZY = {
    "pretrained": "shipped",
    "pretrained_path": "shipped",
    "vae_path": "shipped",
    "ACCURACY_KEYS": "metrics",
    "Detection": "metrics",
    "VideoScore": "metrics",
    "detect_objects": "metrics",
    "score_video": "metrics",
    "score_videos": "metrics",
    "feature_statistics": "metrics",
    "frechet_distance": "metrics",
    "world_seeds": "data",
    "prompt_dataset": "data",
    "WorldClipDataset": "data",
    "write_prompt_file": "data",
    "frames_to_tensor": "data",
    "tensor_to_frames": "data",
    "ClipEncoder": "features",
    "train_encoder": "features",
    "save_encoder": "features",
    "load_encoder": "features",
    "encode_videos": "features",
    "clip_frechet_distance": "features",
}

__all__ = [
    "BACKGROUNDS", "COLOURS", "FPS", "HELDOUT_COLOUR_SHAPE", "HELDOUT_SEED_OFFSET", "HELDOUT_SHAPE_MOTION", "MOTIONS",
    "SHAPES", "SPEEDS", "VOCABULARY", "WALL_BITS",
    "ObjectSpec", "SceneSpec", "ObjectInit", "SceneInit", "ParsedCaption", "Clip", "Track",
    "sample_scene", "initial_state", "is_heldout_object", "caption", "parse_caption", "tokenize",
    "render", "render_clip", "prompt_for_seed", "count_bounces", "bounce_walls",
] + list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .data import (
        WorldClipDataset,
        frames_to_tensor,
        prompt_dataset,
        tensor_to_frames,
        world_seeds,
        write_prompt_file,
    )
    from .features import ClipEncoder, clip_frechet_distance, encode_videos, load_encoder, save_encoder, train_encoder
    from .metrics import (
        ACCURACY_KEYS,
        Detection,
        VideoScore,
        detect_objects,
        feature_statistics,
        frechet_distance,
        score_video,
        score_videos,
    )
    from .shipped import pretrained, pretrained_path, vae_path
