"""The world recipe, scaled down, through the real scripts on CPU (``tests/fixtures/world_small``): the shipped VAE ->
base pipeline -> latents -> teacher -> ODE-initialised student, each stage checked for learning."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from raven_video.cli.training import read_metrics
from raven_video.pipelines.pipeline_causal_wan import CausalWanPipeline
from raven_video.world import evaluate as ev
from raven_video.world import vae_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    command = [sys.executable, os.path.join(ROOT, "scripts", "world_recipe.py"), "--root", str(root), "--vae",
               vae_path(), "--config_dir", os.path.join(ROOT, "tests", "fixtures", "world_small"), "--stages",
               "base,latents,teacher,ode_init", "--num_train_prompts", "64", "--num_eval_prompts", "4"]
    subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    return root


def _scores(folder, evalset):
    pipe = CausalWanPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return ev.score(ev.student_videos(pipe, evalset, num_frames=33), evalset, workers=1)


def test_each_stage_completes_and_records_itself(recipe):
    report = json.loads((recipe / "recipe.json").read_text())
    assert set(report["stages"]) == {"base", "latents", "teacher", "ode_init"} and report["status"] == "complete"
    assert (recipe / "prompts" / "train.txt").read_text().count("\n") == 64
    for stage in ("teacher", "ode_init"):
        assert (recipe / stage / "model_index.json").is_file() and report["stages"][stage]["seconds"] > 0
    # a second run skips every finished stage
    again = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "world_recipe.py"), "--root", str(recipe),
                            "--vae", vae_path(), "--stages", "base,latents,teacher,ode_init"],
                           capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert again.stderr.count(": done") == 4


def test_teacher_and_ode_losses_fall(recipe):
    for stage in ("teacher", "ode_init"):
        losses = [row["loss"] for row in read_metrics(str(recipe / stage / "logs")) if "loss" in row]
        assert np.mean(losses[-15:]) < 0.8 * np.mean(losses[:15]), stage


def test_the_ode_initialised_student_beats_its_random_init_on_the_world_metrics(recipe):
    evalset = ev.heldout_set(8)
    random_init, student = _scores(recipe / "base", evalset), _scores(recipe / "ode_init", evalset)
    # the scaled-down teacher (120 CPU steps) has learnt the scene's background, not yet its objects; decoded noise
    # gets some background frames right by chance
    assert student["background_accuracy"] >= 0.95 and student["background_accuracy"] > random_init[
        "background_accuracy"] + 0.15, (student, random_init)
    assert student["world_score"] > random_init["world_score"]  # decoded noise is cluttered: no object credit


def _load_script(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("num_processes", [1, 2])
def test_every_command_of_the_real_recipe_parses_with_its_script(tmp_path, num_processes):
    """The full-size configs (``configs/world``) reach each script's own parser, ``@file`` arguments included (the
    evaluate stage once failed on the GPU for want of ``fromfile_prefix_chars``)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import world_recipe

    args = world_recipe.parse_args(["--root", str(tmp_path), "--num_processes", str(num_processes)])
    ctx = world_recipe.Context(root=str(tmp_path), config_dir=args.config_dir, num_processes=num_processes,
                               main_process_port=None, extra={}, vae=None, num_train_prompts=8, num_eval_prompts=4,
                               seed=0)
    for folder in ("teacher", "ode_init", "raven", "cm_grpo/merged", "latents"):
        os.makedirs(tmp_path / folder, exist_ok=True)
    parsed = 0
    for stage in world_recipe.STAGES:
        if stage == "base":
            continue
        for command in world_recipe.commands(ctx, stage):
            script = next(part for part in command if part.endswith(".py"))
            argv = command[command.index(script) + 1:]
            module = _load_script(script)
            assert module.parse_args(argv) is not None, (stage, script)
            parsed += 1
    assert parsed == 11  # vae x2, latents, teacher, ode_init, raven, cm_grpo, evaluate x4
