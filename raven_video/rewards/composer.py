"""Weighted combination of reward fields for CM-GRPO (Alg. 2 l.14-20).

``normalize_then_sum`` (RAVEN's ``select_reward_scores``): for each weighted field ``f``, z-score it within each group
(the rollouts of one prompt; by default the whole batch is one group) with the *population* std,

    z_f = (R_f - mean_g(R_f)) / (max(std_g(R_f), 1e-4) + 1e-5)

then ``r = sum_f w_f z_f / sum_f |w_f|``. A group whose field has zero variance (or a single member) contributes 0,
never NaN. ``weighted_sum``: ``r = sum_f w_f R_f / sum_f |w_f|`` on the raw scores.

RAVEN's CM-GRPO configuration is ``dynamic_degree=0.35,text_alignment=2,aesthetic=1,imaging=1,motion_smoothness=0.75``
(:data:`RAVEN_CMGRPO_WEIGHTS`).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from .base import VideoReward, to_uint8_videos

__all__ = [
    "RewardComposer",
    "parse_reward_weights",
    "normalize_per_group",
    "build_reward",
    "REWARD_FIELDS",
    "FIELD_ALIASES",
    "RAVEN_CMGRPO_WEIGHTS",
    "AGGREGATIONS",
]

AGGREGATIONS = ("normalize_then_sum", "weighted_sum")
STD_CLAMP = 1e-4
STD_EPS = 1e-5

#: reward model name -> fields it produces.
REWARD_FIELDS: Dict[str, tuple] = {
    "dynamic_degree": ("dynamic_degree", "dynamic_degree_vbench"),
    "motion_smoothness": ("motion_smoothness",),
    "aesthetic": ("aesthetic",),
    "imaging": ("imaging",),
    "text_alignment": ("text_alignment", "videoalign_vq", "videoalign_mq", "videoalign_overall"),
    "proxy_motion": ("proxy_motion",),
    "proxy_flicker": ("proxy_flicker",),
    "proxy_smoothness": ("proxy_smoothness",),
    "proxy_sharpness_drift": ("proxy_sharpness_drift",),
    "proxy_brightness": ("proxy_brightness",),
    "world": ("world",),
}
_FIELD_TO_REWARD = {field: reward for reward, fields in REWARD_FIELDS.items() for field in fields}

#: RAVEN config keys (Alg. 2 l.1-13) -> our field names.
FIELD_ALIASES = {
    "raft_RAFT": "dynamic_degree",
    "videoalign_TA": "text_alignment",
    "aq_AES": "aesthetic",
    "iq_IMG": "imaging",
    "ms_MS": "motion_smoothness",
    "imaging_quality": "imaging",
    "aesthetic_quality": "aesthetic",
}

RAVEN_CMGRPO_WEIGHTS = {
    "dynamic_degree": 0.35,
    "text_alignment": 2.0,
    "aesthetic": 1.0,
    "imaging": 1.0,
    "motion_smoothness": 0.75,
}


def _canonical_field(name: str) -> str:
    name = name.strip()
    name = FIELD_ALIASES.get(name, name)
    if name not in _FIELD_TO_REWARD:
        known = ", ".join(sorted(_FIELD_TO_REWARD))
        raise ValueError(
            f"unknown reward {name!r}. Known rewards: {known} (RAVEN aliases: {', '.join(sorted(FIELD_ALIASES))})."
        )
    return name


def _check_weights(weights: Mapping[str, float]) -> Dict[str, float]:
    if not weights:
        raise ValueError("no reward weights given: pass e.g. 'dynamic_degree=0.35,aesthetic=1'")
    out: Dict[str, float] = {}
    for name, w in weights.items():
        field = _canonical_field(name)
        if field in out:
            raise ValueError(f"reward {field!r} is given twice (as {name!r}); give each reward once")
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"weight of {name!r} must be a number, got {w!r}") from None
        if not math.isfinite(w):
            raise ValueError(f"weight of {name!r} must be finite, got {w}")
        out[field] = w
    total = sum(out.values())
    if sum(abs(w) for w in out.values()) == 0.0:
        raise ValueError(f"all reward weights are zero ({out}); give at least one positive weight")
    if total <= 0.0:
        raise ValueError(
            f"the reward weights sum to {total:g} <= 0 ({out}): the combined reward would favour worse videos. "
            "Make the sum positive (negative weights are allowed as penalties)."
        )
    return out


def parse_reward_weights(spec: Union[str, Mapping[str, float]]) -> Dict[str, float]:
    """Parse ``"dynamic_degree=0.35,text_alignment=2,aesthetic=1"`` (or a mapping) into ``{field: weight}``.

    Raises ``ValueError`` naming the bad token for: empty specs, tokens without ``=``, non-numeric or non-finite
    weights, unknown reward names, duplicates, all-zero weights and a non-positive weight sum.
    """
    if isinstance(spec, Mapping):
        return _check_weights(spec)
    if not isinstance(spec, str):
        raise TypeError(f"reward weights must be a string 'name=w,...' or a dict, got {type(spec).__name__}")
    pairs: Dict[str, float] = {}
    tokens = [t.strip() for t in spec.replace(";", ",").split(",")]
    if not any(tokens):
        raise ValueError("empty reward spec: expected 'name=weight,name=weight', e.g. 'dynamic_degree=0.35,aesthetic=1'")
    if not all(tokens):
        raise ValueError(f"reward spec {spec!r} has an empty entry (a doubled or trailing comma); expected "
                         "'name=weight,name=weight', e.g. 'dynamic_degree=0.35,aesthetic=1'")
    for token in tokens:
        if "=" not in token:
            raise ValueError(f"bad reward spec token {token!r}: expected 'name=weight', e.g. 'aesthetic=1'")
        name, value = (s.strip() for s in token.split("=", 1))
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"bad weight {value!r} for reward {name!r}: expected a number, e.g. '{name}=1.0'") from None
        field = _canonical_field(name)
        if field in pairs:
            raise ValueError(f"reward {field!r} is given twice in {spec!r}; give each reward once")
        pairs[field] = weight
    return _check_weights(pairs)


def normalize_per_group(values: torch.Tensor, group_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Alg. 2 l.14-20 z-score within groups: ``(R - mean) / (max(std_pop, 1e-4) + 1e-5)``. ``values``: ``[B]``."""
    values = values.double()
    if group_ids is None:
        group_ids = torch.zeros(values.shape[0], dtype=torch.long)
    out = torch.empty_like(values)
    for g in torch.unique(group_ids):
        m = group_ids == g
        v = values[m]
        std = v.std(unbiased=False) if v.numel() > 1 else torch.zeros((), dtype=v.dtype)
        out[m] = (v - v.mean()) / (torch.clamp(std, min=STD_CLAMP) + STD_EPS)
    return out


def build_reward(name: str, checkpoints: Optional[Mapping[str, object]] = None, *, random_init: bool = False,
                 device=None, dtype: torch.dtype = torch.float32, allow_pickle: bool = False, **kwargs) -> VideoReward:
    """Construct the reward model ``name`` (a key of :data:`REWARD_FIELDS`) lazily.

    ``checkpoints`` maps reward names to what that reward's constructor takes: a path / Hub reference string, or a
    dict of constructor keyword arguments (e.g. ``{"aesthetic": {"clip_checkpoint": ..., "head_checkpoint": ...}}``).
    ``allow_pickle`` consents to unpickling checkpoints that ``torch.load(weights_only=True)`` refuses (trusted files
    only: unpickling runs code).
    """
    from . import aesthetic, dynamic_degree, imaging_quality, motion_smoothness, proxies, text_alignment, world

    if name not in REWARD_FIELDS:
        raise ValueError(f"unknown reward model {name!r}; known: {', '.join(REWARD_FIELDS)}")
    spec = (checkpoints or {}).get(name)
    factories: Dict[str, Callable[..., VideoReward]] = {
        "dynamic_degree": dynamic_degree.DynamicDegreeReward,
        "motion_smoothness": motion_smoothness.MotionSmoothnessReward,
        "imaging": imaging_quality.ImagingQualityReward,
        "aesthetic": aesthetic.AestheticReward,
        "text_alignment": text_alignment.VideoAlignReward,
    }
    weight_free = {
        "proxy_motion": proxies.FrameDifferenceMotion,
        "proxy_flicker": proxies.TemporalFlicker,
        "proxy_smoothness": proxies.BlendSmoothness,
        "proxy_sharpness_drift": proxies.SharpnessDrift,
        "proxy_brightness": proxies.Brightness,
        "world": world.WorldReward,
    }
    if name in weight_free:
        return weight_free[name](device=device, **kwargs)
    kwargs["allow_pickle"] = allow_pickle
    if isinstance(spec, Mapping):
        return factories[name](**{**kwargs, **spec}, random_init=random_init, device=device, dtype=dtype)
    if name == "aesthetic" and isinstance(spec, str):
        raise ValueError(
            "aesthetic needs two files: give checkpoints={'aesthetic': {'clip_checkpoint': 'ViT-L-14.pt', "
            "'head_checkpoint': 'sa_0_4_vit_l_14_linear.pth'}} or use vbench_cache_dir"
        )
    if name == "text_alignment":
        if spec is None and not random_init:
            raise ValueError(
                "text_alignment needs checkpoints={'text_alignment': {'base_model': <Qwen2-VL-2B-Instruct dir>, "
                "'checkpoint': <VideoReward dir>}}"
            )
        return factories[name](**kwargs, random_init=random_init, device=device, dtype=dtype)
    return factories[name](spec, **kwargs, random_init=random_init, device=device, dtype=dtype)


def checkpoints_from_vbench_cache(cache_dir: str) -> Dict[str, object]:
    """Checkpoint specs for the four VBench rewards from a ``$VBENCH_CACHE_DIR``."""
    import os

    return {
        "dynamic_degree": os.path.join(cache_dir, "raft_model", "models", "raft-things.pth"),
        "motion_smoothness": os.path.join(cache_dir, "amt_model", "amt-s.pth"),
        "imaging": os.path.join(cache_dir, "pyiqa_model", "musiq_spaq_ckpt-358bb6af.pth"),
        "aesthetic": {
            "clip_checkpoint": os.path.join(cache_dir, "clip_model", "ViT-L-14.pt"),
            "head_checkpoint": os.path.join(cache_dir, "aesthetic_model", "emb_reader", "sa_0_4_vit_l_14_linear.pth"),
        },
    }


class RewardComposer:
    """Score videos with several rewards and combine the weighted fields into one scalar per video.

    Args:
        weights: ``{field: weight}`` or a string ``"dynamic_degree=0.35,aesthetic=1"`` (:func:`parse_reward_weights`).
        rewards: reward objects providing the weighted fields; a missing one raises ``ValueError`` unless
            ``build_missing=True`` (then built with :func:`build_reward` from ``checkpoints``).
        aggregation: ``"normalize_then_sum"`` (RAVEN) or ``"weighted_sum"``.
        allow_pickle: passed to the rewards it builds (consent to unpickle trusted checkpoints, see ``torch_load``).
    """

    def __init__(
        self,
        weights: Union[str, Mapping[str, float]],
        rewards: Optional[Iterable[VideoReward]] = None,
        aggregation: str = "normalize_then_sum",
        *,
        build_missing: bool = False,
        checkpoints: Optional[Mapping[str, object]] = None,
        random_init: bool = False,
        device=None,
        dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
    ):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; use one of {AGGREGATIONS}")
        self.weights = parse_reward_weights(weights)
        self.aggregation = aggregation
        self.rewards: List[VideoReward] = list(rewards or [])
        provided = {f for r in self.rewards for f in r.fields}
        for field in self.weights:
            if field in provided:
                continue
            model_name = _FIELD_TO_REWARD[field]
            if not build_missing:
                raise ValueError(
                    f"no reward model provides {field!r}: pass a {model_name!r} reward in rewards=[...] "
                    "or build_missing=True with checkpoints"
                )
            reward = build_reward(model_name, checkpoints, random_init=random_init, device=device, dtype=dtype,
                                  allow_pickle=allow_pickle)
            self.rewards.append(reward)
            provided.update(reward.fields)

    @classmethod
    def from_string(cls, spec: str, **kwargs) -> "RewardComposer":
        return cls(spec, **kwargs)

    @property
    def fields(self) -> List[str]:
        return [f for r in self.rewards for f in r.fields]

    def score(self, videos, prompts: Optional[Sequence[str]] = None, fps: float = 16.0) -> Dict[str, torch.Tensor]:
        """Run every reward once; returns all their fields ``{field: [B]}``."""
        frames = to_uint8_videos(videos, min_frames=max([r.min_frames for r in self.rewards] + [1]), name="RewardComposer")
        out: Dict[str, torch.Tensor] = {}
        for reward in self.rewards:
            out.update(reward(frames, prompts=prompts if reward.needs_prompts else None, fps=fps))
        return out

    def aggregate(self, scores: Mapping[str, torch.Tensor], group_ids: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Combine weighted fields (Alg. 2 l.14-20). ``scores``: ``{field: [B]}``; ``group_ids``: ``[B]`` prompt groups."""
        missing = [f for f in self.weights if f not in scores]
        if missing:
            raise ValueError(f"scores lack weighted field(s) {missing}; available: {sorted(scores)}")
        sizes = {f: scores[f].numel() for f in self.weights}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"reward fields have different batch sizes: {sizes}")
        batch = next(iter(sizes.values()))
        gid = None
        if group_ids is not None:
            gid = torch.as_tensor(group_ids).reshape(-1)
            if gid.numel() != batch:
                raise ValueError(f"group_ids has {gid.numel()} entries for a batch of {batch}")
        total = torch.zeros(batch, dtype=torch.float64)
        norm = sum(abs(w) for w in self.weights.values())
        for field, w in self.weights.items():
            v = torch.as_tensor(scores[field]).detach().reshape(-1).double().cpu()
            if not torch.isfinite(v).all():
                raise ValueError(f"reward field {field!r} has non-finite values: {v.tolist()}")
            if self.aggregation == "normalize_then_sum":
                v = normalize_per_group(v, gid)
            total += w * v
        return (total / norm).float()

    def __call__(self, videos, prompts=None, fps: float = 16.0, group_ids=None) -> Dict[str, torch.Tensor]:
        """Score and aggregate: returns every field plus ``"total"`` (``[B]``)."""
        scores = self.score(videos, prompts, fps)
        scores["total"] = self.aggregate(scores, group_ids)
        return scores

    def __repr__(self) -> str:
        w = ",".join(f"{k}={v:g}" for k, v in self.weights.items())
        return f"RewardComposer({w!r}, aggregation={self.aggregation!r}, rewards={[type(r).__name__ for r in self.rewards]})"
