"""Video rewards for CM-GRPO and evaluation (docs/rewards_eval.md).

One interface for all rewards: ``reward(videos, prompts=None, fps=16.0) -> {field: tensor[B]}`` with ``videos`` a
``[B, F, 3, H, W]`` tensor, float in [-1, 1] or uint8 (see :mod:`raven_video.rewards.base`). Models are built lazily
from paths/Hub references the user gives; nothing is downloaded implicitly. Heavy imports (torchvision, open_clip,
pyiqa, vbench, transformers) happen only when a reward is built.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_LAZY = {
    "VideoReward": "base",
    "to_uint8_videos": "base",
    "videos_from_numpy": "base",
    "resolve_checkpoint": "base",
    "DynamicDegreeReward": "dynamic_degree",
    "MotionSmoothnessReward": "motion_smoothness",
    "AestheticReward": "aesthetic",
    "ImagingQualityReward": "imaging_quality",
    "VideoAlignReward": "text_alignment",
    "FrameDifferenceMotion": "proxies",
    "TemporalFlicker": "proxies",
    "BlendSmoothness": "proxies",
    "SharpnessDrift": "proxies",
    "Brightness": "proxies",
    "WorldReward": "world",
    "RewardComposer": "composer",
    "parse_reward_weights": "composer",
    "normalize_per_group": "composer",
    "build_reward": "composer",
    "checkpoints_from_vbench_cache": "composer",
    "REWARD_FIELDS": "composer",
    "RAVEN_CMGRPO_WEIGHTS": "composer",
    "ensure_torchvision_importable": "_torchvision_compat",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from ._torchvision_compat import ensure_torchvision_importable
    from .aesthetic import AestheticReward
    from .base import VideoReward, resolve_checkpoint, to_uint8_videos, videos_from_numpy
    from .composer import (RAVEN_CMGRPO_WEIGHTS, REWARD_FIELDS, RewardComposer, build_reward,
                           checkpoints_from_vbench_cache, normalize_per_group, parse_reward_weights)
    from .dynamic_degree import DynamicDegreeReward
    from .imaging_quality import ImagingQualityReward
    from .motion_smoothness import MotionSmoothnessReward
    from .proxies import BlendSmoothness, Brightness, FrameDifferenceMotion, SharpnessDrift, TemporalFlicker
    from .text_alignment import VideoAlignReward
    from .world import WorldReward
