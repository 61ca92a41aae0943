#!/usr/bin/env python
"""The whole recipe on the procedural world, through the real training scripts, resumable stage by stage.

    python scripts/world_recipe.py --root runs/world                       # every stage, 1 process (GPU or CPU)
    python scripts/world_recipe.py --root runs/world --num_processes 4 --deadline 540   # 4 GPUs, stop after 9 min
    python scripts/world_recipe.py --root runs/world --stages teacher,ode_init --extra "teacher=--max_train_steps 50"

Stages (``configs/world/<stage>.args`` hold each script's flags; ``--extra`` appends more):

====== ====================================================================================================
vae       ``train_vae.py`` twice: the world's small ``AutoencoderKLWan`` on 9-frame clips from a Kaiming init, then
          fine-tuned on 33-frame clips (skipped with ``--vae <folder>``, e.g. the shipped one)
base      a ``CausalWanPipeline`` folder: that VAE, the word-level tokenizer, the frozen text encoder, a random
          ``CausalWanTransformer3DModel`` (``raven_video.world.stack``); prompt files of the train / held-out splits
latents   ``scripts/precompute_latents.py``: training clips -> normalised latents
teacher   ``train_teacher.py``: bidirectional flow-matching teacher
ode_init  ``train_ode_init.py``: the causal student regressed on the teacher's PF-ODE trajectories
raven     ``train_raven.py``: DMD with the training-time test (history ``raven``)
cm_grpo   ``train_cm_grpo.py``: CM-GRPO with LoRA and the world reward (``--reward_weights world=1``)
evaluate  ``scripts/evaluate_world.py`` on the teacher and every student stage (held-out prompts)
====== ====================================================================================================

A stage whose output is complete is skipped; an interrupted one resumes from its latest checkpoint
(``--resume_from_checkpoint latest``), so the recipe runs in stretches (``--deadline`` stops the running stage at a
wall-clock limit, its checkpoints intact). ``<root>/recipe.json`` records each stage's command, wall time and last
logged values; ``<root>/curves.png`` plots every stage's training curve. Several seeds or variants run side by side
on a multi-GPU machine as separate roots with ``CUDA_VISIBLE_DEVICES`` set per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Callable

from raven_video.world.recipe import Deadline, parse_extras, script_command
from raven_video.world.recipe import run as run_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("vae", "base", "latents", "teacher", "ode_init", "raven", "cm_grpo", "evaluate")


@dataclass
class Context:
    root: str
    config_dir: str
    num_processes: int
    main_process_port: int | None
    extra: dict
    vae: str | None
    num_train_prompts: int
    num_eval_prompts: int
    seed: int

    def path(self, *parts) -> str:
        return os.path.join(self.root, *parts)

    def args_file(self, stage: str) -> list[str]:
        path = os.path.join(self.config_dir, f"{stage}.args")
        return [f"@{path}"] if os.path.isfile(path) else []

    @property
    def vae_dir(self) -> str:
        return self.vae or self.path("vae")


def _script(ctx: Context, script: str, stage: str, *args: str) -> list[str]:
    """``python script`` (one process) or ``accelerate launch`` (several), with the stage's args file + extras."""
    return script_command(os.path.join(REPO, script), ctx.args_file(stage), *args, num_processes=ctx.num_processes,
                          main_process_port=ctx.main_process_port, extra=ctx.extra.get(stage, ""))


def _exported(folder: str) -> Callable[[Context], bool]:
    return lambda ctx: os.path.isfile(ctx.path(folder, "model_index.json"))


# ----------------------------------------------------------------------------------------------------- base stage
def build_base(ctx: Context) -> None:
    """The untrained pipeline folder and the prompt files (in-process: no script needed). The transformer is
    :data:`~raven_video.world.stack.WORLD_TRANSFORMER`, updated by ``<config_dir>/transformer.json`` if present."""
    import torch
    from diffusers import AutoencoderKLWan

    from raven_video.models.transformer_causal_wan import CausalWanTransformer3DModel
    from raven_video.world.data import write_prompt_file
    from raven_video.world.stack import WORLD_TRANSFORMER, world_pipeline

    vae = AutoencoderKLWan.from_pretrained(ctx.vae_dir)
    config = dict(WORLD_TRANSFORMER)
    overrides = os.path.join(ctx.config_dir, "transformer.json")
    if os.path.isfile(overrides):  # e.g. the scaled-down recipe of the tests
        config.update(json.load(open(overrides, encoding="utf-8")))
    with torch.random.fork_rng():
        torch.manual_seed(ctx.seed)
        transformer = CausalWanTransformer3DModel(**config)
    write_prompt_file(ctx.path("prompts", "train.txt"), ctx.num_train_prompts, split="train", evaluation=False)
    write_prompt_file(ctx.path("prompts", "heldout.txt"), ctx.num_eval_prompts, split="heldout", evaluation=True)
    tmp = ctx.path("base.tmp")
    world_pipeline(vae, transformer).save_pretrained(tmp)
    os.replace(tmp, ctx.path("base"))


# ----------------------------------------------------------------------------------------------------- commands
def commands(ctx: Context, stage: str) -> list[list[str]]:
    resume = ["--resume_from_checkpoint", "latest"]
    prompts = ctx.path("prompts", "train.txt")
    if stage == "vae":  # short clips from a Kaiming init, then longer clips (docs/world.md: the VAE)
        return [_script(ctx, "train_vae.py", "vae", "--output_dir", ctx.path("vae_short"), *resume),
                _script(ctx, "train_vae.py", "vae_long", "--pretrained_vae", ctx.path("vae_short"),
                        "--output_dir", ctx.path("vae"), *resume)]
    if stage == "latents":
        return [[sys.executable, os.path.join(REPO, "scripts", "precompute_latents.py"), *ctx.args_file("latents"),
                 "--vae", ctx.vae_dir, "--output_dir", ctx.path("latents"), *shlex.split(ctx.extra.get(stage, ""))]]
    if stage == "teacher":
        return [_script(ctx, "train_teacher.py", "teacher", "--pretrained_model_name_or_path", ctx.path("base"),
                        "--latent_dataset", ctx.path("latents"), "--output_dir", ctx.path("teacher"), *resume)]
    if stage == "ode_init":
        return [_script(ctx, "train_ode_init.py", "ode_init", "--pretrained_model_name_or_path", ctx.path("teacher"),
                        "--teacher_model", ctx.path("teacher"), "--prompts", prompts,
                        "--output_dir", ctx.path("ode_init"), *resume)]
    if stage == "raven":
        return [_script(ctx, "train_raven.py", "raven", "--pretrained_model_name_or_path", ctx.path("ode_init"),
                        "--teacher_model", ctx.path("teacher"), "--prompts", prompts,
                        "--output_dir", ctx.path("raven"), *resume)]
    if stage == "cm_grpo":
        return [_script(ctx, "train_cm_grpo.py", "cm_grpo", "--pretrained_model_name_or_path", ctx.path("raven"),
                        "--prompts", prompts, "--output_dir", ctx.path("cm_grpo"), *resume)]
    if stage == "evaluate":
        evaluate = [sys.executable, os.path.join(REPO, "scripts", "evaluate_world.py"), *ctx.args_file("evaluate"),
                    *shlex.split(ctx.extra.get(stage, ""))]
        runs = [[*evaluate, "--teacher", ctx.path("teacher"), "--references", "--output", ctx.path("eval", "teacher.json")]]
        for name, folder in (("ode_init", "ode_init"), ("raven", "raven"), ("cm_grpo", os.path.join("cm_grpo", "merged"))):
            runs.append([*evaluate, "--model", ctx.path(folder), "--output", ctx.path("eval", f"{name}.json")])
        return runs
    raise ValueError(stage)


DONE: dict[str, Callable[[Context], bool]] = {
    "vae": lambda ctx: ctx.vae is not None or os.path.isfile(ctx.path("vae", "metrics.json")),
    "base": _exported("base"),
    "latents": lambda ctx: os.path.isfile(ctx.path("latents", "metadata.jsonl")),
    "teacher": _exported("teacher"),
    "ode_init": _exported("ode_init"),
    "raven": _exported("raven"),
    "cm_grpo": lambda ctx: os.path.isfile(ctx.path("cm_grpo", "merged", "model_index.json")),
    "evaluate": lambda ctx: os.path.isfile(ctx.path("eval", "cm_grpo.json")),
}


# ----------------------------------------------------------------------------------------------------- running
def run(command: list[str], log_path: str, deadline: float | None) -> float:
    """:func:`raven_video.world.recipe.run` from the repository root (the stage resumes after a :class:`Deadline`)."""
    return run_command(command, log_path, deadline, cwd=REPO)


def last_logs(folder: str) -> dict:
    from raven_video.cli.training import read_metrics

    rows = read_metrics(os.path.join(folder, "logs"))
    return rows[-1] if rows else {}


def plot_curves(ctx: Context, path: str) -> None:
    """One panel per training stage: its loss (mean over 100 steps where logged) against the step."""
    try:
        import matplotlib
    except ImportError:
        print("[recipe] matplotlib is not installed: no curves.png (the curves are in each stage's "
              "logs/metrics.jsonl)", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raven_video.cli.training import read_metrics

    keys = {"vae": ("loss", "val_psnr"), "teacher": ("loss_avg100",), "ode_init": ("loss_avg100",),
            "raven": ("dmd_loss", "critic_loss"), "cm_grpo": ("reward_world",)}
    panels = [(stage, read_metrics(os.path.join(ctx.path(stage), "logs"))) for stage in keys]
    panels = [(stage, rows) for stage, rows in panels if rows]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3), squeeze=False)
    for ax, (stage, rows) in zip(axes[0], panels):
        for key in keys[stage]:
            points = [(r["step"], r[key]) for r in rows if key in r and r.get("step") is not None]
            if points:
                ax.plot(*zip(*points), label=key, lw=0.8)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="folder of every stage's output (created)")
    p.add_argument("--stages", default="all", help=f"comma-separated subset of {','.join(STAGES)}, or all")
    p.add_argument("--config_dir", default=os.path.join(REPO, "configs", "world"))
    p.add_argument("--vae", default=None, help="use this trained AutoencoderKLWan folder instead of the vae stage")
    p.add_argument("--num_processes", type=int, default=1, help="processes (GPUs) per training stage")
    p.add_argument("--main_process_port", type=int, default=None,
                   help="port of the process group (set one per recipe when several run on one machine)")
    p.add_argument("--num_train_prompts", type=int, default=8192)
    p.add_argument("--num_eval_prompts", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the random transformer init")
    p.add_argument("--extra", action="append", default=[], metavar="STAGE=ARGS",
                   help="more flags for one stage's script, e.g. 'teacher=--max_train_steps 100' (repeatable)")
    p.add_argument("--deadline", type=float, default=None, help="seconds from now after which to stop (resumable)")
    args = p.parse_args(argv)
    stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"--stages {unknown}: choose from {','.join(STAGES)}.")
    args.stages = stages
    try:
        args.extra_map = parse_extras(args.extra, STAGES)
    except ValueError as error:
        p.error(str(error))
    if args.vae is not None and not os.path.isfile(os.path.join(args.vae, "config.json")):
        p.error(f"--vae {args.vae!r} is not an AutoencoderKLWan folder (no config.json).")
    if args.num_processes < 1:
        p.error(f"--num_processes {args.num_processes} must be >= 1.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    ctx = Context(root=os.path.abspath(args.root), config_dir=args.config_dir, num_processes=args.num_processes,
                  main_process_port=args.main_process_port, extra=args.extra_map, vae=args.vae, num_train_prompts=args.num_train_prompts,
                  num_eval_prompts=args.num_eval_prompts, seed=args.seed)
    os.makedirs(ctx.root, exist_ok=True)
    report_path = ctx.path("recipe.json")
    report = json.load(open(report_path, encoding="utf-8")) if os.path.isfile(report_path) else {"stages": {}}
    deadline = time.monotonic() + args.deadline if args.deadline else None
    status = "complete"
    try:
        for stage in args.stages:
            if DONE[stage](ctx):
                print(f"[recipe] {stage}: done", file=sys.stderr)
                continue
            print(f"[recipe] {stage}: running", file=sys.stderr)
            entry = report["stages"].setdefault(stage, {"seconds": 0.0})
            tic = time.monotonic()
            try:
                if stage == "base":
                    build_base(ctx)
                else:
                    for command in commands(ctx, stage):
                        entry["command"] = shlex.join(command)
                        run(command, ctx.path("logs", f"{stage}.log"), deadline)
            finally:
                entry["seconds"] += time.monotonic() - tic
                entry["last_logs"] = last_logs(ctx.path(stage)) if os.path.isdir(ctx.path(stage, "logs")) else {}
                json.dump(report, open(report_path, "w", encoding="utf-8"), indent=1, sort_keys=True)
            print(f"[recipe] {stage}: finished in {entry['seconds']:.0f} s", file=sys.stderr)
    except Deadline as stop:
        status = f"stopped: {stop}"
        print(f"[recipe] {status}; run the same command again to resume", file=sys.stderr)
    evaluations = {}
    for name in ("teacher", "ode_init", "raven", "cm_grpo"):
        path = ctx.path("eval", f"{name}.json")
        if os.path.isfile(path):
            evaluations[name] = json.load(open(path, encoding="utf-8"))
    report.update(status=status, evaluation=evaluations)
    json.dump(report, open(report_path, "w", encoding="utf-8"), indent=1, sort_keys=True)
    plot_curves(ctx, ctx.path("curves.png"))
    return report


if __name__ == "__main__":
    main()
