"""Issue 13's experiment grid on the video world: every run as data, and a resumable scheduler over GPU slots.

The grid (:data:`GRID_TABLE`, :data:`CLAIMS`) compares, from one ODE-initialised student and one budget per run:

======================= ==============================================================================================
``history``             ``train_raven.py --history`` h for every history layout (RAVEN's is ``raven``)
``chunk_weighting``     ``train_raven.py --history raven --chunk_weighting`` alpha -1, 0, +1 and a logit-normal
``kernel``              ``train_cm_grpo.py`` from the best RAVEN student: ``--policy_kernel consistency`` vs
                        ``euler_maruyama`` (``--noise_level`` sigma 0.4 / 0.8), ``--beta`` 0 / 0.004
``reward``              CM-GRPO with ``--reward_weights world=1`` alone and composed with the weight-free proxies
``start``               CM-GRPO (consistency, world=1) from the best RAVEN student vs from the ODE init
======================= ==============================================================================================

A run that two groups share (the same script, start and flags, e.g. ``--history raven --chunk_weighting -1``) runs once
and counts in both. "Best RAVEN" (:data:`BEST_RAVEN`) is the method of the ``raven``-history runs of the history group
with the highest mean held-out world score at 1x over seeds; the CM-GRPO runs that start from it wait for those runs and
start from its seed-0 export (the lowest seed evaluated).

Every run trains for its budget: ``--max_train_steps`` = its step budget (``GridConfig.steps``, the same iterations for
every method) with ``--max_train_time`` as a cap, or, without a step budget, for ``--max_train_time`` alone, then
``scripts/evaluate_world.py @evaluate.args`` scores its export on held-out prompts at 1x / 2x / 4x (window 21, sink 3).
Layout under the grid root: ``runs/<name>/`` (training output), ``eval/<name>.json``, ``logs/<name>.log`` and
``grid.json`` (each run's status, wall time, training time, eval path; the best RAVEN run).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from raven_video.training.rollout import DATA_HISTORY_MODES, HISTORY_MODES
from raven_video.world.recipe import Deadline, script_command
from raven_video.world.recipe import run as run_command

__all__ = ["GRID_TABLE", "CLAIMS", "BEST_RAVEN", "GROUPS", "Claim", "RunSpec", "GridConfig", "build_grid", "commands",
           "finished", "resolve_best_raven", "Scheduler", "EvalGate", "estimate_gpu_seconds", "STATE_FILE",
           "parse_budgets", "parse_steps", "available_cpus", "processes_at_once", "threads_per_process",
           "THREAD_VARIABLES"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STATE_FILE = "grid.json"
SCRIPTS = {"raven": "train_raven.py", "cm_grpo": "train_cm_grpo.py"}
#: the run's export, relative to its output folder (train_cm_grpo.py writes the merged pipeline under ``merged/``)
EXPORTS = {"raven": "", "cm_grpo": "merged"}
#: the environment variables that cap a launched process's CPU threads (torch's intra-op pool, MKL)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: rough per-run costs beyond the training budget, for --dry_run's estimate only (not measured on the grid yet)
STARTUP_SECONDS_GUESS = 60.0
EVAL_SECONDS_GUESS = 120.0

WEIGHT_FREE_PROXIES = ("proxy_motion", "proxy_flicker", "proxy_smoothness", "proxy_sharpness_drift")
WORLD = "--reward_weights=world=1"
WORLD_AND_PROXIES = "--reward_weights=" + ",".join(["world=1", *(f"{name}=0.25" for name in WEIGHT_FREE_PROXIES)])
CONSISTENCY = ("--policy_kernel=consistency",)


def _em(sigma: float) -> tuple[str, ...]:
    return ("--policy_kernel=euler_maruyama", f"--noise_level={sigma}")


#: (group, method, stage, start, flags). ``start``: ``ode_init`` or ``best_raven``. Rows with the same stage, start and
#: flags are one run.
GRID_TABLE: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    *(("history", h, "raven", "ode_init", (f"--history={h}", "--chunk_weighting=-1")) for h in HISTORY_MODES),
    ("chunk_weighting", "alpha=-1", "raven", "ode_init", ("--history=raven", "--chunk_weighting=-1")),
    ("chunk_weighting", "alpha=0", "raven", "ode_init", ("--history=raven", "--chunk_weighting=0")),
    ("chunk_weighting", "alpha=+1", "raven", "ode_init", ("--history=raven", "--chunk_weighting=1")),
    ("chunk_weighting", "ln_0_1", "raven", "ode_init", ("--history=raven", "--chunk_weighting=ln_0_1")),
    *(("kernel", f"consistency beta={beta}", "cm_grpo", "best_raven", (*CONSISTENCY, f"--beta={beta}", WORLD))
      for beta in (0, 0.004)),
    *(("kernel", f"EM sigma={sigma} beta={beta}", "cm_grpo", "best_raven", (*_em(sigma), f"--beta={beta}", WORLD))
      for sigma in (0.4, 0.8) for beta in (0, 0.004)),
    ("reward", "world", "cm_grpo", "best_raven", (*CONSISTENCY, "--beta=0", WORLD)),
    ("reward", "world+proxies", "cm_grpo", "best_raven", (*CONSISTENCY, "--beta=0", WORLD_AND_PROXIES)),
    ("start", "best RAVEN", "cm_grpo", "best_raven", (*CONSISTENCY, "--beta=0", WORLD)),
    ("start", "ODE init", "cm_grpo", "ode_init", (*CONSISTENCY, "--beta=0", WORLD)),
)
GROUPS = tuple(dict.fromkeys(row[0] for row in GRID_TABLE))


@dataclass(frozen=True)
class Claim:
    """``method`` scores higher than ``baseline`` on ``metric`` at ``length`` (Welch's t-test over seeds)."""

    group: str
    method: str
    baseline: str
    length: str
    metric: str = "world_score"


CLAIMS: tuple[Claim, ...] = (
    *(Claim("history", "raven", h, "4x") for h in HISTORY_MODES if h != "raven"),
    *(Claim("chunk_weighting", "alpha=-1", other, "4x") for other in ("alpha=0", "alpha=+1", "ln_0_1")),
    *(Claim("kernel", f"consistency beta={beta}", f"EM sigma={sigma} beta={beta}", "1x")
      for beta in (0, 0.004) for sigma in (0.4, 0.8)),
    Claim("reward", "world+proxies", "world", "1x"),
    Claim("start", "best RAVEN", "ODE init", "1x"),
)
#: where "best RAVEN" comes from: (group, method) rows whose runs compete, ranked by mean world score at this length
BEST_RAVEN = {"candidates": (("history", "raven"),), "length": "1x", "metric": "world_score"}


@dataclass(frozen=True)
class RunSpec:
    """One training run + its evaluation. ``groups`` maps each group the run belongs to onto its method there."""

    name: str
    stage: str
    flags: tuple[str, ...]
    seed: int
    start: str
    groups: tuple[tuple[str, str], ...]

    @property
    def script(self) -> str:
        return SCRIPTS[self.stage]

    def method(self, group: str) -> str | None:
        return dict(self.groups).get(group)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def build_grid(seeds: Iterable[int], only: Iterable[str] | None = None, table=GRID_TABLE,
               best_raven_given: bool = False) -> list[RunSpec]:
    """The run specs of ``table`` for each seed (rows of identical stage, start and flags merged into one run), in
    launch order: the runs that best RAVEN depends on first, then the rest from the ODE init, then the rest.
    ``only``: keep the runs of these groups (and the best-RAVEN runs when a kept run starts from best RAVEN, unless
    ``best_raven_given``: the caller names that checkpoint, e.g. one carried over from an earlier session)."""
    seeds = list(seeds)
    merged: dict[tuple, dict] = {}
    for group, method, stage, start, flags in table:
        key = (stage, start, frozenset(flags))
        entry = merged.setdefault(key, {"stage": stage, "start": start, "flags": tuple(flags), "groups": [],
                                        "name": f"{group}-{_slug(method)}"})
        entry["groups"].append((group, method))
    only = set(only) if only is not None else None
    entries = list(merged.values())
    if only is not None:
        wanted = [e for e in entries if only & {g for g, _ in e["groups"]}]
        if not best_raven_given and any(e["start"] == "best_raven" for e in wanted):
            wanted += [e for e in entries if set(e["groups"]) & set(BEST_RAVEN["candidates"]) and e not in wanted]
        entries = [e for e in entries if e in wanted]

    def order(entry):
        is_best_candidate = bool(set(entry["groups"]) & set(BEST_RAVEN["candidates"]))
        return (0 if is_best_candidate else 1 if entry["start"] == "ode_init" else 2)

    entries.sort(key=order)  # stable: table order within each class
    return [RunSpec(name=f"{e['name']}-s{seed}", stage=e["stage"], flags=e["flags"], seed=seed, start=e["start"],
                    groups=tuple(e["groups"]))
            for e in entries for seed in seeds]


def _parse_stage_values(text: str, flag: str, unit: str, example: str, cast) -> dict:
    """``flag``'s value: one number for every stage, or ``STAGE=VALUE`` pairs naming each stage of :data:`SCRIPTS`."""
    text = str(text).strip()
    try:
        values = dict.fromkeys(SCRIPTS, cast(text))
    except ValueError:
        values = {}
        for item in text.split(","):
            stage, sep, value = item.partition("=")
            if not sep or stage.strip() not in SCRIPTS:
                raise ValueError(f"{flag} {text!r}: give {unit}, or STAGE=VALUE pairs with STAGE one of "
                                 f"{','.join(SCRIPTS)} (e.g. {example}).") from None
            try:
                values[stage.strip()] = cast(value)
            except ValueError:
                raise ValueError(f"{flag} {text!r}: {value!r} is not a number of {unit}.") from None
        missing = [s for s in SCRIPTS if s not in values]
        if missing:
            raise ValueError(f"{flag} {text!r}: no value for {','.join(missing)}.")
    bad = {k: v for k, v in values.items() if not (v > 0 and math.isfinite(v))}
    if bad:
        raise ValueError(f"{flag} {text!r}: values must be > 0 {unit} ({bad}).")
    return values


def parse_budgets(text: str) -> dict[str, float]:
    """``--budget_seconds``: one number for every stage, or ``raven=300,cm_grpo=150``."""
    return _parse_stage_values(text, "--budget_seconds", "seconds", "raven=300,cm_grpo=150", float)


def parse_steps(text: str) -> dict[str, int]:
    """``--budget_steps``: optimizer steps per run (``--max_train_steps``), one number or ``raven=200,cm_grpo=40``."""
    return _parse_stage_values(text, "--budget_steps", "steps", "raven=200,cm_grpo=40", int)


# ----------------------------------------------------------------------------------------------------- commands
@dataclass
class GridConfig:
    root: str
    ode_init: str
    teacher: str | None  # train_raven.py --teacher_model (None: a grid of CM-GRPO runs only)
    prompts: str
    latents: str | None = None
    config_dir: str = os.path.join(REPO, "configs", "world")
    budgets: dict = field(default_factory=lambda: {"raven": 300.0, "cm_grpo": 150.0})
    #: optimizer steps per run and stage (``--budget_steps``): the same iterations for every method (issue 13's
    #: "same budget"); ``budgets`` then only caps the time. None: the time budget ends every run.
    steps: dict | None = None
    max_train_steps: int = 1_000_000  # out of reach: the time budget ends every run
    eval_workers: int | None = None  # evaluate_world.py --workers (None: its default, up to 16 per evaluation)
    #: more flags per stage, after the args file (later flags win), e.g. {"raven": "--train_batch_size 32"}
    extra: dict = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def output_dir(self, spec: RunSpec) -> str:
        return self.path("runs", spec.name)

    def export_dir(self, spec: RunSpec) -> str:
        return os.path.join(self.output_dir(spec), EXPORTS[spec.stage]).rstrip(os.sep)

    def eval_path(self, spec: RunSpec) -> str:
        return self.path("eval", f"{spec.name}.json")

    def log_path(self, spec: RunSpec) -> str:
        return self.path("logs", f"{spec.name}.log")

    def args_file(self, name: str) -> list[str]:
        path = os.path.join(self.config_dir, f"{name}.args")
        return [f"@{path}"] if os.path.isfile(path) else []


def trained(config: GridConfig, spec: RunSpec) -> bool:
    return os.path.isfile(os.path.join(config.export_dir(spec), "model_index.json"))


def finished(config: GridConfig, spec: RunSpec) -> bool:
    """Its export and its evaluation JSON exist (such a run is skipped)."""
    return trained(config, spec) and os.path.isfile(config.eval_path(spec))


def _history(spec: RunSpec) -> str | None:
    for flag in spec.flags:
        if flag.startswith("--history="):
            return flag.split("=", 1)[1]
    return None


def commands(config: GridConfig, spec: RunSpec, start_path: str, train_seconds_used: float = 0.0
             ) -> list[tuple[str, list[str]]]:
    """``[("train", command), ("evaluate", command)]`` still to run for ``spec`` (train left out once exported).
    ``start_path``: the pipeline folder it starts from; ``train_seconds_used``: training time of earlier attempts,
    subtracted from the budget so an interrupted run trains for the budget in all."""
    steps = []
    if not trained(config, spec):
        remaining = max(config.budgets[spec.stage] - train_seconds_used, 1.0)
        max_steps = (config.steps or {}).get(spec.stage) or config.max_train_steps  # steps resume from checkpoints
        common = ["--pretrained_model_name_or_path", start_path, "--prompts", config.prompts,
                  "--output_dir", config.output_dir(spec), "--seed", str(spec.seed),
                  "--max_train_time", f"{remaining:g}", "--max_train_steps", str(max_steps)]
        if spec.stage == "raven":
            common += ["--teacher_model", config.teacher]
            if _history(spec) in DATA_HISTORY_MODES:
                common += ["--latent_dataset", config.latents or "<latents>"]
        train = script_command(os.path.join(REPO, spec.script), config.args_file(spec.stage), *common,
                               *shlex.split(config.extra.get(spec.stage, "")), *spec.flags,
                               "--resume_from_checkpoint", "latest")
        steps.append(("train", train))
    evaluate = [sys.executable, os.path.join(REPO, "scripts", "evaluate_world.py"), *config.args_file("evaluate"),
                "--model", config.export_dir(spec), "--output", config.eval_path(spec)]
    if config.eval_workers is not None:
        evaluate += ["--workers", str(config.eval_workers)]
    steps.append(("evaluate", evaluate))
    return steps


def needs_latents(specs: Iterable[RunSpec]) -> bool:
    return any(_history(spec) in DATA_HISTORY_MODES for spec in specs)


# ----------------------------------------------------------------------------------------------------- best RAVEN
def read_eval(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def best_candidates(specs: Iterable[RunSpec]) -> list[RunSpec]:
    candidates = set(BEST_RAVEN["candidates"])
    return [spec for spec in specs if set(spec.groups) & candidates]


def resolve_best_raven(config: GridConfig, specs: list[RunSpec]) -> dict | None:
    """``{"method", "run", "path", "mean"}`` of the best RAVEN method (highest mean world score at 1x over its seeds),
    from its lowest-seed run; ``None`` until every candidate run is finished."""
    runs = best_candidates(specs)
    if not runs or not all(finished(config, spec) for spec in runs):
        return None
    by_method: dict[tuple, list[tuple[RunSpec, float]]] = {}
    for spec in runs:
        method = next(m for m in spec.groups if m in set(BEST_RAVEN["candidates"]))
        score = read_eval(config.eval_path(spec))["student"][BEST_RAVEN["length"]][BEST_RAVEN["metric"]]
        by_method.setdefault(method, []).append((spec, float(score)))
    means = {method: sum(s for _, s in rows) / len(rows) for method, rows in by_method.items()}
    method = max(means, key=means.get)
    first = min(by_method[method], key=lambda row: row[0].seed)[0]
    return {"method": "/".join(method), "run": first.name, "path": config.export_dir(first), "mean": means[method],
            "means": {"/".join(k): v for k, v in means.items()}}


# ----------------------------------------------------------------------------------------------------- scheduling
Launcher = Callable[[list, str, dict, "float | None"], object]


def default_launcher(command: list[str], log_path: str, env: dict, kill_at: float | None) -> None:
    """:func:`raven_video.world.recipe.run` from the repository root, with ``env`` (``CUDA_VISIBLE_DEVICES``, the
    CPU threads)."""
    run_command(command, log_path, kill_at, env=env, cwd=REPO)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def processes_at_once(runs_per_gpu: int, n_gpus: int, max_evals: int | None) -> int:
    """The launched processes that can run at once: ``runs_per_gpu`` x ``n_gpus`` trainings + ``max_evals``
    evaluations (none counted without a limit)."""
    return runs_per_gpu * n_gpus + (max_evals or 0)


def threads_per_process(cpus: int, runs_per_gpu: int, n_gpus: int, max_evals: int | None) -> int:
    """CPU threads for each launched process: an equal share of ``cpus`` among :func:`processes_at_once`, at least
    1. Each torch process otherwise starts one thread per CPU, and many of them thrash the CPUs
    (``docs/world_grid.md``)."""
    return max(1, cpus // processes_at_once(runs_per_gpu, n_gpus, max_evals))


def estimate_gpu_seconds(specs: Iterable[RunSpec], budgets: dict) -> float:
    """Budget + :data:`STARTUP_SECONDS_GUESS` + :data:`EVAL_SECONDS_GUESS` per run (a guess, for planning)."""
    return sum(budgets[spec.stage] + STARTUP_SECONDS_GUESS + EVAL_SECONDS_GUESS for spec in specs)


class EvalGate:
    """Admits evaluations: at most ``limit`` at once while any run trains, ``tail_limit`` while none does (the GPUs are
    then idle and the evaluations left are the grid's tail; on 2026-11-30 the last 8 evaluations of the RAVEN groups
    waited 4 at a time beside two idle H200s). ``None``: no limit."""

    def __init__(self, limit: int | None, tail_limit: int | None):
        self.limit, self.tail_limit = limit, tail_limit
        self.running, self.tail = 0, False
        self.cond = threading.Condition()

    def _room(self) -> bool:
        limit = self.tail_limit if self.tail else self.limit
        return limit is None or self.running < limit

    def set_tail(self, tail: bool) -> None:
        """``True`` while no run trains (the scheduler's call); admits the evaluations the larger limit allows."""
        with self.cond:
            self.tail = tail
            self.cond.notify_all()

    def __enter__(self):
        with self.cond:
            self.cond.wait_for(self._room)
            self.running += 1
        return self

    def __exit__(self, *exc) -> None:
        with self.cond:
            self.running -= 1
            self.cond.notify_all()


class Scheduler:
    """Runs ``specs`` over the GPUs ``gpus``, ``runs_per_gpu`` runs on each at a time (``CUDA_VISIBLE_DEVICES=<gpu>``;
    the world model is so small that one run leaves an H200 mostly idle, waiting for kernel launches).

    Finished runs are skipped; the others (re)start with ``--resume_from_checkpoint latest``. Runs that start from
    best RAVEN wait until :func:`resolve_best_raven` names it. ``deadline`` (seconds from :meth:`run`): no run is
    launched after it, running ones end at their own ``--max_train_time``; ``kill_after`` (seconds): running ones
    are interrupted (SIGINT, resumable). ``best_raven``: the pipeline folder those runs start from, named by the
    caller (e.g. carried over from an earlier session) instead of resolved. ``max_evals``: evaluations at once while
    any run trains; ``tail_evals`` (default ``2 * max_evals``) while none does (:class:`EvalGate`).
    ``launcher(command, log_path, env, kill_at)`` runs one command (a fake in tests); it raises
    :class:`~raven_video.world.recipe.Deadline` when interrupted.

    Every command gets ``OMP_NUM_THREADS`` = ``MKL_NUM_THREADS`` = ``threads_per_run`` (None:
    :func:`threads_per_process` of :func:`available_cpus`). Without ``threads_per_run``, an ``OMP_NUM_THREADS`` already
    in the environment wins: the commands inherit the environment's thread settings unchanged."""

    def __init__(self, config: GridConfig, specs: list[RunSpec], gpus: list[str], launcher: Launcher | None = None,
                 deadline: float | None = None, kill_after: float | None = None, log=None, runs_per_gpu: int = 1,
                 max_evals: int | None = None, threads_per_run: int | None = None, best_raven: str | None = None,
                 tail_evals: int | None = None):
        if not gpus:
            raise ValueError("no GPU slots")
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"GPU slots {gpus} repeat a GPU")
        if isinstance(runs_per_gpu, bool) or not isinstance(runs_per_gpu, int) or runs_per_gpu < 1:
            raise ValueError(f"runs_per_gpu {runs_per_gpu!r} must be a whole number >= 1")
        if max_evals is not None and (isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1):
            raise ValueError(f"max_evals {max_evals!r} must be a whole number >= 1 (or None: no limit)")
        if tail_evals is not None and (max_evals is None or isinstance(tail_evals, bool)
                                       or not isinstance(tail_evals, int) or tail_evals < max_evals):
            raise ValueError(f"tail_evals {tail_evals!r} must be a whole number >= max_evals ({max_evals}): the limit "
                             "on evaluations once no run trains (it needs max_evals)")
        if threads_per_run is not None and (isinstance(threads_per_run, bool) or not isinstance(threads_per_run, int)
                                            or threads_per_run < 1):
            raise ValueError(f"threads_per_run {threads_per_run!r} must be a whole number >= 1 (or None: the CPUs "
                             "shared by the runs and evaluations that can run at once)")
        self.config, self.specs, self.gpus = config, list(specs), [str(g) for g in gpus]
        # evaluations score videos on the CPU: too many at once starve the training runs of their launch threads
        self.eval_gate = EvalGate(max_evals, tail_evals or (2 * max_evals if max_evals else None))
        # slot "<gpu>" (one run per GPU) or "<gpu>/<k>"; spread: the first run of every GPU before any second one
        self.slots = [g if runs_per_gpu == 1 else f"{g}/{k}" for k in range(runs_per_gpu) for g in self.gpus]
        self.launcher = launcher or default_launcher
        # every process that can run at once gets an equal share of the CPUs (torch's default: one thread per CPU)
        self.cpus, self.concurrent = available_cpus(), processes_at_once(runs_per_gpu, len(self.gpus), max_evals)
        self.threads = threads_per_run or threads_per_process(self.cpus, runs_per_gpu, len(self.gpus), max_evals)
        self.inherited_threads = (os.environ.get("OMP_NUM_THREADS") or None) if threads_per_run is None else None
        inherit = self.inherited_threads is not None
        self.thread_env = {} if inherit else dict.fromkeys(THREAD_VARIABLES, str(self.threads))
        self.deadline, self.kill_after = deadline, kill_after
        self.log = log or (lambda message: print(f"[grid] {message}", file=sys.stderr, flush=True))
        self.lock = threading.Lock()
        self.state = self._load_state()
        if best_raven is not None:  # named by the caller: never resolved from (or waiting for) the history runs
            path = os.path.abspath(best_raven)
            if not os.path.isfile(os.path.join(path, "model_index.json")):
                raise ValueError(f"best_raven {best_raven!r} is not a pipeline folder (no model_index.json); give the "
                                 "export of the best RAVEN run (e.g. runs/history-raven-s0).")
            self.state["best_raven"] = {"method": "given", "run": None, "path": path, "mean": None, "given": True}

    def env(self, gpu: str) -> dict:
        """What a command on ``gpu`` adds to the environment: its GPU and its CPU threads (:attr:`thread_env`)."""
        return {"CUDA_VISIBLE_DEVICES": gpu, **self.thread_env}

    def _log_threads(self) -> None:
        if self.inherited_threads is not None:
            self.log(f"OMP_NUM_THREADS={self.inherited_threads} is set in the environment: runs inherit it (not "
                     f"{self.threads}, the CPUs' share; pass threads_per_run to override)")
        else:
            self.log(f"CPU threads per run: {self.threads} ({self.cpus} CPUs, {self.concurrent} slots)")

    # ------------------------------------------------------------------------------------------------ state file
    def _load_state(self) -> dict:
        path = self.config.path(STATE_FILE)
        state = read_eval(path) or {}
        state.setdefault("runs", {})
        for spec in self.specs:
            entry = state["runs"].setdefault(spec.name, {"seconds": 0.0, "train_seconds": 0.0})
            entry.update(stage=spec.stage, seed=spec.seed, start=spec.start, flags=list(spec.flags),
                         groups={g: m for g, m in spec.groups}, eval=self.config.eval_path(spec),
                         export=self.config.export_dir(spec), output_dir=self.config.output_dir(spec),
                         log=self.config.log_path(spec))
            if finished(self.config, spec):
                entry["status"] = "done"
            elif entry.get("status") in (None, "done", "blocked"):
                entry["status"] = "pending"
            elif entry.get("status") == "running":  # the last invocation was killed mid-run
                entry["status"] = "interrupted"
        return state

    def save(self) -> None:
        with self.lock:
            self._save_locked()

    def _save_locked(self) -> None:
        os.makedirs(self.config.root, exist_ok=True)
        path = self.config.path(STATE_FILE)
        self.state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(self.state, handle, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)

    # ------------------------------------------------------------------------------------------------ planning
    def start_path(self, spec: RunSpec) -> str | None:
        if spec.start == "ode_init":
            return self.config.ode_init
        best = self.state.get("best_raven")
        return best["path"] if best else None

    def _refresh_best(self) -> None:
        if self.state.get("best_raven") is None:
            best = resolve_best_raven(self.config, self.specs)
            if best is not None:
                self.state["best_raven"] = best
                self.log(f"best RAVEN: {best['method']} (mean world score {best['mean']:.4f}), from {best['run']}")

    def dry_run(self, out=None) -> list[tuple[RunSpec, list[tuple[str, list[str]]]]]:
        """Every command still to run, printed (best RAVEN as ``<best_raven>`` until known); launches nothing."""
        out = out or sys.stdout
        self._refresh_best()
        plan = []
        for spec in self.specs:
            if finished(self.config, spec):
                print(f"# {spec.name}: done", file=out)
                continue
            used = self.state["runs"][spec.name].get("train_seconds", 0.0)
            steps = commands(self.config, spec, self.start_path(spec) or "<best_raven>", used)
            plan.append((spec, steps))
            groups = ", ".join(f"{g}: {m}" for g, m in spec.groups)
            print(f"# {spec.name} ({groups}; seed {spec.seed}; from {spec.start})", file=out)
            for kind, command in steps:
                env = " ".join(f"{name}={value}" for name, value in self.env("<gpu>").items())
                print(f"{env} {shlex.join(command)}", file=out)
        return plan

    # ------------------------------------------------------------------------------------------------ running
    def _work(self, spec: RunSpec, slot: str, start_path: str, kill_at: float | None, results: queue.Queue) -> None:
        """Train then evaluate ``spec``. The GPU slot is handed back (``("free", slot)``) as soon as training ends, so
        the next run trains while this one waits for an evaluation slot; ``("done", slot, spec, outcome, freed)``
        last."""
        entry = self.state["runs"][spec.name]
        gpu = slot.split("/")[0]
        outcome, freed = "done", False
        try:
            for kind, command in commands(self.config, spec, start_path, entry.get("train_seconds", 0.0)):
                if kind == "evaluate" and not freed:
                    results.put(("free", slot))
                    freed = True
                with self.lock:
                    entry["command_" + kind] = shlex.join(command)
                    self._save_locked()
                gate = self.eval_gate if kind == "evaluate" else contextlib.nullcontext()
                with gate:
                    tic = time.monotonic()
                    try:
                        self.launcher(command, self.config.log_path(spec), self.env(gpu), kill_at)
                    finally:
                        with self.lock:
                            elapsed = time.monotonic() - tic
                            entry["seconds"] = entry.get("seconds", 0.0) + elapsed
                            if kind == "train":
                                entry["train_seconds"] = entry.get("train_seconds", 0.0) + elapsed
                            else:
                                entry["eval_seconds"] = entry.get("eval_seconds", 0.0) + elapsed
            if not finished(self.config, spec):
                raise RuntimeError(f"{spec.name}: the commands ended but {self.config.export_dir(spec)} or "
                                   f"{self.config.eval_path(spec)} is missing")
        except Deadline as stop:
            outcome, entry["error"] = "interrupted", str(stop)
        except Exception as error:  # noqa: BLE001 - recorded; the other runs go on
            outcome, entry["error"] = "failed", str(error)[-2000:]
        results.put(("done", slot, spec, outcome, freed))

    def run(self) -> dict:
        """Launch, wait, record; returns the state (also in ``<root>/grid.json``)."""
        clock = time.monotonic()
        deadline_at = clock + self.deadline if self.deadline is not None else None
        kill_at = clock + self.kill_after if self.kill_after is not None else None
        self._log_threads()
        self._refresh_best()
        self.save()
        pending = [spec for spec in self.specs if not finished(self.config, spec)]
        for spec in self.specs:
            if spec not in pending:
                self.log(f"{spec.name}: done")
        free, running, results = list(self.slots), {}, queue.Queue()
        self.state["status"] = "running"
        while True:
            launching = deadline_at is None or time.monotonic() < deadline_at
            while launching and free:
                ready = next((spec for spec in pending if self.start_path(spec) is not None), None)
                if ready is None:
                    break
                pending.remove(ready)
                slot = free.pop(0)
                with self.lock:
                    entry = self.state["runs"][ready.name]
                    entry.update(status="running", gpu=slot, error=None)
                    entry["attempts"] = entry.get("attempts", 0) + 1
                    self._save_locked()
                self.log(f"{ready.name}: launched on GPU {slot}")
                worker = threading.Thread(target=self._work, args=(ready, slot, self.start_path(ready), kill_at,
                                                                   results), daemon=True)
                running[ready.name] = worker
                worker.start()
            if not running:
                break
            self.eval_gate.set_tail(len(free) == len(self.slots))  # no run trains: the evaluations may use the GPUs
            message = results.get()
            if message[0] == "free":  # training ended: the slot takes the next run while this one evaluates
                free.append(message[1])
                free.sort(key=self.slots.index)
                continue
            _, slot, spec, outcome, freed = message
            running.pop(spec.name).join()
            if not freed:
                free.append(slot)
                free.sort(key=self.slots.index)
            with self.lock:
                entry = self.state["runs"][spec.name]
                entry["status"] = outcome
                self.log(f"{spec.name}: {outcome} after {entry['seconds']:.0f} s"
                         + (f" ({entry['error'][:300]})" if entry.get("error") else ""))
                self._refresh_best()
                self._save_locked()
        if pending:
            launching = deadline_at is None or time.monotonic() < deadline_at
            for spec in pending:
                if launching:  # nothing left could start: what they wait for failed
                    self.state["runs"][spec.name]["status"] = "blocked"
            status = (f"deadline: {len(pending)} runs not launched" if not launching
                      else "blocked: best RAVEN unknown (a run it depends on did not finish)")
        else:
            failed = [name for name, e in self.state["runs"].items() if e.get("status") in ("failed", "interrupted")
                      and name in {s.name for s in self.specs}]
            status = "complete" if not failed else "incomplete: " + ", ".join(failed)
        self.state["status"] = status
        self.log(f"{status}; run the same command again to resume")
        self.save()
        return self.state
