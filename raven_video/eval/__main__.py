"""Command line: ``python -m raven_video.eval {sample,static-filter,vbench,score,rewards} ...``.

Examples::

    # full VBench protocol (docs/rewards_eval.md): sample, static filter, evaluate, aggregate
    python -m raven_video.eval sample --pipeline path/to/pipeline --out_dir runs/vbench --extended_prompts ext.txt
    python -m raven_video.eval static-filter --out_dir runs/vbench --raft_checkpoint ~/.cache/vbench/raft_model/models/raft-things.pth
    python -m raven_video.eval vbench --out_dir runs/vbench --dimensions subject_consistency dynamic_degree ...
    python -m raven_video.eval score runs/vbench/vbench_results --out_dir runs/vbench

    # quick reward eval (no VBench)
    python -m raven_video.eval rewards --pipeline path/to/pipeline --prompts prompts.txt \
        --rewards dynamic_degree,aesthetic,imaging,motion_smoothness --vbench_cache_dir ~/.cache/vbench --out_dir runs/rw
    python -m raven_video.eval rewards --videos_dir runs/vbench/videos --rewards proxy_motion,proxy_flicker --out_dir runs/rw
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Optional

import torch

ALLOW_PICKLE_HELP = ("consent to unpickle reward checkpoints that torch.load(weights_only=True) refuses; unpickling runs "
                     "code stored in the file: trusted files only")


def _read_prompts(path: Optional[str]) -> Optional[List[str]]:
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", required=False, help="pipeline folder / Hub id, 'module:function', or 'synthetic'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--num_frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--guidance_scale", type=float, default=None, help="passed to the pipeline when given")


def _pipe_kwargs(args) -> Dict[str, float]:
    return {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m raven_video.eval", description=__doc__.split("\n")[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="sample the VBench prompt suite (resumable)")
    _add_pipeline_args(p)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--prompts", default=None, help="VBench prompts (.txt or full_info .json); default: vbench wheel")
    p.add_argument("--extended_prompts", default=None, help="conditioning prompts, one per VBench prompt (.txt)")
    p.add_argument("--samples_per_prompt", type=int, default=5)
    p.add_argument("--num_flicker_prompts", type=int, default=75)
    p.add_argument("--flicker_samples", type=int, default=25)
    p.add_argument("--max_prompts", type=int, default=None, help="only the first N prompts (smoke runs)")

    p = sub.add_parser("static-filter", help="VBench static filter of the temporal-flickering candidates")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--prompts", default=None)
    p.add_argument("--raft_checkpoint", default=None, help="raft-things.pth (VBench cache) or torchvision C_T_V1 file")
    p.add_argument("--flow_backend", default="raft", choices=["raft", "farneback"])
    p.add_argument("--allow_pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    p.add_argument("--num_flicker_prompts", type=int, default=75)
    p.add_argument("--flicker_samples", type=int, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    p = sub.add_parser("vbench", help="run the vbench package on chosen dimensions, then aggregate")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--videos_dir", default=None, help="default: OUT_DIR/videos")
    p.add_argument("--dimensions", nargs="+", default=None, help="default: all 16")
    p.add_argument("--name", default="raven")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no_local", action="store_true", help="let VBench download weights (default: $VBENCH_CACHE_DIR)")

    p = sub.add_parser("score", help="aggregate VBench *_eval_results.json into Total / Quality / Semantic")
    p.add_argument("results", nargs="+", help="result files or folders")
    p.add_argument("--out_dir", default=None)

    p = sub.add_parser("rewards", help="mean ± std of each reward over a prompt set or a video folder")
    _add_pipeline_args(p)
    p.add_argument("--prompts", default=None, help="prompt file (.txt, one per line)")
    p.add_argument("--videos_dir", default=None, help="score existing {prompt}-{i}.mp4 files instead of sampling")
    p.add_argument("--samples_per_prompt", type=int, default=1)
    p.add_argument("--rewards", default="proxy_motion,proxy_flicker,proxy_smoothness,proxy_sharpness_drift",
                   help="comma-separated reward models: " + ", ".join(
                       ["dynamic_degree", "motion_smoothness", "aesthetic", "imaging", "text_alignment",
                        "proxy_motion", "proxy_flicker", "proxy_smoothness", "proxy_sharpness_drift"]))
    p.add_argument("--vbench_cache_dir", default=None, help="take RAFT/AMT/CLIP/LAION/MUSIQ files from this cache")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="checkpoint of one reward, e.g. dynamic_degree=raft-things.pth (repeatable)")
    p.add_argument("--videoalign_base", default=None, help="Qwen2-VL-2B-Instruct folder")
    p.add_argument("--videoalign_checkpoint", default=None, help="VideoReward folder")
    p.add_argument("--reward_device", default=None)
    p.add_argument("--random_init", action="store_true", help="random reward weights (smoke tests only)")
    p.add_argument("--allow_pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    p.add_argument("--out_dir", required=True)
    p.add_argument("--save_videos", action="store_true")
    return parser


def _build_rewards(args):
    from raven_video.rewards.composer import REWARD_FIELDS, build_reward, checkpoints_from_vbench_cache

    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    unknown = [n for n in names if n not in REWARD_FIELDS]
    if unknown:
        raise SystemExit(f"error: unknown reward(s) {unknown}; choose from {', '.join(REWARD_FIELDS)}")
    ckpts: Dict[str, object] = checkpoints_from_vbench_cache(args.vbench_cache_dir) if args.vbench_cache_dir else {}
    for item in args.checkpoint:
        if "=" not in item:
            raise SystemExit(f"error: --checkpoint expects NAME=PATH, got {item!r}")
        k, v = item.split("=", 1)
        ckpts[k.strip()] = v.strip()
    if args.videoalign_base or args.videoalign_checkpoint:
        ckpts["text_alignment"] = {"base_model": args.videoalign_base, "checkpoint": args.videoalign_checkpoint}
    device = args.reward_device or args.device
    return [build_reward(n, ckpts, random_init=args.random_init, device=device, allow_pickle=args.allow_pickle)
            for n in names]


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    progress = not args.quiet
    from .pipeline_utils import load_pipeline
    from .vbench_harness import (DEFAULT_SEED, load_vbench_prompts, plan_vbench_samples, run_vbench, sample_videos,
                                 score_vbench_results, static_filter)

    if args.command == "sample":
        if not args.pipeline:
            raise SystemExit("error: sample needs --pipeline")
        prompts = load_vbench_prompts(args.prompts)
        extended = _read_prompts(args.extended_prompts)
        if args.max_prompts is not None:
            prompts = prompts[: args.max_prompts]
            extended = extended[: args.max_prompts] if extended else None
        jobs = plan_vbench_samples(prompts, args.out_dir, extended, args.samples_per_prompt, args.num_flicker_prompts,
                                   args.flicker_samples, DEFAULT_SEED if args.seed is None else args.seed)
        pipe = load_pipeline(args.pipeline, args.device, args.dtype)
        n = sample_videos(pipe, jobs, args.batch_size, args.num_frames, args.height, args.width, args.fps,
                          progress=progress, **_pipe_kwargs(args))
        print(json.dumps({"planned": len(jobs), "written": n, "out_dir": args.out_dir}))
    elif args.command == "static-filter":
        from raven_video.rewards.dynamic_degree import DynamicDegreeReward

        dd = DynamicDegreeReward(args.raft_checkpoint, flow_backend=args.flow_backend, device=args.device,
                                 allow_pickle=args.allow_pickle)
        record = static_filter(dd, args.out_dir, load_vbench_prompts(args.prompts), args.num_flicker_prompts,
                               args.flicker_samples, progress=progress)
        print(json.dumps({"prompts": len(record), "static": sum(len(v["static"]) for v in record.values())}))
    elif args.command == "vbench":
        from .vbench_scores import VBENCH_DIMENSIONS

        results_dir = os.path.join(args.out_dir, "vbench_results")
        run_vbench(args.videos_dir or os.path.join(args.out_dir, "videos"), results_dir,
                   args.dimensions or list(VBENCH_DIMENSIONS), args.name, args.device, local=not args.no_local)
        summary = score_vbench_results([results_dir], args.out_dir)
        print(json.dumps({k: summary[k] for k in ("total", "quality", "semantic", "missing")}))
    elif args.command == "score":
        summary = score_vbench_results(args.results, args.out_dir)
        print(json.dumps({k: summary[k] for k in ("total", "quality", "semantic", "missing")}))
    elif args.command == "rewards":
        from .reward_eval import evaluate_rewards, write_reward_report

        rewards = _build_rewards(args)
        if args.videos_dir:
            result = evaluate_rewards(rewards, videos_dir=args.videos_dir, batch_size=args.batch_size,
                                      progress=progress)
        else:
            if not args.pipeline or not args.prompts:
                raise SystemExit("error: rewards needs --videos_dir, or --pipeline with --prompts")
            pipe = load_pipeline(args.pipeline, args.device, args.dtype)
            result = evaluate_rewards(
                rewards, pipe=pipe, prompts=_read_prompts(args.prompts), samples_per_prompt=args.samples_per_prompt,
                seed=0 if args.seed is None else args.seed, batch_size=args.batch_size, num_frames=args.num_frames,
                height=args.height, width=args.width, fps=args.fps,
                save_dir=os.path.join(args.out_dir, "videos") if args.save_videos else None, progress=progress,
                **_pipe_kwargs(args),
            )
        write_reward_report(result, args.out_dir)
        print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
