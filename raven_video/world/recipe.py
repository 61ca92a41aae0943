"""How the world recipe and the experiment grid launch a training or evaluation script (``scripts/world_recipe.py``,
:mod:`raven_video.world.grid`): one home for the launch command, its ``--extra`` flags and for running it under a wall-clock deadline."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

__all__ = ["Deadline", "parse_extras", "script_command", "run"]


class Deadline(Exception):
    """The wall-clock deadline passed while a command ran; the command was interrupted (its checkpoints intact)."""


def parse_extras(items, stages) -> dict[str, str]:
    """``--extra STAGE=FLAGS`` values (repeatable) -> ``{stage: "flags ..."}``, flags of one stage joined in order;
    ``ValueError`` naming the item for a stage outside ``stages``."""
    extra: dict[str, str] = {}
    for item in items:
        stage, sep, flags = item.partition("=")
        stage = stage.strip()
        if not sep or stage not in stages:
            raise ValueError(f"--extra {item!r}: write STAGE=FLAGS with STAGE one of {','.join(stages)}.")
        extra[stage] = f"{extra.get(stage, '')} {flags}".strip()
    return extra


def script_command(script: str, args_files: list[str], *args: str, num_processes: int = 1,
                   main_process_port: int | None = None, extra: str = "") -> list[str]:
    """``python script`` (one process) or ``accelerate launch --multi_gpu`` (several), then the ``@file`` arguments
    ``args_files``, ``args`` and the shell-quoted ``extra`` flags (later flags win in argparse)."""
    if num_processes > 1:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                  "--num_processes", str(num_processes), "--num_machines", "1", "--dynamo_backend", "no",
                  *(["--main_process_port", str(main_process_port)] if main_process_port else [])]
    else:
        launch = [sys.executable]
    return [*launch, script, *args_files, *args, *shlex.split(extra)]


def run(command: list[str], log_path: str, deadline: float | None, env: dict | None = None,
        cwd: str | None = None) -> float:
    """Run one command with its output appended to ``log_path``; at the ``deadline`` (a ``time.monotonic()`` value)
    the process group gets SIGINT then SIGKILL, and :class:`Deadline` is raised (the run resumes next time).
    ``env`` adds to (overrides) ``os.environ``. Returns the wall time; raises ``RuntimeError`` with the log's tail on
    a non-zero exit code."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    tic = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        while proc.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                raise Deadline(f"deadline reached during {shlex.join(command[:3])}")
            time.sleep(1.0)
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8") as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"{shlex.join(command[:3])} failed with exit code {proc.returncode}; log {log_path}:\n{tail}")
    return time.monotonic() - tic
