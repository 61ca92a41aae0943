#!/usr/bin/env python
"""Issue 13's grid on the video world: every history, chunk weighting and CM-GRPO variant over seeds, one run per GPU,
resumable (``raven_video/world/grid.py``; how to run it: ``docs/world_grid.md``).

    python scripts/world_grid.py --root runs/grid --ode_init runs/world/ode_init --teacher runs/world/teacher \\
        --prompts runs/world/prompts/train.txt --latents runs/world/latents --gpus 0,1 --seeds 0,1,2 --dry_run
    python scripts/world_grid.py ... --gpus 0,1,2,3 --deadline 240 --kill_after 570   # a 10-minute stretch
    python scripts/world_report.py --root runs/grid --output docs/world_results.md
"""

from __future__ import annotations

import argparse
import os
import sys

from raven_video.world import grid
from raven_video.world.recipe import parse_extras

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ints(p, flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag} {text!r}: give comma-separated integers, e.g. 0,1,2.")
    if not values or len(set(values)) != len(values) or min(values) < 0:
        p.error(f"{flag} {text!r}: give distinct non-negative integers, e.g. 0,1,2.")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="grid folder (created): runs/, eval/, logs/, grid.json")
    p.add_argument("--ode_init", required=True, help="the ODE-initialised student (CausalWanPipeline folder)")
    p.add_argument("--teacher", default=None,
                   help="the teacher pipeline folder (train_raven.py --teacher_model); needed when the grid has RAVEN runs")
    p.add_argument("--prompts", required=True, help="training prompt file (the recipe's <root>/prompts/train.txt)")
    p.add_argument("--latents", default=None,
                   help="latent dataset (the recipe's <root>/latents); needed by the teacher_forcing / "
                        "diffusion_forcing histories")
    p.add_argument("--gpus", default="0", help="comma-separated GPU indices")
    p.add_argument("--runs_per_gpu", type=int, default=1,
                   help="runs training on each GPU at a time (the world model leaves an H200 mostly idle; at most 8 per "
                        "H200: each run holds 7-14 GB, docs/world_grid.md)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--budget_seconds", default="raven=300,cm_grpo=150",
                   help="training time per run (--max_train_time): seconds, or raven=S,cm_grpo=S; with "
                        "--budget_steps only a cap")
    p.add_argument("--budget_steps", default=None,
                   help="optimizer steps per run (--max_train_steps), the same for every method: steps, or "
                        "raven=N,cm_grpo=N (default: none, the time budget ends each run)")
    p.add_argument("--extra", action="append", default=[], metavar="STAGE=FLAGS",
                   help="more flags for every run of a stage, after its args file, e.g. 'raven=--train_batch_size 32' "
                        "(repeatable; the grid's own flags, e.g. --history, still win)")
    p.add_argument("--max_evals", type=int, default=None,
                   help="evaluations running at once on the machine (they score on the CPU; the 2026-11-30 pilot with "
                        "22 at once beside training hit a load average of 400); default: no limit")
    p.add_argument("--tail_evals", type=int, default=None,
                   help="evaluations at once while no run trains (the GPUs are then idle); default: 2 x --max_evals")
    p.add_argument("--threads_per_run", type=int, default=None,
                   help="CPU threads (OMP_NUM_THREADS, MKL_NUM_THREADS) per launched run and evaluation: many torch "
                        "processes on one host oversubscribe the CPUs (16 runs x 32 threads ran 3-6x slower on a "
                        "32-core H200 host); default: CPUs // (GPUs x runs_per_gpu + max_evals), or an "
                        "OMP_NUM_THREADS already set")
    p.add_argument("--eval_workers", type=int, default=None,
                   help="evaluate_world.py --workers per evaluation (default: its own, up to 16)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds from now after which no run is launched (running ones end at their budget)")
    p.add_argument("--kill_after", type=float, default=None,
                   help="seconds from now at which running runs are interrupted (resumable; for fixed-length stretches)")
    p.add_argument("--best_raven", default=None,
                   help="pipeline folder the CM-GRPO runs start from (e.g. the best history-raven export carried over "
                        "from an earlier session); default: resolved from the grid's own raven-history runs")
    p.add_argument("--only", default=None, help=f"comma-separated groups of {','.join(grid.GROUPS)}")
    p.add_argument("--config_dir", default=os.path.join(REPO, "configs", "world"),
                   help="folder of raven.args / cm_grpo.args / evaluate.args")
    p.add_argument("--dry_run", action="store_true", help="print every command and the estimate; launch nothing")
    args = p.parse_args(argv)
    args.gpu_list = [str(g) for g in _ints(p, "--gpus", args.gpus)]
    args.seed_list = _ints(p, "--seeds", args.seeds)
    try:
        args.budgets = grid.parse_budgets(args.budget_seconds)
        args.steps = grid.parse_steps(args.budget_steps) if args.budget_steps is not None else None
    except ValueError as error:
        p.error(str(error))
    try:
        args.extra_map = parse_extras(args.extra, tuple(grid.SCRIPTS))
    except ValueError as error:
        p.error(str(error))
    if args.runs_per_gpu < 1:
        p.error(f"--runs_per_gpu {args.runs_per_gpu} must be >= 1.")
    if args.max_evals is not None and args.max_evals < 1:
        p.error(f"--max_evals {args.max_evals} must be >= 1.")
    if args.tail_evals is not None and (args.max_evals is None or args.tail_evals < args.max_evals):
        p.error(f"--tail_evals {args.tail_evals} needs --max_evals and must be >= it ({args.max_evals}).")
    if args.threads_per_run is not None and args.threads_per_run < 1:
        p.error(f"--threads_per_run {args.threads_per_run} must be >= 1.")
    if args.eval_workers is not None and args.eval_workers < 1:
        p.error(f"--eval_workers {args.eval_workers} must be >= 1.")
    args.only_groups = None
    if args.only is not None:
        args.only_groups = [g.strip() for g in args.only.split(",") if g.strip()]
        unknown = [g for g in args.only_groups if g not in grid.GROUPS]
        if unknown or not args.only_groups:
            p.error(f"--only {args.only!r}: choose from {','.join(grid.GROUPS)}.")
    for name in ("deadline", "kill_after"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            p.error(f"--{name} {value} must be > 0 seconds.")
    if not os.path.isdir(args.config_dir):
        p.error(f"--config_dir {args.config_dir!r} is not a folder.")
    if args.best_raven is not None and not os.path.isfile(os.path.join(args.best_raven, "model_index.json")):
        p.error(f"--best_raven {args.best_raven!r} is not a pipeline folder (no model_index.json).")
    if not args.dry_run:
        for name in ("ode_init", "teacher"):
            path = getattr(args, name)
            if path is None:  # --teacher: checked in main() once the grid's runs are known
                continue
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                p.error(f"--{name} {path!r} is not a pipeline folder (no model_index.json).")
        if not os.path.isfile(args.prompts):
            p.error(f"--prompts {args.prompts!r} is not a file.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    specs = grid.build_grid(args.seed_list, only=args.only_groups, best_raven_given=args.best_raven is not None)
    if args.teacher is None and any(spec.stage == "raven" for spec in specs):
        sys.exit("error: --teacher is required: the grid has RAVEN runs (train_raven.py --teacher_model); pass the "
                 "teacher pipeline folder, or keep only CM-GRPO groups with --only and --best_raven.")
    if grid.needs_latents(specs) and not args.dry_run and not (args.latents and os.path.isdir(args.latents)):
        sys.exit(f"error: --latents {args.latents!r}: the teacher_forcing / diffusion_forcing runs need the latent "
                 "dataset folder (or leave out the history group with --only).")
    config = grid.GridConfig(root=os.path.abspath(args.root), ode_init=os.path.abspath(args.ode_init),
                             teacher=os.path.abspath(args.teacher) if args.teacher else None, prompts=os.path.abspath(args.prompts),
                             latents=os.path.abspath(args.latents) if args.latents else None,
                             config_dir=os.path.abspath(args.config_dir), budgets=args.budgets, steps=args.steps,
                             eval_workers=args.eval_workers, extra=args.extra_map)
    scheduler = grid.Scheduler(config, specs, args.gpu_list, deadline=args.deadline, kill_after=args.kill_after,
                               runs_per_gpu=args.runs_per_gpu, max_evals=args.max_evals,
                               threads_per_run=args.threads_per_run,
                               best_raven=args.best_raven, tail_evals=args.tail_evals)
    if args.dry_run:
        plan = scheduler.dry_run()
        counts: dict[str, int] = {}
        for spec in specs:
            for group, _ in spec.groups:
                counts[group] = counts.get(group, 0) + 1
        gpu_seconds = grid.estimate_gpu_seconds([spec for spec, _ in plan], args.budgets)
        print(f"# {len(specs)} runs ({len(plan)} to do); per group (a shared run counts in each of its groups): "
              + ", ".join(f"{g} {n}" for g, n in counts.items()))
        print(f"# estimate: {gpu_seconds / 60:.0f} slot-minutes at most (budget {args.budgets}"
              + (f", steps {args.steps}" if args.steps else "") + f" + ~{grid.STARTUP_SECONDS_GUESS:.0f} s start-up + "
              f"~{grid.EVAL_SECONDS_GUESS:.0f} s evaluation per run, both guesses), about "
              f"{gpu_seconds / 60 / (len(args.gpu_list) * args.runs_per_gpu):.0f} minutes on {len(args.gpu_list)} "
              f"GPU(s) x {args.runs_per_gpu} run(s) each if sharing a GPU costs nothing")
        return {"plan": [spec.name for spec, _ in plan], "gpu_seconds": gpu_seconds}
    return scheduler.run()


if __name__ == "__main__":
    main()
