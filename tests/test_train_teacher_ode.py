"""``train_teacher.py`` and ``train_ode_init.py`` through their real entry points (tiny models, CPU, no network)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_ode_init
import train_teacher
from raven_video.data.latents import LatentParts
from raven_video.pipelines.pipeline_causal_wan import CausalWanPipeline
from raven_video.training.ode import ode_sigmas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = ["--num_frames", "9", "--height", "32", "--width", "32", "--report_to", "none"]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """16 world clips through the tiny VAE (scripts/precompute_latents.py, sharded layout)."""
    folder = tmp_path_factory.mktemp("data") / "latents"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "precompute_latents.py"), "--world", "16",
                    "--tiny_random_vae", "--output_dir", str(folder), "--num_frames", "9", "--height", "32",
                    "--width", "32", "--shard_size", "6"], check=True, capture_output=True)
    return str(folder)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle moves right slowly, on a black background\n"
                    "a blue square stays still, on a white background\n")
    return str(path)


def _losses(folder):
    with open(os.path.join(folder, "logs", "metrics.jsonl")) as handle:
        return [row["loss"] for row in map(json.loads, handle) if "loss" in row]


def _teacher(out, latents, *extra):
    return train_teacher.main(["--tiny_random_models", "--latent_dataset", latents, "--output_dir", str(out),
                               "--train_batch_size", "4", "--lr_warmup_steps", "0", "--learning_rate", "2e-3",
                               *SIZE, *extra])


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
def test_teacher_learns_and_exports_a_pipeline(tmp_path, latents, mode):
    _teacher(tmp_path, latents, "--mode", mode, "--max_train_steps", "80", "--checkpointing_steps", "80",
             "--latents_in_memory")
    losses = _losses(tmp_path)
    assert len(losses) == 80 and np.mean(losses[-20:]) < 0.75 * np.mean(losses[:20])
    pipe = CausalWanPipeline.from_pretrained(str(tmp_path))  # the EMA teacher as a pipeline folder
    trained = load_file(str(tmp_path / "checkpoint-80" / "model.safetensors"))
    assert any(not torch.equal(pipe.transformer.state_dict()[k.removeprefix("transformer.")], v)
               for k, v in trained.items())  # EMA weights, not the raw ones


def test_teacher_resume_is_exact_and_time_budget_stops_cleanly(tmp_path, latents):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _teacher(straight, latents, "--max_train_steps", "4", "--checkpointing_steps", "2")
    _teacher(resumed, latents, "--max_train_steps", "2", "--checkpointing_steps", "2")
    _teacher(resumed, latents, "--max_train_steps", "4", "--checkpointing_steps", "2",
             "--resume_from_checkpoint", "latest")
    a = load_file(str(straight / "checkpoint-4" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoint-4" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    timed = tmp_path / "timed"
    _teacher(timed, latents, "--max_train_steps", "100000", "--max_train_time", "1", "--checkpointing_steps", "100000")
    steps = [int(d.split("-")[1]) for d in os.listdir(timed) if d.startswith("checkpoint-")]
    assert len(steps) == 1 and 0 < steps[0] < 100000 and (timed / "model_index.json").is_file()


def test_teacher_bad_input_is_one_line(tmp_path, latents):
    run = [sys.executable, os.path.join(ROOT, "train_teacher.py"), "--tiny_random_models", "--output_dir",
           str(tmp_path / "x"), *SIZE]
    missing = subprocess.run(run, capture_output=True, text=True)
    assert missing.returncode == 2 and "--latent_dataset is required" in missing.stderr
    assert "Traceback" not in missing.stderr
    wrong = subprocess.run(run[:-len(SIZE)] + ["--latent_dataset", latents, "--num_frames", "21", "--height", "32",
                                               "--width", "32"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "precompute_latents.py" in wrong.stderr and "Traceback" not in wrong.stderr
    assert not (tmp_path / "x").exists()  # nothing written before the check


def test_ode_sigmas_hit_the_student_knots():
    sigmas, marks = ode_sigmas([1000, 938, 833, 625], 48)
    assert [round(float(sigmas[i]), 6) for i in marks] == [1.0, 0.938, 0.833, 0.625]
    assert float(sigmas[-1]) == 0.0 and (sigmas[1:] < sigmas[:-1]).all() and len(sigmas) == 49


@pytest.mark.parametrize("kind", ["bidirectional", "autoregressive"])
def test_ode_init_resumes_trajectories_and_regresses(tmp_path, prompts, kind):
    args = ["--tiny_random_models", "--prompts", prompts, "--output_dir", str(tmp_path), "--teacher_kind", kind,
            "--num_trajectories", "12", "--trajectories_per_part", "5", "--trajectory_batch_size", "3",
            "--trajectory_steps", "8", "--train_batch_size", "4", "--learning_rate", "2e-3", "--lr_warmup_steps", "0",
            "--max_train_steps", "60", "--checkpointing_steps", "60", *SIZE]
    train_ode_init.main(args)
    store = LatentParts(str(tmp_path / "trajectories"))
    items, item_prompts = store.load(3)
    assert items.shape[:2] == (12, 5) and len(item_prompts) == 12  # 4 student timesteps + the endpoint
    losses = _losses(tmp_path)
    assert np.mean(losses[-15:]) < 0.7 * np.mean(losses[:15])
    # a lost part is regenerated identically (seeded per trajectory), the others are not redone
    shutil.rmtree(store.part_dir(1))
    stamp = os.path.getmtime(os.path.join(store.part_dir(0), "metadata.jsonl"))
    train_ode_init.main(args + ["--resume_from_checkpoint", "latest"])
    again, _ = store.load(3)
    assert torch.equal(again, items)
    assert os.path.getmtime(os.path.join(store.part_dir(0), "metadata.jsonl")) == stamp


def test_teacher_compile_keeps_the_losses_and_the_checkpoint_keys(tmp_path, latents):
    """``--compile`` (regional, in place): the same losses as eager and the same state-dict keys (resume, EMA and
    export are unchanged). The aot_eager backend checks the wiring on CPU without a C++ toolchain."""
    torch._dynamo.reset()
    _teacher(tmp_path / "eager", latents, "--max_train_steps", "3", "--checkpointing_steps", "3", "--ema_decay", "0")
    _teacher(tmp_path / "compiled", latents, "--max_train_steps", "3", "--checkpointing_steps", "3", "--ema_decay", "0",
             "--compile", "--compile_backend", "aot_eager")
    np.testing.assert_allclose(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rtol=1e-4, atol=1e-6)
    eager = load_file(str(tmp_path / "eager" / "checkpoint-3" / "model.safetensors"))
    compiled = load_file(str(tmp_path / "compiled" / "checkpoint-3" / "model.safetensors"))
    assert eager.keys() == compiled.keys()


def test_teacher_in_memory_latents_and_prompt_table_keep_the_losses(tmp_path, latents):
    """``--latents_in_memory`` (latents on the device, every prompt encoded once) trains on the same batches as
    reading and encoding them per step."""
    _teacher(tmp_path / "disk", latents, "--max_train_steps", "3", "--checkpointing_steps", "3")
    _teacher(tmp_path / "memory", latents, "--max_train_steps", "3", "--checkpointing_steps", "3",
             "--latents_in_memory")
    np.testing.assert_allclose(_losses(tmp_path / "memory"), _losses(tmp_path / "disk"), rtol=1e-5, atol=1e-7)


def test_encoded_prompts_rows_are_the_per_batch_encodings():
    from raven_video.cli.training import EncodedPrompts, prompt_encoder
    from raven_video.testing import tiny_pipeline

    encode = prompt_encoder(tiny_pipeline(), 16, "cpu", "cpu")
    prompts = {"0": "a red circle", "1": "a blue square moves", "2": "a red circle", "3": "green"}
    table = EncodedPrompts(encode, prompts, batch_size=2)
    assert table.table.shape[0] == 3  # distinct prompts only
    keys = ["3", "0", "2", "1"]
    torch.testing.assert_close(table[keys], encode([prompts[k] for k in keys]), rtol=1e-6, atol=1e-6)
    assert EncodedPrompts.nbytes(16384, 64, 64) == 268435456  # the world's table


def test_ode_init_trajectories_on_device_keep_the_losses(tmp_path, prompts):
    """``--trajectories_on_device`` (store on the device, every prompt encoded once) regresses on the same batches."""
    common = ["--tiny_random_models", "--prompts", prompts, "--trajectory_dir", str(tmp_path / "trajectories"),
              "--num_trajectories", "6", "--trajectories_per_part", "6", "--trajectory_batch_size", "3",
              "--trajectory_steps", "4", "--train_batch_size", "3", "--lr_warmup_steps", "0", "--max_train_steps", "3",
              "--checkpointing_steps", "3", *SIZE]
    train_ode_init.main(common + ["--output_dir", str(tmp_path / "host")])
    train_ode_init.main(common + ["--output_dir", str(tmp_path / "device"), "--trajectories_on_device"])
    np.testing.assert_allclose(_losses(tmp_path / "device"), _losses(tmp_path / "host"), rtol=1e-5, atol=1e-7)
    # --compile (compile_streaming on the teacher and the student; aot_eager: the wiring, on CPU) keeps them too
    torch._dynamo.reset()
    train_ode_init.main(common + ["--output_dir", str(tmp_path / "compiled"), "--compile", "--compile_backend",
                                  "aot_eager"])
    np.testing.assert_allclose(_losses(tmp_path / "compiled"), _losses(tmp_path / "host"), rtol=1e-4, atol=1e-6)
