"""VBench evaluation harness (docs/rewards_eval.md): sample the prompt suite, static-filter the temporal-flickering samples, run the
``vbench`` package, aggregate Total / Quality / Semantic.

Layout under ``out_dir``::

    videos/                 {prompt}-{i}.mp4, i = 0..4 for every prompt (what VBench reads, mode vbench_standard)
    flicker_candidates/     {prompt}-{i}.mp4, i = 0..24 for the first 75 (temporal-flickering) prompts
    static_filter.json      which candidates were static and where they were copied
    vbench_results/         VBench's *_eval_results.json
    summary.json, summary.md

Sampling (docs/rewards_eval.md): prompts in VBench order (the first 75 are the temporal-flickering prompts); 25 samples for
those, 5 for the others; seed of a video = ``seed + global_index`` in that order; files written atomically; videos
already present are skipped, so an interrupted run resumes where it stopped.
Static filter (docs/rewards_eval.md, VBench ``static_filter``): RAFT on all consecutive pairs + two wrap-around pairs, top-2 %
flow per pair, :func:`~raven_video.rewards.dynamic_degree.vbench_is_static`; the first <= 5 static candidates of each
flicker prompt (by sample index) become ``videos/{prompt}-{0..4}.mp4``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .pipeline_utils import call_pipeline
from .vbench_scores import aggregate_vbench, find_result_files, format_vbench_markdown, load_vbench_results
from ..utils.video_io import cleanup_partial_files, read_video, save_video

logger = logging.getLogger(__name__)

__all__ = [
    "VideoJob",
    "load_vbench_prompts",
    "plan_vbench_samples",
    "sample_videos",
    "static_filter",
    "static_pair_scores",
    "run_vbench",
    "score_vbench_results",
    "DEFAULT_SEED",
    "NUM_FLICKER_PROMPTS",
]

DEFAULT_SEED = 20001019  # RAVEN's vbench_t2v engine (docs/rewards_eval.md)
NUM_FLICKER_PROMPTS = 75
MAX_NAME_BYTES = 250


@dataclass
class VideoJob:
    """One video to sample: ``name`` is the VBench prompt used in the file name, ``prompt`` the conditioning text."""

    name: str
    prompt: str
    index: int
    seed: int
    path: str


def load_vbench_prompts(path: Optional[str] = None) -> List[str]:
    """VBench prompt suite in VBench order, duplicates removed (file names must be unique).

    ``path``: a ``.txt`` file (one prompt per line, e.g. VBench's ``prompts/all_dimension.txt``) or a VBench
    ``*_full_info.json``; default: the ``VBench_full_info.json`` shipped in the ``vbench`` wheel (944 unique prompts,
    the first 75 being the temporal-flickering ones).
    """
    if path is None:
        import importlib.util

        spec = importlib.util.find_spec("vbench")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("no prompt file given and the `vbench` package is not installed; pass --prompts FILE")
        path = os.path.join(list(spec.submodule_search_locations)[0], "VBench_full_info.json")
    if path.endswith(".json"):
        with open(path) as f:
            prompts = [entry["prompt_en"] for entry in json.load(f)]
    else:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    seen, unique = set(), []
    for p in prompts:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


def _check_name(name: str) -> str:
    if "/" in name or "\0" in name:
        raise ValueError(f"prompt {name!r} cannot be a file name (contains '/' or NUL)")
    if len(f"{name}-00.mp4".encode()) > MAX_NAME_BYTES:
        raise ValueError(f"prompt is too long for a VBench file name ({len(name.encode())} bytes): {name[:60]!r}...")
    return name


def plan_vbench_samples(
    prompts: Sequence[str],
    out_dir: str,
    extended_prompts: Optional[Sequence[str]] = None,
    samples_per_prompt: int = 5,
    num_flicker_prompts: int = NUM_FLICKER_PROMPTS,
    flicker_samples: int = 25,
    seed: int = DEFAULT_SEED,
) -> List[VideoJob]:
    """All videos of the suite in sampling order (docs/rewards_eval.md). ``extended_prompts`` (same length) condition the
    pipeline while the VBench ``prompts`` name the files (RAVEN uses Self-Forcing's extended prompts)."""
    if extended_prompts is not None and len(extended_prompts) != len(prompts):
        raise ValueError(f"{len(extended_prompts)} extended prompts for {len(prompts)} VBench prompts; they must match")
    jobs, k = [], 0
    for p, name in enumerate(prompts):
        _check_name(name)
        flicker = p < num_flicker_prompts
        n = flicker_samples if flicker else samples_per_prompt
        folder = os.path.join(out_dir, "flicker_candidates" if flicker else "videos")
        cond = extended_prompts[p] if extended_prompts is not None else name
        for i in range(n):
            jobs.append(VideoJob(name, cond, i, seed + k, os.path.join(folder, f"{name}-{i}.mp4")))
            k += 1
    return jobs


def sample_videos(pipe, jobs: Sequence[VideoJob], batch_size: int = 4, num_frames: int = 81, height: int = 480,
                  width: int = 832, fps: float = 16.0, generator_device: str = "cpu", progress: bool = True,
                  **pipe_kwargs) -> int:
    """Sample the jobs whose file is missing (resumable); returns the number of videos written."""
    for folder in {os.path.dirname(j.path) for j in jobs}:
        os.makedirs(folder, exist_ok=True)
        cleanup_partial_files(folder)
    todo = [j for j in jobs if not os.path.exists(j.path)]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="sampling", unit="video", disable=not progress)
    written = 0
    for s in range(0, len(todo), batch_size):
        batch = todo[s : s + batch_size]
        frames = call_pipeline(pipe, [j.prompt for j in batch], [j.seed for j in batch], num_frames, height, width,
                               generator_device=generator_device, **pipe_kwargs)
        for job, video in zip(batch, frames):
            save_video(video, job.path, fps=fps, crf=18)
            written += 1
        bar.update(len(batch))
    bar.close()
    return written


def static_pair_scores(dd_reward, frames: torch.Tensor, top_fraction: float = 0.02) -> List[float]:
    """VBench ``static_filter`` per-pair scores for one uint8 video ``[F, 3, H, W]``: all consecutive pairs, then
    first->last and last->first; top-2 % flow magnitude each (RAFT at native resolution, 20 updates)."""
    from raven_video.rewards.dynamic_degree import top_fraction_flow_magnitude

    dd_reward.load()
    frames = frames.to(dd_reward.device)
    first = torch.cat([frames[:-1], frames[:1], frames[-1:]])
    second = torch.cat([frames[1:], frames[-1:], frames[:1]])
    scores = []
    with torch.inference_mode():
        for s in range(0, first.shape[0], dd_reward.pair_batch_size):
            sl = slice(s, s + dd_reward.pair_batch_size)
            scores.append(top_fraction_flow_magnitude(dd_reward._flow(first[sl], second[sl]), top_fraction))
    return torch.cat(scores).cpu().tolist()


def static_filter(dd_reward, out_dir: str, prompts: Sequence[str], num_flicker_prompts: int = NUM_FLICKER_PROMPTS,
                  flicker_samples: int = 25, keep: int = 5, progress: bool = True) -> Dict[str, dict]:
    """Copy the first ``keep`` static candidates of each flicker prompt to ``videos/{prompt}-{0..keep-1}.mp4``.

    Resumable: a prompt whose ``keep`` outputs already exist is skipped; decisions are cached in
    ``static_filter.json``. Returns ``{prompt: {"static": [candidate indices], "checked": n}}``.
    """
    from raven_video.rewards.dynamic_degree import vbench_is_static

    cand_dir, video_dir = os.path.join(out_dir, "flicker_candidates"), os.path.join(out_dir, "videos")
    os.makedirs(video_dir, exist_ok=True)
    record_path = os.path.join(out_dir, "static_filter.json")
    record = json.load(open(record_path)) if os.path.exists(record_path) else {}
    for name in tqdm(list(prompts[:num_flicker_prompts]), desc="static filter", disable=not progress):
        if all(os.path.exists(os.path.join(video_dir, f"{name}-{k}.mp4")) for k in range(keep)):
            continue
        entry = record.get(name, {"static": [], "decisions": {}})
        for i in range(flicker_samples):
            if len(entry["static"]) >= keep:
                break
            src = os.path.join(cand_dir, f"{name}-{i}.mp4")
            if str(i) in entry["decisions"]:
                continue
            if not os.path.exists(src):
                logger.warning("missing flicker candidate %s", src)
                continue
            video, _ = read_video(src)
            frames = torch.from_numpy(video).permute(0, 3, 1, 2)
            is_static = vbench_is_static(static_pair_scores(dd_reward, frames), frames.shape[0], min(frames.shape[-2:]))
            entry["decisions"][str(i)] = bool(is_static)
            if is_static:
                entry["static"].append(i)
        for k, i in enumerate(entry["static"][:keep]):
            dst = os.path.join(video_dir, f"{name}-{k}.mp4")
            if not os.path.exists(dst):
                tmp = os.path.join(video_dir, f".partial-copy-{k}.mp4")
                shutil.copyfile(os.path.join(cand_dir, f"{name}-{i}.mp4"), tmp)
                os.replace(tmp, dst)
        if len(entry["static"]) < keep:
            logger.warning("prompt %r has only %d static videos of %d", name, len(entry["static"]), flicker_samples)
        record[name] = entry
        tmp = record_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, record_path)
    return record


def run_vbench(videos_dir: str, results_dir: str, dimensions: Sequence[str], name: str = "raven",
               device: str = "cuda", full_info_json: Optional[str] = None, local: bool = True, **kwargs) -> str:
    """Run ``vbench.VBench(...).evaluate`` (mode ``vbench_standard``) on ``dimensions``; returns the results file.

    ``local=True`` loads every model from ``$VBENCH_CACHE_DIR``; VBench only
    downloads what is missing there.
    """
    try:
        from raven_video.rewards._torchvision_compat import ensure_torchvision_importable

        ensure_torchvision_importable()
        from vbench import VBench
    except ImportError as e:
        raise ImportError(
            "the `vbench` package is needed: `pip install --no-deps vbench==0.1.5` plus the wheels listed in "
            "docs/rewards_eval.md"
        ) from e
    from .vbench_scores import VBENCH_DIMENSIONS

    bad = [d for d in dimensions if d not in VBENCH_DIMENSIONS]
    if bad:
        raise ValueError(f"unknown VBench dimension(s) {bad}; choose from {', '.join(VBENCH_DIMENSIONS)}")
    if full_info_json is None:
        import vbench as _vb

        full_info_json = os.path.join(os.path.dirname(_vb.__file__), "VBench_full_info.json")
    os.makedirs(results_dir, exist_ok=True)
    bench = VBench(torch.device(device), full_info_json, results_dir)
    bench.evaluate(videos_path=videos_dir, name=name, dimension_list=list(dimensions), local=local,
                   mode="vbench_standard", **kwargs)
    return os.path.join(results_dir, f"{name}_eval_results.json")


def score_vbench_results(results: Sequence[str], out_dir: Optional[str] = None, title: str = "VBench") -> dict:
    """Aggregate VBench result files (or folders of them) and write ``summary.json`` / ``summary.md``."""
    files: List[str] = []
    for r in results:
        files.extend(find_result_files(r) if os.path.isdir(r) else [r])
    if not files:
        raise FileNotFoundError(f"no *_eval_results.json found in {list(results)}")
    summary = aggregate_vbench(load_vbench_results(files))
    summary["result_files"] = files
    if out_dir is not None:
        write_summary(summary, out_dir, format_vbench_markdown(summary, title))
    return summary


def write_summary(summary: dict, out_dir: str, markdown: str, stem: str = "summary") -> None:
    os.makedirs(out_dir, exist_ok=True)
    for ext, text in (("json", json.dumps(summary, indent=2)), ("md", markdown)):
        path = os.path.join(out_dir, f"{stem}.{ext}")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def jobs_as_dicts(jobs: Sequence[VideoJob]) -> List[dict]:
    return [asdict(j) for j in jobs]
