"""Issue 13's grid (``raven_video/world/grid.py``) and its report (``raven_video/world/report.py``) on CPU: the grid as
data, the scheduler with a fake launcher (GPU slots, the best-RAVEN dependency, resume, deadline, dry run) and the
report on synthetic evaluations."""

import importlib.util
import io
import json
import os
import re
import sys
import threading
import time

import numpy as np
import pytest
from scipy.stats import ttest_ind

from raven_video.training.rollout import HISTORY_MODES
from raven_video.utils.atomic import atomic_write_text
from raven_video.world import grid
from raven_video.world import report as rp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)


def _config(tmp_path, **kw):
    kw = {"teacher": "/ckpt/teacher", **kw}
    return grid.GridConfig(root=str(tmp_path / "grid"), ode_init="/ckpt/ode_init", prompts="/ckpt/train.txt",
                           latents="/ckpt/latents", **kw)


def _flag(command, name):
    return command[command.index(name) + 1]


# ----------------------------------------------------------------------------------------------------- the grid
def test_grid_has_every_history_and_weighting_over_every_seed():
    specs = grid.build_grid(SEEDS)
    per_group = {}
    for spec in specs:
        for group, method in spec.groups:
            per_group.setdefault(group, {}).setdefault(method, []).append(spec.seed)
    assert set(per_group["history"]) == set(HISTORY_MODES)
    assert set(per_group["chunk_weighting"]) == {"alpha=-1", "alpha=0", "alpha=+1", "ln_0_1"}
    assert len(per_group["kernel"]) == 6 and len(per_group["reward"]) == 2 and len(per_group["start"]) == 2
    for methods in per_group.values():
        assert all(sorted(seeds) == list(SEEDS) for seeds in methods.values())
    # shared rows run once: history raven == chunk alpha -1; consistency beta 0 world=1 serves three groups
    assert len(specs) == 3 * (5 + 3 + 6 + 1 + 1) == 48
    assert len({s.name for s in specs}) == len(specs)
    raven = next(s for s in specs if s.method("history") == "raven")
    assert raven.method("chunk_weighting") == "alpha=-1" and "--chunk_weighting=-1" in raven.flags
    em = [s for s in specs if "--policy_kernel=euler_maruyama" in s.flags]
    assert {(f for f in s.flags if f.startswith("--noise_level")).__next__() for s in em} == {
        "--noise_level=0.4", "--noise_level=0.8"} and {f for s in em for f in s.flags if f.startswith("--beta")} == {
        "--beta=0", "--beta=0.004"}
    assert [s.start for s in specs if s.method("start") == "ODE init"] == ["ode_init"] * 3
    # the best-RAVEN candidates are launched first
    assert [s.method("history") for s in specs[:3]] == ["raven"] * 3
    only = grid.build_grid(SEEDS, only=["kernel"])  # pulls in what best RAVEN needs
    assert {s.start for s in only} == {"best_raven", "ode_init"} and len(only) == 3 * 6 + 3


def test_commands_parse_with_each_script_and_carry_the_budget(tmp_path):
    config = _config(tmp_path, config_dir=os.path.join(ROOT, "configs", "world"), budgets={"raven": 300, "cm_grpo": 150})
    specs = grid.build_grid([0])
    modules = {}
    for spec in specs:
        (kind, train), (_, evaluate) = grid.commands(config, spec, "/ckpt/start", train_seconds_used=100.0)
        assert kind == "train" and _flag(train, "--max_train_time") == str(config.budgets[spec.stage] - 100)
        assert _flag(train, "--seed") == "0" and train[-2:] == ["--resume_from_checkpoint", "latest"]
        assert ("--latent_dataset" in train) == (spec.method("history") in ("teacher_forcing", "diffusion_forcing"))
        assert _flag(evaluate, "--model") == config.export_dir(spec)
        os.makedirs(config.export_dir(spec), exist_ok=True)  # evaluate_world.py checks that --model is a folder
        for command in (train, evaluate):
            script = next(part for part in command if part.endswith(".py"))
            if script not in modules:
                module_spec = importlib.util.spec_from_file_location(f"grid_{len(modules)}", script)
                modules[script] = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(modules[script])
            args = modules[script].parse_args(command[command.index(script) + 1:])
            if command is train:
                assert args.max_train_time == config.budgets[spec.stage] - 100 and args.seed == 0
    assert grid.parse_budgets("raven=300,cm_grpo=150") == {"raven": 300.0, "cm_grpo": 150.0}
    assert grid.parse_budgets("60") == {"raven": 60.0, "cm_grpo": 60.0}
    for bad in ("raven=300", "x=1,raven=2,cm_grpo=3", "-5", "raven=a,cm_grpo=1"):
        with pytest.raises(ValueError, match="--budget_seconds"):
            grid.parse_budgets(bad)


# ----------------------------------------------------------------------------------------------------- scheduler
class FakeLauncher:
    """Writes what a real run writes (export, eval JSON with a world score per method); records GPU use."""

    def __init__(self, scores=None, sleep=0.01, interrupt=()):
        self.scores, self.sleep, self.interrupt = scores or {}, sleep, set(interrupt)
        self.lock, self.busy, self.calls, self.overlaps = threading.Lock(), set(), [], []

    def __call__(self, command, log_path, env, kill_at):
        gpu = env["CUDA_VISIBLE_DEVICES"]
        busy = (gpu, "--output_dir" in command)  # two trainings on one slot GPU are an overlap; an evaluation is not
        with self.lock:
            if busy in self.busy:
                self.overlaps.append(gpu)
            self.busy.add(busy)
            self.calls.append((os.path.basename(log_path)[:-4], gpu, command, time.monotonic()))
        time.sleep(self.sleep)
        try:
            name = os.path.basename(log_path)[:-4]
            if name in self.interrupt:
                self.interrupt.discard(name)
                raise grid.Deadline("fake deadline")
            if "--output_dir" in command:
                out = _flag(command, "--output_dir")
                export = os.path.join(out, "merged") if "train_cm_grpo.py" in " ".join(command) else out
                os.makedirs(export, exist_ok=True)
                open(os.path.join(export, "model_index.json"), "w").write("{}")
            else:
                score = self.scores.get(name, 0.5)
                os.makedirs(os.path.dirname(_flag(command, "--output")), exist_ok=True)
                atomic_write_text(_flag(command, "--output"),  # as evaluate_world.py writes it
                                  json.dumps({"student": {k: {"world_score": score} for k in ("1x", "2x", "4x")}}))
        finally:
            with self.lock:
                self.busy.discard(busy)


def test_scheduler_slots_dependencies_and_best_raven(tmp_path):
    config = _config(tmp_path)
    specs = grid.build_grid([0, 1], only=["history", "start"])
    scores = {"history-raven-s0": 0.7, "history-raven-s1": 0.8}
    fake = FakeLauncher(scores)
    state = grid.Scheduler(config, specs, ["0", "1", "2"], launcher=fake, log=lambda m: None).run()
    assert fake.overlaps == [] and state["status"] == "complete"
    assert {gpu for _, gpu, _, _ in fake.calls} == {"0", "1", "2"}
    assert all(state["runs"][s.name]["status"] == "done" for s in specs)
    assert state["best_raven"]["run"] == "history-raven-s0" and state["best_raven"]["mean"] == pytest.approx(0.75)
    # every run from best RAVEN starts after the last raven-history evaluation, and from its seed-0 export
    last_dependency = max(t for name, _, cmd, t in fake.calls if name.startswith("history-raven"))
    best_names = {s.name for s in specs if s.start == "best_raven"}  # named after the first group of the shared row
    assert len(best_names) == 2
    from_best = [(cmd, t) for name, _, cmd, t in fake.calls if name in best_names and "--output_dir" in cmd]
    assert len(from_best) == 2 and all(t >= last_dependency for _, t in from_best)
    assert all(_flag(cmd, "--pretrained_model_name_or_path") == config.export_dir(specs[0]) for cmd, _ in from_best)
    on_disk = json.load(open(os.path.join(config.root, grid.STATE_FILE)))
    assert on_disk["runs"]["history-raven-s1"]["eval"].endswith("eval/history-raven-s1.json")
    assert on_disk["runs"]["history-raven-s1"]["seconds"] > 0



def test_a_given_best_raven_replaces_the_history_runs(tmp_path):
    """--best_raven (a checkpoint carried over from an earlier session): no raven-history run is added or waited for,
    every CM-GRPO run from best RAVEN starts from that folder, and a grid of CM-GRPO runs needs no teacher."""
    given = tmp_path / "carried" / "raven"
    with pytest.raises(ValueError, match="no model_index.json"):
        grid.Scheduler(_config(tmp_path, teacher=None), [], ["0"], best_raven=str(given), log=lambda m: None)
    given.mkdir(parents=True)
    (given / "model_index.json").write_text("{}")
    specs = grid.build_grid([0, 1], only=["kernel", "start"], best_raven_given=True)
    assert {s.stage for s in specs} == {"cm_grpo"} and len(specs) == 2 * (6 + 1)
    assert len(grid.build_grid([0, 1], only=["kernel", "start"])) == 2 * (6 + 1 + 1)  # + the history-raven runs
    config = _config(tmp_path, teacher=None)
    fake = FakeLauncher()
    state = grid.Scheduler(config, specs, ["0", "1"], launcher=fake, log=lambda m: None, best_raven=str(given)).run()
    assert state["status"] == "complete" and state["best_raven"]["path"] == str(given)
    trainings = [cmd for _, _, cmd, _ in fake.calls if "--output_dir" in cmd]
    assert len(trainings) == len(specs) and all("--teacher_model" not in cmd for cmd in trainings)
    starts = {_flag(cmd, "--pretrained_model_name_or_path") for cmd in trainings}
    assert starts == {str(given), config.ode_init}

def test_resume_skips_finished_runs_and_resumes_interrupted_ones(tmp_path):
    config = _config(tmp_path, budgets={"raven": 300.0, "cm_grpo": 150.0})
    specs = grid.build_grid([0], only=["history"])
    fake = FakeLauncher(interrupt={"history-raven-s0"}, sleep=0.05)
    state = grid.Scheduler(config, specs, ["0"], launcher=fake, log=lambda m: None).run()
    assert state["runs"]["history-raven-s0"]["status"] == "interrupted"
    used = state["runs"]["history-raven-s0"]["train_seconds"]
    assert used > 0
    again = FakeLauncher()
    state = grid.Scheduler(config, specs, ["0"], launcher=again, log=lambda m: None).run()
    launched = [name for name, *_ in again.calls]
    assert launched == ["history-raven-s0", "history-raven-s0"]  # train + evaluate; the other four were done
    train = again.calls[0][2]
    assert "--resume_from_checkpoint" in train and float(_flag(train, "--max_train_time")) == pytest.approx(300 - used, abs=1e-3)
    assert state["status"] == "complete"
    third = FakeLauncher()
    grid.Scheduler(config, specs, ["0"], launcher=third, log=lambda m: None).run()
    assert third.calls == []


def test_runs_share_gpus_and_step_budgets_are_the_same_for_every_method(tmp_path):
    config = _config(tmp_path, budgets={"raven": 600.0, "cm_grpo": 300.0}, steps={"raven": 200, "cm_grpo": 40},
                     eval_workers=3, extra={"raven": "--train_batch_size 32 --history=self_forcing"})
    specs = grid.build_grid([0, 1, 2], only=["history"])
    peak, lock, intervals = {}, threading.Lock(), []
    inner = FakeLauncher(sleep=0.2)  # margin: a new training starts ~0.2 s before the first evaluation can end

    def counting(command, log_path, env, kill_at):  # how many runs train on each GPU, and evaluate, at once
        training = "--output_dir" in command
        key = env["CUDA_VISIBLE_DEVICES"] if training else "eval"
        with lock:
            peak.setdefault(key, [0, 0])
            peak[key][0] += 1
            peak[key][1] = max(peak[key])
        tic = time.monotonic()
        try:
            inner(command, log_path, env, kill_at)
        finally:
            with lock:
                peak[key][0] -= 1
                intervals.append((training, tic, time.monotonic()))

    state = grid.Scheduler(config, specs, ["0", "1"], launcher=counting, runs_per_gpu=3, max_evals=2,
                           tail_evals=2, log=lambda m: None).run()
    assert state["status"] == "complete" and peak["0"][1] == peak["1"][1] == 3  # 3 trainings per GPU, never more
    assert peak["eval"][1] == 2  # at most max_evals evaluations at once (tail_evals = max_evals here)
    # a run hands its slot back when its training ends: the 7th training starts before any evaluation has ended
    trainings = sorted(t for is_train, t, _ in intervals if is_train)
    assert len(trainings) == len(specs) and trainings[6] < min(e for is_train, _, e in intervals if not is_train)
    assert {e["gpu"] for e in state["runs"].values()} <= {f"{g}/{k}" for g in "01" for k in range(3)}
    trains = [cmd for _, _, cmd, _ in inner.calls if "--output_dir" in cmd]
    assert len(trains) == len(specs) and {(_flag(c, "--max_train_steps"), _flag(c, "--max_train_time")) for c in trains} \
        == {("200", "600")}
    # extra flags land after the args file; the grid's own flags (the history) come later and win
    assert all(_flag(c, "--train_batch_size") == "32" and c.index("--history=self_forcing") < max(
        i for i, part in enumerate(c) if part.startswith("--history=")) for c in trains)
    evals = [cmd for _, _, cmd, _ in inner.calls if "--output_dir" not in cmd]
    assert {_flag(c, "--workers") for c in evals} == {"3"}
    assert grid.parse_steps("raven=200,cm_grpo=40") == {"raven": 200, "cm_grpo": 40}
    assert grid.parse_steps("50") == {"raven": 50, "cm_grpo": 50}
    for bad in ("raven=200", "raven=2.5,cm_grpo=1", "0"):
        with pytest.raises(ValueError, match="--budget_steps"):
            grid.parse_steps(bad)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="runs_per_gpu"):
            grid.Scheduler(config, specs, ["0"], launcher=counting, runs_per_gpu=bad)
        with pytest.raises(ValueError, match="max_evals"):
            grid.Scheduler(config, specs, ["0"], launcher=counting, max_evals=bad)



def test_evaluations_widen_to_the_tail_limit_once_no_run_trains(tmp_path):
    """max_evals while any run trains, tail_evals once none does (the GPUs are idle then)."""
    specs = grid.build_grid([0, 1, 2], only=["history"])[:4]
    lock, state_now, starts = threading.Lock(), {"train": 0, "eval": 0}, []
    inner = FakeLauncher(sleep=0.0)

    def launch(command, log_path, env, kill_at):  # records (trainings, evaluations) running at each start
        kind = "train" if "--output_dir" in command else "eval"
        with lock:
            state_now[kind] += 1
            starts.append((state_now["train"], state_now["eval"]))
        try:
            time.sleep(0.05 if kind == "train" else 0.6)
            inner(command, log_path, env, kill_at)
        finally:
            with lock:
                state_now[kind] -= 1

    state = grid.Scheduler(_config(tmp_path), specs, ["0"], launcher=launch, max_evals=1, tail_evals=3,
                           log=lambda m: None).run()
    assert state["status"] == "complete" and len(starts) == 8
    assert all(evals <= 1 for training, evals in starts if training)  # beside a training: max_evals
    assert max(evals for _, evals in starts) == 3  # the tail: 3 at once
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="tail_evals"):
            grid.Scheduler(_config(tmp_path), specs, ["0"], launcher=launch, max_evals=2, tail_evals=bad)
    with pytest.raises(ValueError, match="needs max_evals"):
        grid.Scheduler(_config(tmp_path), specs, ["0"], launcher=launch, tail_evals=4)
    gate = grid.EvalGate(2, 4)
    assert gate.tail_limit == 4 and grid.Scheduler(_config(tmp_path), specs, ["0"], max_evals=3,
                                                   log=lambda m: None).eval_gate.tail_limit == 6

def _recording(inner):
    """A launcher that records the env of every command (training: ``--output_dir`` in it) before running ``inner``."""
    envs = []

    def launch(command, log_path, env, kill_at):
        envs.append(("train" if "--output_dir" in command else "evaluate", dict(env)))
        inner(command, log_path, env, kill_at)

    return launch, envs


def test_launched_commands_get_a_share_of_the_cpus(tmp_path, monkeypatch):
    for name in grid.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    specs = grid.build_grid([0], only=["history"])
    # auto: 32 CPUs over 2 GPUs x 3 runs + 2 evaluations = 8 processes at once -> 4 threads each, train and evaluate
    launch, envs = _recording(FakeLauncher())
    messages = []
    state = grid.Scheduler(_config(tmp_path / "auto"), specs, ["0", "1"], launcher=launch, runs_per_gpu=3,
                           max_evals=2, log=messages.append).run()
    assert state["status"] == "complete" and {kind for kind, _ in envs} == {"train", "evaluate"}
    assert len(envs) == 2 * len(specs)
    assert all(env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "4" and env["CUDA_VISIBLE_DEVICES"] in "01"
               for _, env in envs)
    assert messages.count("CPU threads per run: 4 (32 CPUs, 8 slots)") == 1
    # the real launcher hands the variables to the child process
    log_path = str(tmp_path / "child.log")
    scheduler = grid.Scheduler(_config(tmp_path / "child"), specs, ["0", "1"], log=lambda m: None)
    child = "import os; print('threads', os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'])"
    grid.default_launcher([sys.executable, "-c", child], log_path, scheduler.env("0"), None)
    with open(log_path, encoding="utf-8") as log:
        assert "threads 16 16" in log.read()  # 32 CPUs, 2 GPUs x 1 run, no evaluation limit
    out = io.StringIO()
    scheduler.dry_run(out)
    assert out.getvalue().count("CUDA_VISIBLE_DEVICES=<gpu> OMP_NUM_THREADS=16 MKL_NUM_THREADS=16 ") == 2 * len(specs)

    # explicit: used as given, also over an OMP_NUM_THREADS in the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    launch, envs = _recording(FakeLauncher())
    grid.Scheduler(_config(tmp_path / "explicit"), specs, ["0"], launcher=launch, threads_per_run=3,
                   log=lambda m: None).run()
    assert envs and all(env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3" for _, env in envs)

    # the environment's OMP_NUM_THREADS is respected without threads_per_run: nothing overrides it, one log line
    launch, envs = _recording(FakeLauncher())
    messages = []
    grid.Scheduler(_config(tmp_path / "inherit"), specs, ["0"], launcher=launch, log=messages.append).run()
    assert envs and all(set(env) == {"CUDA_VISIBLE_DEVICES"} and {**os.environ, **env}["OMP_NUM_THREADS"] == "7"
                        for _, env in envs)
    assert sum("OMP_NUM_THREADS=7" in m for m in messages) == 1
    assert not any(m.startswith("CPU threads per run") for m in messages)

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"threads_per_run " + re.escape(repr(bad))):
            grid.Scheduler(_config(tmp_path), specs, ["0"], launcher=launch, threads_per_run=bad)


def test_threads_per_process_arithmetic(monkeypatch):
    assert grid.threads_per_process(32, 8, 2, 4) == 1  # the pilot host: 16 runs + 4 evaluations on 32 CPUs
    assert grid.threads_per_process(32, 1, 2, None) == 16  # no evaluation limit: evaluations not counted
    assert grid.threads_per_process(64, 3, 2, 2) == 8
    assert grid.threads_per_process(4, 8, 2, None) == 1  # never below one thread
    assert grid.processes_at_once(8, 2, 4) == 20 and grid.processes_at_once(1, 2, None) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert grid.available_cpus() == 3  # the affinity mask, not every CPU of the host
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert grid.available_cpus() == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert grid.available_cpus() == 1


def test_deadline_stops_launching_and_dry_run_launches_nothing(tmp_path):
    config = _config(tmp_path)
    specs = grid.build_grid([0, 1, 2], only=["history"])
    fake = FakeLauncher(sleep=0.3)
    state = grid.Scheduler(config, specs, ["0", "1"], launcher=fake, deadline=0.1, log=lambda m: None).run()
    started = {name for name, *_ in fake.calls}
    assert len(started) == 2 and state["status"].startswith("deadline")
    assert all(state["runs"][n]["status"] == "done" for n in started)  # launched runs finish
    assert sum(e["status"] == "pending" for e in state["runs"].values()) == len(specs) - 2

    dry_config = _config(tmp_path / "dry")
    fake = FakeLauncher()
    out = io.StringIO()
    plan = grid.Scheduler(dry_config, grid.build_grid(SEEDS), ["0", "1"], launcher=fake).dry_run(out)
    assert fake.calls == [] and not os.path.exists(dry_config.root) and len(plan) == 48
    assert out.getvalue().count("CUDA_VISIBLE_DEVICES=<gpu>") == 96 and "<best_raven>" in out.getvalue()


def test_cli_rejects_bad_input_before_any_launch(tmp_path, capsys):
    module_spec = importlib.util.spec_from_file_location("world_grid", os.path.join(ROOT, "scripts", "world_grid.py"))
    cli = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(cli)
    base = ["--root", str(tmp_path), "--ode_init", str(tmp_path), "--teacher", str(tmp_path), "--prompts", "p.txt"]
    for extra in (["--gpus", "0,x"], ["--gpus", "0,0"], ["--seeds", ""], ["--only", "nope"],
                  ["--budget_seconds", "raven=1"], ["--budget_steps", "x"], ["--runs_per_gpu", "0"],
                  ["--eval_workers", "0"], ["--max_evals", "0"], ["--threads_per_run", "0"], ["--deadline", "-1"],
                  ["--dry_run", "--tail_evals", "4"], ["--dry_run", "--max_evals", "4", "--tail_evals", "3"],
                  []):  # [] : --ode_init has no model_index.json
        with pytest.raises(SystemExit):
            cli.parse_args(base + extra)
    assert cli.parse_args(base + ["--dry_run", "--gpus", "0,1", "--only", "kernel,reward"]).gpu_list == ["0", "1"]
    args = cli.parse_args(base + ["--dry_run", "--budget_steps", "raven=150,cm_grpo=30", "--runs_per_gpu", "4",
                                  "--extra", "raven=--train_batch_size 32", "--extra", "raven=--ttur 5"])
    assert args.steps == {"raven": 150, "cm_grpo": 30} and args.runs_per_gpu == 4
    assert args.threads_per_run is None
    for bad in ("0", "-2"):  # with --dry_run nothing else is wrong: its own check must catch it
        with pytest.raises(SystemExit):
            cli.parse_args(base + ["--dry_run", "--threads_per_run", bad])
        assert f"--threads_per_run {bad} must be >= 1" in capsys.readouterr().err
    assert cli.parse_args(base + ["--dry_run", "--threads_per_run", "2"]).threads_per_run == 2
    assert args.extra_map == {"raven": "--train_batch_size 32 --ttur 5"}
    with pytest.raises(SystemExit):
        cli.parse_args(base + ["--dry_run", "--extra", "teacher=--x 1"])
    with pytest.raises(SystemExit):  # --best_raven must be a pipeline folder, even for a dry run
        cli.parse_args(base + ["--dry_run", "--best_raven", str(tmp_path / "missing")])
    assert "--best_raven" in capsys.readouterr().err
    no_teacher = ["--root", str(tmp_path), "--ode_init", str(tmp_path), "--prompts", "p.txt"]
    with pytest.raises(SystemExit, match="--teacher is required"):  # the history group trains RAVEN
        cli.main(no_teacher + ["--dry_run", "--only", "history"])
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "model_index.json").write_text("{}")
    plan = cli.main(no_teacher + ["--dry_run", "--only", "kernel", "--best_raven", str(tmp_path / "best")])
    assert len(plan["plan"]) == 3 * 6 and not any("raven-s" in name for name in plan["plan"])
    assert str(tmp_path / "best") in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------- report
def test_report_tables_tests_and_figures(tmp_path):
    root = tmp_path / "grid"
    rng = np.random.default_rng(0)
    runs, values = {}, {}
    for method, base in (("raven", 0.8), ("self_forcing", 0.6)):
        for seed in SEEDS:
            name = f"history-{method}-s{seed}"
            out = root / "runs" / name
            (out / "logs").mkdir(parents=True)
            with open(out / "logs" / "metrics.jsonl", "w") as handle:
                for step in range(1, 41):
                    handle.write(json.dumps({"step": step, "dmd_loss": 1 / step, "critic_loss": 0.5, "lr": 1e-5}) + "\n")
            score = {length: base - 0.05 * i + rng.normal(0, 0.02) for i, length in enumerate(("1x", "2x", "4x"))}
            values.setdefault(method, []).append(score)
            student = {length: {"world_score": s, "count_accuracy": s / 2,
                                **{f"window{w}/world_score": s - 0.01 * w for w in range(1 + 3 * (length == "4x"))}}
                       for length, s in score.items()}
            (root / "eval").mkdir(exist_ok=True)
            json.dump({"student": student}, open(root / "eval" / f"{name}.json", "w"))
            runs[name] = {"groups": {"history": method}, "stage": "raven", "seed": seed, "status": "done",
                          "seconds": 100.0 + seed, "train_seconds": 80.0, "eval": str(root / "eval" / f"{name}.json"),
                          "output_dir": str(out)}
    json.dump({"runs": runs}, open(root / grid.STATE_FILE, "w"))
    output = tmp_path / "docs" / "world_results.md"
    output.parent.mkdir()
    text = rp.write_report(str(root), str(output), note="Pilot: **history** only.")
    assert text.splitlines()[4] == "Pilot: **history** only."
    raven = [v["4x"] for v in values["raven"]]
    other = [v["4x"] for v in values["self_forcing"]]
    row = next(line for line in text.split("### 4x")[1].splitlines() if line.startswith("| raven |"))
    assert f"{np.mean(raven):.3f} ± {np.std(raven, ddof=1):.3f}" in row and "| 3 |" in row
    count = [v["4x"] / 2 for v in values["raven"]]
    assert f"{np.mean(count):.3f} ± {np.std(count, ddof=1):.3f}" in row
    claim = next(line for line in text.splitlines() if line.startswith("| raven > self_forcing | 4x"))
    p = ttest_ind(raven, other, equal_var=False).pvalue
    assert f"{p:.3g}" in claim and "**holds**" in claim and p < 0.05
    assert re.search(r"\*raven\* scores higher than \*self_forcing\* on world_score at 4x: \*\*holds\*\*", text)
    # claims whose methods have no runs here are not measured, never asserted
    assert "*raven* scores higher than *df_self_rollout* on world_score at 4x: **not measured**" in text
    figures = tmp_path / "docs" / "world_results_figures"
    for png in ("history_error_vs_time.png", "history_training_curves.png"):
        assert (figures / png).stat().st_size > 1000 and f"world_results_figures/{png}" in text
    assert "| raven | 3 | done | 101 ± 1 | 80 ± 0 | 40 |" in text  # the steps each run's metrics.jsonl reached
    assert rp.verdict([0.1, 0.2], [0.5, 0.6], 0.01) == "does not hold"
    assert text.splitlines()[0] == f"# World grid results (`{root}`)"
    # an archive (grid.json + evaluations + curves, relative paths) rebuilds the same report, wherever it is moved
    archive = tmp_path / "archive"
    assert rp.archive_results(str(root), str(archive)) == len(runs)
    moved = tmp_path / "elsewhere" / "data"
    moved.parent.mkdir()
    os.rename(archive, moved)
    assert not any(p.name.startswith(".archive") for p in tmp_path.iterdir())
    (tmp_path / "again").mkdir()
    assert rp.write_report(str(moved), str(tmp_path / "again" / "world_results.md"), title="t") == \
        rp.write_report(str(root), str(output), title="t")
    curves = [json.loads(line) for line in open(moved / "runs" / "history-raven-s0" / "logs" / "metrics.jsonl")]
    assert len(curves) == 40 and all(set(row) == {"step", "dmd_loss", "critic_loss"} for row in curves)  # no "lr"
    titled = rp.write_report(str(root), str(output), title="World grid results (2026-11-30)")
    assert titled.splitlines()[0] == "# World grid results (2026-11-30)"


def test_report_gain_over_the_cm_grpo_start(tmp_path, capsys):
    """CM-GRPO groups get a gain table: each method's runs against the one evaluation of the checkpoint they started
    from (one-sample t-test); the start's evaluation travels with an archive; a bad --start is a clear error."""
    from scipy.stats import ttest_1samp

    root = tmp_path / "grid"
    (root / "eval").mkdir(parents=True)
    runs, after = {}, {}
    for method, start, scores in (("consistency beta=0", "best_raven", (0.70, 0.72, 0.71)),
                                  ("EM sigma=0.4 beta=0", "best_raven", (0.60, 0.66, 0.63)),
                                  ("ODE init", "ode_init", (0.55, 0.56, 0.57))):
        for seed, score in zip(SEEDS, scores):
            name = f"kernel-{method.replace(' ', '_')}-s{seed}"
            json.dump({"student": {"1x": {"world_score": score}}}, open(root / "eval" / f"{name}.json", "w"))
            runs[name] = {"groups": {"kernel": method}, "stage": "cm_grpo", "start": start, "seed": seed,
                          "status": "done", "eval": f"eval/{name}.json"}
            after.setdefault(method, []).append(score)
    json.dump({"runs": runs, "best_raven": {"given": True, "path": "/ckpt/best", "run": None}},
              open(root / grid.STATE_FILE, "w"), sort_keys=True)  # as the grid writes it
    start_json = tmp_path / "best_raven.json"
    json.dump({"student": {"1x": {"world_score": 0.62}}}, open(start_json, "w"))
    text = rp.write_report(str(root), str(tmp_path / "r.md"), starts={"best_raven": str(start_json)})
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if " | best_raven | 1x | " in line}
    expected = ttest_1samp(after["consistency beta=0"], 0.62)
    assert f"| 0.620 | 0.710 ± 0.010 | +0.090 | {expected.statistic:.2f} | {expected.pvalue:.3g} | improves |" \
        in rows["consistency beta=0"]
    assert rows["EM sigma=0.4 beta=0"].endswith("| inconclusive |")  # +0.010 over seeds 0.03 apart
    assert "| ODE init | ode_init | 1x | – |" in text and "not measured" in text  # no evaluation of the ODE init
    assert rp.gain_verdict([0.5, 0.51], 0.6, 0.01) == "worsens" and rp.gain_verdict([], 0.6, 0.01) == "not measured"
    # the archive keeps the start's evaluation: it rebuilds the same report without --start
    rp.archive_results(str(root), str(tmp_path / "archive"), starts={"best_raven": str(start_json)})
    assert json.load(open(tmp_path / "archive" / "eval" / "start-best_raven.json"))["student"]["1x"]["world_score"] == 0.62
    assert rp.write_report(str(tmp_path / "archive"), str(tmp_path / "r2.md"), title="t") == \
        rp.write_report(str(root), str(tmp_path / "r.md"), title="t", starts={"best_raven": str(start_json)})
    module_spec = importlib.util.spec_from_file_location("world_report", os.path.join(ROOT, "scripts", "world_report.py"))
    cli = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(cli)
    for bad, message in (("best=x.json", "expected ode_init=EVAL_JSON"), ("ode_init=/nope.json", "is not a file")):
        with pytest.raises(SystemExit):
            cli.main(["--root", str(root), "--output", str(tmp_path / "r3.md"), "--start", bad])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "r3.md").exists()


def test_the_grids_evaluation_command_writes_its_json_whole(tmp_path):
    """evaluate_world.py (the grid's evaluation step) on the shipped world model, 2 prompts at 1x on CPU: the JSON the
    grid reads as "finished" appears complete, by an atomic rename, with no temporary file left beside it."""
    spec = importlib.util.spec_from_file_location("evaluate_world", os.path.join(ROOT, "scripts", "evaluate_world.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    output = tmp_path / "eval" / "run.json"
    cli.main(["--model", os.path.join(ROOT, "raven_video", "world", "weights", "pipeline"), "--output", str(output),
              "--num_prompts", "2", "--lengths", "1", "--workers", "1", "--device", "cpu"])
    report = json.loads(output.read_text())
    assert 0.0 <= report["student"]["1x"]["world_score"] <= 1.0 and report["num_prompts"] == 2
    assert sorted(p.name for p in output.parent.iterdir()) == ["run-student-1x.png", "run.json"]
    assert "student_fp8" not in report
    # --fp8: the same evaluation with the blocks' linears in FP8 (emulated on CPU), said so in the JSON
    fp8 = tmp_path / "eval" / "fp8.json"
    cli.main(["--model", os.path.join(ROOT, "raven_video", "world", "weights", "pipeline"), "--output", str(fp8),
              "--num_prompts", "2", "--lengths", "1", "--workers", "1", "--device", "cpu", "--fp8"])
    report = json.loads(fp8.read_text())
    assert report["student_fp8"] is True and 0.0 <= report["student"]["1x"]["world_score"] <= 1.0
    with pytest.raises(SystemExit):
        cli.parse_args(["--teacher", str(tmp_path), "--output", str(fp8), "--fp8"])  # nothing to convert
