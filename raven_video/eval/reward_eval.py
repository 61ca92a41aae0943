"""Quick reward evaluation without VBench: mean ± std of each reward field over a prompt set.

Videos come either from a pipeline (sampled here, optionally saved) or from a folder of ``{prompt}-{i}.mp4`` files.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from raven_video.rewards.base import VideoReward, videos_from_numpy

from .pipeline_utils import call_pipeline
from ..utils.video_io import read_video, save_video

__all__ = ["evaluate_rewards", "summarize_scores", "format_reward_markdown", "videos_in_folder"]


def summarize_scores(per_video: Sequence[Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """``[{field: value}]`` -> ``{field: {"mean", "std" (population), "n"}}``."""
    fields = sorted({k for row in per_video for k, v in row.items() if isinstance(v, (int, float))})
    out = {}
    for f in fields:
        vals = torch.tensor([row[f] for row in per_video if f in row], dtype=torch.float64)
        out[f] = {"mean": float(vals.mean()), "std": float(vals.std(unbiased=False)), "n": int(vals.numel())}
    return out


def format_reward_markdown(summary: Dict[str, Dict[str, float]], title: str = "Reward evaluation") -> str:
    lines = [f"## {title}", "", "| reward | mean | std | n |", "|---|---|---|---|"]
    for field, s in summary.items():
        lines.append(f"| {field} | {s['mean']:.4f} | {s['std']:.4f} | {s['n']} |")
    return "\n".join(lines) + "\n"


def videos_in_folder(folder: str) -> List[tuple]:
    """``{prompt}-{i}.mp4`` files -> ``[(path, prompt)]`` sorted by name (VBench's file naming)."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*.mp4"))):
        stem = os.path.basename(path)[:-4]
        if stem.startswith("."):
            continue
        out.append((path, re.sub(r"-\d+$", "", stem)))
    return out


def _score_batch(rewards: Sequence[VideoReward], frames: torch.Tensor, prompts: List[str], fps: float):
    result: Dict[str, torch.Tensor] = {}
    for reward in rewards:
        result.update(reward(frames, prompts=prompts if reward.needs_prompts else None, fps=fps))
    return [{k: float(v[i]) for k, v in result.items()} for i in range(frames.shape[0])]


def evaluate_rewards(
    rewards: Sequence[VideoReward],
    *,
    pipe=None,
    prompts: Optional[Sequence[str]] = None,
    videos_dir: Optional[str] = None,
    samples_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 4,
    num_frames: int = 81,
    height: int = 480,
    width: int = 832,
    fps: float = 16.0,
    save_dir: Optional[str] = None,
    generator_device: str = "cpu",
    progress: bool = True,
    **pipe_kwargs,
) -> dict:
    """Score videos with every reward; returns ``{"summary": {field: {mean, std, n}}, "videos": [per-video rows]}``.

    Give either ``pipe`` + ``prompts`` (seed of video k = ``seed + k``) or ``videos_dir``.
    """
    if not rewards:
        raise ValueError("no rewards to evaluate")
    if (pipe is None) == (videos_dir is None):
        raise ValueError("give exactly one of pipe (with prompts) or videos_dir")
    rows: List[dict] = []
    if videos_dir is not None:
        items = videos_in_folder(videos_dir)
        if not items:
            raise FileNotFoundError(f"no .mp4 files in {videos_dir}")
        for s in tqdm(range(0, len(items), batch_size), desc="rewards", disable=not progress):
            chunk = items[s : s + batch_size]
            decoded = [read_video(p) for p, _ in chunk]
            shapes = {v.shape for v, _ in decoded}
            if len(shapes) > 1:  # different sizes: score one by one
                for (path, prompt), (video, vfps) in zip(chunk, decoded):
                    frames = torch.from_numpy(video).permute(0, 3, 1, 2)[None]
                    for row in _score_batch(rewards, frames, [prompt], vfps):
                        rows.append({"video": path, "prompt": prompt, **row})
                continue
            frames = torch.from_numpy(__import__("numpy").stack([v for v, _ in decoded])).permute(0, 1, 4, 2, 3)
            for (path, prompt), row in zip(chunk, _score_batch(rewards, frames, [p for _, p in chunk], decoded[0][1])):
                rows.append({"video": path, "prompt": prompt, **row})
    else:
        if not prompts:
            raise ValueError("pipe given without prompts")
        jobs = [(p, seed + k) for k, p in enumerate(pr for pr in prompts for _ in range(samples_per_prompt))]
        for s in tqdm(range(0, len(jobs), batch_size), desc="rewards", disable=not progress):
            chunk = jobs[s : s + batch_size]
            np_frames = call_pipeline(pipe, [p for p, _ in chunk], [sd for _, sd in chunk], num_frames, height, width,
                                      generator_device=generator_device, **pipe_kwargs)
            if save_dir is not None:
                os.makedirs(save_dir, exist_ok=True)
                for (p, sd), video in zip(chunk, np_frames):
                    save_video(video, os.path.join(save_dir, f"{p[:200]}-{sd}.mp4"), fps=fps, crf=18)
            frames = videos_from_numpy(np_frames)
            for (p, sd), row in zip(chunk, _score_batch(rewards, frames, [p for p, _ in chunk], fps)):
                rows.append({"prompt": p, "seed": sd, **row})
    for row in rows:
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"reward {k!r} is not finite for {row.get('video', row.get('prompt'))}: {v}")
    return {"summary": summarize_scores(rows), "videos": rows}


def write_reward_report(result: dict, out_dir: str, title: str = "Reward evaluation") -> None:
    from .vbench_harness import write_summary

    write_summary(result, out_dir, format_reward_markdown(result["summary"], title), stem="rewards")
    with open(os.path.join(out_dir, "rewards_per_video.jsonl"), "w") as f:
        for row in result["videos"]:
            f.write(json.dumps(row) + "\n")
