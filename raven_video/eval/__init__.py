"""Evaluation: VBench harness + score aggregation, and a quick reward eval (docs/rewards_eval.md).

Command line: ``python -m raven_video.eval --help``.
"""

from importlib import import_module

_LAZY = {
    "aggregate_vbench": "vbench_scores",
    "load_vbench_results": "vbench_scores",
    "format_vbench_markdown": "vbench_scores",
    "VBENCH_DIMENSIONS": "vbench_scores",
    "load_vbench_prompts": "vbench_harness",
    "plan_vbench_samples": "vbench_harness",
    "sample_videos": "vbench_harness",
    "static_filter": "vbench_harness",
    "run_vbench": "vbench_harness",
    "score_vbench_results": "vbench_harness",
    "evaluate_rewards": "reward_eval",
    "SyntheticVideoPipeline": "pipeline_utils",
    "load_pipeline": "pipeline_utils",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
