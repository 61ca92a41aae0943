"""The markdown report of an experiment grid (:mod:`raven_video.world.grid`): per-group tables of every held-out metric
(mean ± sample std over seeds) at each length, wall time per run, Welch's t-test for each claim of
:data:`~raven_video.world.grid.CLAIMS` with a verdict computed from the numbers, and PNGs (world score per 81-frame
window vs stream position, training curves from each run's ``logs/metrics.jsonl``)."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from raven_video.cli.training import read_metrics
from raven_video.utils.atomic import atomic_folder
from raven_video.world.grid import CLAIMS, STATE_FILE, Claim

__all__ = ["load_runs", "archive_results", "method_scores", "mean_std", "welch", "verdict", "write_report", "steps_reached", "CURVE_KEYS",
           "ALPHA", "gain_rows", "gain_verdict"]

ALPHA = 0.05
LENGTHS = ("1x", "2x", "4x")
#: training-curve keys per stage (train_raven.py / train_cm_grpo.py log these every step)
CURVE_KEYS = {"raven": ("dmd_loss", "critic_loss"), "cm_grpo": ("reward_world", "policy_loss")}
_WINDOW = re.compile(r"^window(\d+)/(.+)$")
FRAMES_PER_WINDOW, FPS = 81, 16.0


def load_runs(root: str, starts: dict[str, str] | None = None) -> dict:
    """``grid.json``'s runs, each with ``evaluation`` (the eval JSON's ``student`` entry or ``None``); relative
    ``eval`` / ``output_dir`` paths (an :func:`archive_results` copy) are resolved against ``root``.

    ``state["starts"]``: the checkpoints CM-GRPO runs start from (``ode_init``, ``best_raven``), each with the
    ``evaluation`` of the start itself, for the gain tables. ``starts`` (name -> evaluation JSON) adds or replaces
    entries; without one, ``best_raven`` falls back to the evaluation of the grid run it was exported from."""
    with open(os.path.join(root, STATE_FILE), encoding="utf-8") as handle:
        state = json.load(handle)
    for entry in state["runs"].values():
        for key in ("eval", "output_dir"):
            if entry.get(key) and not os.path.isabs(entry[key]):
                entry[key] = os.path.join(root, entry[key])
        entry["evaluation"] = _student(entry.get("eval"))
    known = state.setdefault("starts", {})
    for name, path in (starts or {}).items():
        known[name] = {"eval": os.path.abspath(path)}
    best = state.get("best_raven") or {}
    if "best_raven" not in known and best.get("run") in state["runs"]:
        known["best_raven"] = {"eval": state["runs"][best["run"]].get("eval")}
    for entry in known.values():
        if entry.get("eval") and not os.path.isabs(entry["eval"]):
            entry["eval"] = os.path.join(root, entry["eval"])
        entry["evaluation"] = _student(entry.get("eval"))
    return state


def _student(path: str | None) -> dict | None:
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("student")


def archive_results(root: str, dest: str, starts: dict[str, str] | None = None) -> int:
    """Copy what the report reads into ``dest``, self-contained and small enough to commit beside it: ``grid.json``
    (``eval`` and ``output_dir`` relative to ``dest``; checkpoints and logs are not copied, their paths stay as
    run), each evaluation JSON (the starts' as ``eval/start-<name>.json``) and each run's logged curves (``step`` and
    :data:`CURVE_KEYS`). Returns the runs copied; ``write_report(dest, ...)`` then gives the same tables, tests and
    figures as from ``root`` with the same ``starts``."""
    state = load_runs(root, starts)
    keys = {"step", *(k for stage_keys in CURVE_KEYS.values() for k in stage_keys)}
    with atomic_folder(dest, overwrite=True) as folder:  # nothing half-written is left behind
        return _archive(state, str(folder), keys)


def _archive(state: dict, dest: str, keys: set) -> int:
    os.makedirs(os.path.join(dest, "eval"), exist_ok=True)
    for name, entry in state["starts"].items():
        evaluation = entry.pop("evaluation")
        if evaluation is not None:
            with open(os.path.join(dest, "eval", f"start-{name}.json"), "w", encoding="utf-8") as handle:
                json.dump({"student": evaluation}, handle, indent=1, sort_keys=True)
            entry["eval"] = f"eval/start-{name}.json"
    for name, entry in state["runs"].items():
        evaluation = entry.pop("evaluation")
        if evaluation is not None:
            with open(entry["eval"], encoding="utf-8") as handle:
                report = json.load(handle)
            with open(os.path.join(dest, "eval", f"{name}.json"), "w", encoding="utf-8") as handle:
                json.dump(report, handle, indent=1, sort_keys=True)
            entry["eval"] = f"eval/{name}.json"
        rows = read_metrics(os.path.join(entry["output_dir"], "logs")) if entry.get("output_dir") else []
        if rows:
            logs = os.path.join(dest, "runs", name, "logs")
            os.makedirs(logs, exist_ok=True)
            with open(os.path.join(logs, "metrics.jsonl"), "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps({k: v for k, v in row.items() if k in keys}) + "\n" for row in rows)
            entry["output_dir"] = f"runs/{name}"
    with open(os.path.join(dest, STATE_FILE), "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=1, sort_keys=True)
    return len(state["runs"])


def methods_of(state: dict, group: str) -> dict[str, list[str]]:
    """method -> run names (table order of first appearance)."""
    out: dict[str, list[str]] = {}
    for name, entry in state["runs"].items():
        method = entry.get("groups", {}).get(group)
        if method is not None:
            out.setdefault(method, []).append(name)
    return out


def method_scores(state: dict, runs: list[str], length: str, metric: str) -> list[float]:
    values = []
    for name in runs:
        evaluation = state["runs"][name].get("evaluation")
        value = (evaluation or {}).get(length, {}).get(metric)
        if value is not None and math.isfinite(value):
            values.append(float(value))
    return values


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; nan for fewer than 2 values)."""
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t statistic and two-sided p-value (``scipy.stats.ttest_ind(equal_var=False)``); nan for < 2 each."""
    from scipy.stats import ttest_ind

    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    result = ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def gain_verdict(after: list[float], start: float | None, p: float, alpha: float = ALPHA) -> str:
    """``improves`` / ``worsens`` (the runs' mean above / below the start's score, one-sample p < alpha), ``not
    measured`` (no start score or no run), else ``inconclusive``."""
    if start is None or not after:
        return "not measured"
    if len(after) < 2 or not math.isfinite(p) or p >= alpha:
        return "inconclusive"
    return "improves" if np.mean(after) > start else "worsens"


def gain_rows(state: dict, group: str, metric: str = "world_score") -> list[dict]:
    """For each CM-GRPO method of ``group`` and each length: the start checkpoint's score (one evaluation), the runs'
    scores after CM-GRPO, the gain and a one-sample t-test of the runs against the start
    (``scipy.stats.ttest_1samp``; nan for fewer than 2 runs)."""
    from scipy.stats import ttest_1samp

    rows = []
    for method, runs in methods_of(state, group).items():
        names = {state["runs"][n].get("start") for n in runs if state["runs"][n].get("stage") == "cm_grpo"}
        if len(names) != 1:
            continue
        start = names.pop()
        evaluation = (state.get("starts", {}).get(start) or {}).get("evaluation") or {}
        for length in LENGTHS:
            after = method_scores(state, runs, length, metric)
            before = evaluation.get(length, {}).get(metric)
            t, p = float("nan"), float("nan")
            if before is not None and len(after) >= 2 and np.std(after) > 0:
                result = ttest_1samp(after, before)
                t, p = float(result.statistic), float(result.pvalue)
            rows.append({"method": method, "start": start, "length": length, "before": before, "after": after,
                         "t": t, "p": p, "verdict": gain_verdict(after, before, p)})
    return rows


def verdict(a: list[float], b: list[float], p: float, alpha: float = ALPHA) -> str:
    """``holds`` (a > b, p < alpha), ``does not hold`` (a < b, p < alpha), ``not measured`` (no value on a side),
    else ``inconclusive``."""
    if not a or not b:
        return "not measured"
    if not (len(a) >= 2 and len(b) >= 2 and math.isfinite(p)) or p >= alpha:
        return "inconclusive"
    return "holds" if np.mean(a) > np.mean(b) else "does not hold"


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def _summary_metrics(state: dict) -> list[str]:
    keys = set()
    for entry in state["runs"].values():
        for scores in (entry.get("evaluation") or {}).values():
            keys.update(k for k in scores if "/" not in k)
    return sorted(keys, key=lambda k: (k != "world_score", k))


# ----------------------------------------------------------------------------------------------------- figures
def _plt():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the world report's figures need matplotlib: pip install 'raven-video[plots]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_error_vs_time(state: dict, group: str, path: str, length: str = "4x", metric: str = "world_score") -> bool:
    """World score per 81-frame window against the window's end (seconds of stream), mean ± std over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    drawn = False
    for method, runs in methods_of(state, group).items():
        per_window: dict[int, list[float]] = {}
        for name in runs:
            scores = (state["runs"][name].get("evaluation") or {}).get(length, {})
            for key, value in scores.items():
                match = _WINDOW.match(key)
                if match and match.group(2) == metric and value is not None and math.isfinite(value):
                    per_window.setdefault(int(match.group(1)), []).append(float(value))
        if not per_window:
            continue
        index = sorted(per_window)
        stats = [mean_std(per_window[i]) for i in index]
        x = [(i + 1) * FRAMES_PER_WINDOW / FPS for i in index]
        ax.errorbar(x, [m for m, _ in stats], yerr=[0 if not math.isfinite(s) else s for _, s in stats],
                    label=method, marker="o", ms=3, lw=1, capsize=2)
        drawn = True
    if drawn:
        ax.set_xlabel("stream position: end of the 81-frame window (s)")
        ax.set_ylabel(f"{metric} ({length})")
        ax.set_title(f"{group}: error vs time")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def plot_training_curves(state: dict, group: str, path: str, smooth: int = 20) -> bool:
    """One panel per logged key: each run's curve (moving mean over ``smooth`` logged values, fewer for short runs so
    that the first sixth of the curve still shows), one colour per method."""
    plt = _plt()
    methods = methods_of(state, group)
    stages = {state["runs"][n].get("stage") for runs in methods.values() for n in runs}
    keys = [k for stage in sorted(s for s in stages if s) for k in CURVE_KEYS.get(stage, ())]
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for ax, key in zip(axes[0], keys):
        for i, (method, runs) in enumerate(methods.items()):
            for j, name in enumerate(runs):
                folder = state["runs"][name].get("output_dir")
                rows = read_metrics(os.path.join(folder, "logs")) if folder else []
                points = [(r["step"], r[key]) for r in rows if r.get(key) is not None and r.get("step") is not None]
                if not points:
                    continue
                steps, values = map(np.asarray, zip(*points))
                width = max(1, min(smooth, len(values) // 6))
                values = np.convolve(values, np.ones(width) / width, mode="valid")
                ax.plot(steps[width - 1:], values, color=colours[i % len(colours)], lw=0.8,
                        label=method if j == 0 else None)
                drawn = True
        ax.set_title(key)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    if drawn:
        fig.suptitle(f"{group}: training curves (moving mean of up to {smooth} logged values)", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


# ----------------------------------------------------------------------------------------------------- markdown
def claim_rows(state: dict, claim: Claim) -> list[dict]:
    """The claim's comparison at every length: means, stds, n, Welch's t and p, verdict."""
    methods = methods_of(state, claim.group)
    rows = []
    for length in LENGTHS:
        a = method_scores(state, methods.get(claim.method, []), length, claim.metric)
        b = method_scores(state, methods.get(claim.baseline, []), length, claim.metric)
        t, p = welch(a, b)
        rows.append({"length": length, "a": a, "b": b, "t": t, "p": p, "verdict": verdict(a, b, p)})
    return rows


def steps_reached(entry: dict) -> int | None:
    """The last optimizer step a run logged (``<output_dir>/logs/metrics.jsonl``), None without logs."""
    folder = entry.get("output_dir")
    steps = [r["step"] for r in (read_metrics(os.path.join(folder, "logs")) if folder else []) if r.get("step") is not None]
    return max(steps) if steps else None


def write_report(root: str, output: str, claims=CLAIMS, note: str | None = None, title: str | None = None,
                 starts: dict[str, str] | None = None) -> str:
    """Write the markdown (and its PNGs in ``<output stem>_figures/``); returns the markdown text. ``note``: markdown
    placed under the title (what was run, what is missing); ``title``: the heading (default: the grid's folder);
    ``starts``: evaluation JSONs of the CM-GRPO start checkpoints (see :func:`load_runs`)."""
    state = load_runs(root, starts)
    metrics = _summary_metrics(state)
    out_dir = os.path.dirname(os.path.abspath(output))
    stem = os.path.splitext(os.path.basename(output))[0]
    figures = os.path.join(out_dir, f"{stem}_figures")
    os.makedirs(figures, exist_ok=True)
    groups = list(dict.fromkeys(g for e in state["runs"].values() for g in e.get("groups", {})))
    lines = [f"# {title or f'World grid results (`{os.path.abspath(root)}`)'}", "",
             "Generated by `scripts/world_report.py` from the grid's `grid.json` and evaluation JSONs (held-out prompts, "
             "window 21 + sink 3 beyond 1x). Every cell: mean ± sample std over seeds (n in the table). Verdicts are "
             f"computed: Welch's t-test (two-sided), alpha {ALPHA}.", ""]
    if note:
        lines += [note.strip(), ""]
    best = state.get("best_raven")
    if best and best.get("mean") is not None:
        lines += [f"Best RAVEN (CM-GRPO start): **{best['method']}**, mean world score {best['mean']:.4f} at 1x; "
                  f"checkpoint of `{best['run']}`.", ""]
    elif best:
        lines += [f"Best RAVEN (CM-GRPO start): given, `{best['path']}`.", ""]
    for group in groups:
        methods = methods_of(state, group)
        lines += [f"## {group}", ""]
        for length in LENGTHS:
            if not metrics or not any(method_scores(state, runs, length, metrics[0]) for runs in methods.values()):
                continue
            lines += [f"### {length}", "", "| method | n | " + " | ".join(metrics) + " |",
                      "| --- | ---: | " + " | ".join("---:" for _ in metrics) + " |"]
            for method, runs in methods.items():
                cells = [_fmt(*mean_std(method_scores(state, runs, length, m))) for m in metrics]
                n = len(method_scores(state, runs, length, metrics[0]))
                lines.append(f"| {method} | {n} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["Wall time per run (s; training + evaluation) and optimizer steps reached:", "",
                  "| method | runs | status | wall s | train s | steps |", "| --- | ---: | --- | ---: | ---: | ---: |"]
        for method, runs in methods.items():
            entries = [state["runs"][n] for n in runs]
            status = ", ".join(sorted({e.get("status", "pending") for e in entries}))
            wall = [e.get("seconds", 0.0) for e in entries if e.get("seconds")]
            train = [e.get("train_seconds", 0.0) for e in entries if e.get("train_seconds")]
            steps = [s for s in (steps_reached(e) for e in entries) if s is not None]
            steps_cell = (f"{min(steps)}–{max(steps)}" if min(steps) != max(steps) else str(steps[0])) if steps else "–"
            lines.append(f"| {method} | {len(runs)} | {status} | {_fmt(*mean_std(wall), digits=0)} | "
                         f"{_fmt(*mean_std(train), digits=0)} | {steps_cell} |")
        lines.append("")
        for kind, plot in (("error_vs_time", plot_error_vs_time), ("training_curves", plot_training_curves)):
            path = os.path.join(figures, f"{group}_{kind}.png")
            if plot(state, group, path):
                lines += [f"![{group}: {kind.replace('_', ' ')}]({os.path.relpath(path, out_dir)})", ""]
        gains = gain_rows(state, group)
        if any(row["before"] is not None for row in gains):
            lines += ["Gain over the start checkpoint (world score; the start is one evaluation, the runs are tested "
                      "against it with a one-sample t-test):", "",
                      "| method | start | length | start score | after CM-GRPO | gain | t | p | verdict |",
                      "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
            for row in gains:
                before = row["before"]
                mean = mean_std(row["after"])[0]
                gain = f"{mean - before:+.3f}" if before is not None and math.isfinite(mean) else "–"
                lines.append(f"| {row['method']} | {row['start']} | {row['length']} | "
                             f"{'–' if before is None else f'{before:.3f}'} | {_fmt(*mean_std(row['after']))} | {gain} | "
                             f"{row['t']:.2f} | {row['p']:.3g} | {row['verdict']} |")
            lines.append("")
        group_claims = [c for c in claims if c.group == group]
        if group_claims:
            lines += ["Claims (world score; verdict at the claim's length in bold):", "",
                      "| claim | length | method | baseline | t | p | verdict |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
            sentences = []
            for claim in group_claims:
                for row in claim_rows(state, claim):
                    mark = "**" if row["length"] == claim.length else ""
                    lines.append(f"| {claim.method} > {claim.baseline} | {row['length']} | {_fmt(*mean_std(row['a']))} | "
                                 f"{_fmt(*mean_std(row['b']))} | {row['t']:.2f} | {row['p']:.3g} | "
                                 f"{mark}{row['verdict']}{mark} |")
                    if row["length"] == claim.length:
                        evidence = (f"at p<{ALPHA} (p = {row['p']:.3g}, n = {len(row['a'])} vs {len(row['b'])})"
                                    if row["verdict"] != "not measured" else f"(no evaluation at {claim.length} on "
                                    f"one side or both)")
                        sentences.append(f"- *{claim.method}* scores higher than *{claim.baseline}* on {claim.metric} at "
                                         f"{claim.length}: **{row['verdict']}** {evidence}.")
            lines += ["", *sentences, ""]
    text = "\n".join(lines).rstrip() + "\n"
    with open(output, "w", encoding="utf-8") as handle:
        handle.write(text)
    return text
