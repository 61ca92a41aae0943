"""VBench Total / Quality / Semantic scores (Vchitect/VBench ``scripts/constant.py`` + ``cal_final_score.py``;
docs/rewards_eval.md).

For each dimension ``d``: ``n_d = (raw_d - Min_d) / (Max_d - Min_d) * w_d``;
``Quality = sum_{d in Q} n_d / sum_{d in Q} w_d`` (= / 6.5), ``Semantic = sum_{d in S} n_d / sum_{d in S} w_d``
(= / 9), ``Total = (4 * Quality + 1 * Semantic) / 5``. Missing dimensions count as 0 exactly like VBench's script
(a partial evaluation therefore under-reports Total); they are listed in the result's ``missing`` field.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Mapping, Optional

__all__ = [
    "VBENCH_DIMENSIONS",
    "QUALITY_DIMENSIONS",
    "SEMANTIC_DIMENSIONS",
    "NORMALIZE",
    "DIM_WEIGHT",
    "QUALITY_WEIGHT",
    "SEMANTIC_WEIGHT",
    "aggregate_vbench",
    "load_vbench_results",
    "format_vbench_markdown",
]

QUALITY_DIMENSIONS = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "dynamic_degree",
    "aesthetic_quality",
    "imaging_quality",
)
SEMANTIC_DIMENSIONS = (
    "object_class",
    "multiple_objects",
    "human_action",
    "color",
    "spatial_relationship",
    "scene",
    "appearance_style",
    "temporal_style",
    "overall_consistency",
)
VBENCH_DIMENSIONS = QUALITY_DIMENSIONS + SEMANTIC_DIMENSIONS

#: (Min, Max) per dimension.
NORMALIZE: Dict[str, tuple] = {
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
    "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0),
    "human_action": (0.0, 1.0),
    "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0),
    "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364),
    "overall_consistency": (0.0, 0.364),
}
DIM_WEIGHT: Dict[str, float] = {d: 1.0 for d in VBENCH_DIMENSIONS}
DIM_WEIGHT["dynamic_degree"] = 0.5
QUALITY_WEIGHT = 4.0
SEMANTIC_WEIGHT = 1.0


def aggregate_vbench(raw_scores: Mapping[str, float]) -> Dict[str, object]:
    """``raw_scores``: ``{dimension: mean raw score in [0, 1]}`` (VBench's ``*_eval_results.json`` means).

    Returns ``{"total", "quality", "semantic", "normalized": {dim: n_d / w_d}, "raw", "missing"}``; unknown
    dimension names raise ``ValueError``.
    """
    unknown = sorted(set(raw_scores) - set(VBENCH_DIMENSIONS))
    if unknown:
        raise ValueError(f"unknown VBench dimension(s) {unknown}; known: {', '.join(VBENCH_DIMENSIONS)}")
    weighted: Dict[str, float] = {}
    for dim in VBENCH_DIMENSIONS:
        lo, hi = NORMALIZE[dim]
        raw = float(raw_scores[dim]) if dim in raw_scores else None
        weighted[dim] = 0.0 if raw is None else (raw - lo) / (hi - lo) * DIM_WEIGHT[dim]
    quality = sum(weighted[d] for d in QUALITY_DIMENSIONS) / sum(DIM_WEIGHT[d] for d in QUALITY_DIMENSIONS)
    semantic = sum(weighted[d] for d in SEMANTIC_DIMENSIONS) / sum(DIM_WEIGHT[d] for d in SEMANTIC_DIMENSIONS)
    total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return {
        "total": total,
        "quality": quality,
        "semantic": semantic,
        "normalized": {d: weighted[d] / DIM_WEIGHT[d] for d in VBENCH_DIMENSIONS if d in raw_scores},
        "raw": {d: float(raw_scores[d]) for d in VBENCH_DIMENSIONS if d in raw_scores},
        "missing": [d for d in VBENCH_DIMENSIONS if d not in raw_scores],
    }


def load_vbench_results(paths: Iterable[str]) -> Dict[str, float]:
    """Read VBench ``*_eval_results.json`` files (``{dim: [mean, per_video]}``) -> ``{dim: mean}``; later files win."""
    out: Dict[str, float] = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for dim, value in data.items():
            out[dim] = float(value[0] if isinstance(value, (list, tuple)) else value)
    return out


def format_vbench_markdown(result: Mapping[str, object], title: Optional[str] = "VBench") -> str:
    """Markdown table of an :func:`aggregate_vbench` result (scores x 100 like the leaderboards)."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| score | value (%) |", "|---|---|"]
    for key in ("total", "quality", "semantic"):
        lines.append(f"| **{key.capitalize()}** | {100 * float(result[key]):.2f} |")
    lines += ["", "| dimension | group | raw (%) | normalised (%) |", "|---|---|---|---|"]
    for dim in VBENCH_DIMENSIONS:
        group = "quality" if dim in QUALITY_DIMENSIONS else "semantic"
        if dim in result["raw"]:
            lines.append(f"| {dim} | {group} | {100 * result['raw'][dim]:.2f} | {100 * result['normalized'][dim]:.2f} |")
        else:
            lines.append(f"| {dim} | {group} | missing (counted as 0) | 0.00 |")
    return "\n".join(lines) + "\n"


def find_result_files(folder: str) -> list:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith("_eval_results.json"))
