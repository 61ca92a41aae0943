"""End-to-end tests of ``train_raven.py`` through its real entry point (tiny random models, CPU, no network)."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file

import train_raven
from raven_video.pipelines.pipeline_causal_wan import CausalWanPipeline
from raven_video.testing import tiny_causal_transformer, tiny_pipeline, tiny_wan_transformer

SMALL = ["--num_frames", "21", "--height", "32", "--width", "48", "--max_sequence_length", "16",
         "--learning_rate", "1e-3", "--critic_learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.txt"
    path.write_text("a cat walks on the grass\na dog runs along the beach\na red car drives at night\n")
    return str(path)


def _run(out, prompts, *extra, tiny=True):
    args = (["--tiny_random_models"] if tiny else []) + ["--prompts", prompts, "--output_dir", str(out),
                                                         "--report_to", "none"] + SMALL + list(extra)
    return train_raven.main(args)


def test_end_to_end_updates_both_models_and_exports(tmp_path, prompts):
    out = tmp_path / "run"
    logs = _run(out, prompts, "--max_train_steps", "2", "--checkpointing_steps", "2", "--report_to", "tensorboard",
                "--validation_steps", "2", "--validation_prompts", "a cat")
    assert math.isfinite(logs["critic_loss"]) and math.isfinite(logs["dmd_loss"])
    student = {k.removeprefix("transformer."): v
               for k, v in load_file(str(out / "checkpoint-2" / "model.safetensors")).items()}
    critic = load_file(str(out / "checkpoint-2" / "model_1.safetensors"))
    init_student = tiny_causal_transformer(seed=0).state_dict()
    init_critic = tiny_causal_transformer(seed=2).state_dict()
    assert any(not torch.equal(student[k], init_student[k]) for k in student)
    assert any(not torch.equal(critic[k], init_critic[k]) for k in critic)
    assert all(torch.isfinite(v).all() for v in student.values())
    assert (out / "README.md").is_file() and list((out / "validation" / "step-2").iterdir())
    assert any(p.name.startswith("events") for p in (out / "logs").rglob("*"))
    pipe = CausalWanPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    video = pipe(prompt="a cat", num_frames=21, height=32, width=48, output_type="np", max_sequence_length=16,
                 generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 21, 32, 48, 3) and torch.isfinite(torch.from_numpy(video)).all()
    # the export is the EMA student: differs from both the init and the raw trained student
    exported = pipe.transformer.state_dict()
    assert any(not torch.equal(exported[k], student[k]) for k in student)


def test_resume_continues_exactly(tmp_path, prompts):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight, prompts, "--max_train_steps", "4", "--checkpointing_steps", "2")
    _run(resumed, prompts, "--max_train_steps", "2", "--checkpointing_steps", "2")
    logs = _run(resumed, prompts, "--max_train_steps", "4", "--checkpointing_steps", "2",
                "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "1")
    assert logs["first_step"] == 2  # really resumed (a fresh 4-step run would also match the straight one)
    assert sorted(p.name for p in resumed.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4"]
    for name in ("model.safetensors", "model_1.safetensors"):
        a = load_file(str(straight / "checkpoint-4" / name))
        b = load_file(str(resumed / "checkpoint-4" / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    ea = CausalWanPipeline.from_pretrained(str(straight)).transformer.state_dict()
    eb = CausalWanPipeline.from_pretrained(str(resumed)).transformer.state_dict()
    for k in ea:  # EMA restored too
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tiny_pipeline(seed=0).save_pretrained(str(root / "student"))
    tiny_wan_transformer(seed=2).save_pretrained(str(root / "teacher"))  # a plain diffusers Wan transformer
    tiny_wan_transformer(seed=3, text_dim=64).save_pretrained(str(root / "teacher_text64"))
    tiny_wan_transformer(seed=3, num_layers=3).save_pretrained(str(root / "teacher_big"))
    return root


def test_real_loading_path_with_wan_teacher(tmp_path, prompts, model_folders):
    out = tmp_path / "run"
    logs = _run(out, prompts, "--pretrained_model_name_or_path", str(model_folders / "student"),
                "--teacher_model", str(model_folders / "teacher"), "--max_train_steps", "2", tiny=False)
    assert math.isfinite(logs["dmd_loss"])
    assert (out / "model_index.json").is_file()


def _assert_fails(out, match, prompts, *extra, tiny=True):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        _run(out, prompts, "--max_train_steps", "2", "--checkpointing_steps", "1", *extra, tiny=tiny)
    assert not out.exists() or not any(p.name.startswith("checkpoint") for p in out.iterdir())


def test_bad_inputs_fail_early_without_checkpoint(tmp_path, prompts, model_folders):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    out = tmp_path / "run"
    _assert_fails(out, "empty file", str(empty))
    _assert_fails(out, "no non-blank prompt", str(blank))
    _assert_fails(out, "does not fit", prompts, "--num_frames", "17")  # 5 latent frames vs chunks of 3
    _assert_fails(out, "4k\\+1", prompts, "--num_frames", "20")
    student = ["--pretrained_model_name_or_path", str(model_folders / "student")]
    _assert_fails(out, "--teacher_model is required", prompts, *student, tiny=False)
    _assert_fails(out, "does not exist", prompts, *student, "--teacher_model", str(tmp_path / "nope"), tiny=False)
    _assert_fails(out, "text_dim", prompts, *student, "--teacher_model", str(model_folders / "teacher_text64"),
                  tiny=False)
    _assert_fails(out, "--critic_model", prompts, *student, "--teacher_model", str(model_folders / "teacher_big"),
                  tiny=False)
    _assert_fails(out, "latent_dataset", prompts, "--history", "teacher_forcing")
    _assert_fails(out, "chunk", prompts, "--chunk_weighting", "bogus")
    assert not os.path.exists(out)


def test_teacher_forcing_from_latent_dataset(tmp_path, prompts):
    import json

    data = tmp_path / "latents"
    data.mkdir()
    with open(data / "metadata.jsonl", "w") as fh:
        for i, prompt in enumerate(["a cat walks", "a dog runs"]):
            torch.save({"latents": torch.randn(16, 6, 4, 6)}, data / f"{i:06d}.pt")
            fh.write(json.dumps({"file": f"{i:06d}.pt", "prompt": prompt}) + "\n")
    for mode in ("teacher_forcing", "diffusion_forcing"):
        logs = _run(tmp_path / mode, prompts, "--latent_dataset", str(data), "--history", mode, "--max_train_steps", "2")
        assert math.isfinite(logs["dmd_loss"]), mode


def test_precompute_latents_then_teacher_forcing(tmp_path, prompts):
    import importlib.util

    import imageio.v3 as iio
    import numpy as np

    videos = tmp_path / "videos"
    videos.mkdir()
    iio.imwrite(videos / "a.mp4", (np.random.rand(21, 48, 64, 3) * 255).astype(np.uint8), fps=16)
    (videos / "a.txt").write_text("a cat walks on the grass")
    spec = importlib.util.spec_from_file_location(
        "precompute_latents", os.path.join(os.path.dirname(__file__), "..", "scripts", "precompute_latents.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "latents"
    assert module.main(["--videos", str(videos), "--tiny_random_vae", "--output_dir", str(out), "--num_frames", "21",
                        "--height", "32", "--width", "48", "--device", "cpu"]) == 1
    logs = _run(tmp_path / "run", prompts, "--latent_dataset", str(out), "--history", "teacher_forcing",
                "--max_train_steps", "2")
    assert math.isfinite(logs["dmd_loss"])
    # --latents_in_memory reads the same float16 latents once: the same training, bit for bit
    in_memory = _run(tmp_path / "memory", prompts, "--latent_dataset", str(out), "--history", "teacher_forcing",
                     "--max_train_steps", "2", "--latents_in_memory")
    assert {k: v for k, v in in_memory.items() if not k.startswith("time")} == \
        {k: v for k, v in logs.items() if not k.startswith("time")}
    exported = [load_file(str(tmp_path / run / "transformer" / "diffusion_pytorch_model.safetensors"))
                for run in ("run", "memory")]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])


def test_bad_input_is_one_line_without_traceback(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "train_raven.py", "--tiny_random_models", "--prompts", str(tmp_path / "no.txt"),
                          "--output_dir", str(tmp_path / "run"), "--num_frames", "17"],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and len(lines) == 1
    assert lines[0].startswith("train_raven.py: error: --num_frames 17 (5 latent frames) does not fit")


def test_compile_trains_like_eager(tmp_path, prompts):
    """``--compile`` (``compile_streaming`` on the student, critic and teacher: launch-bound small models) changes the
    kernels, not the training: the same losses after generator and critic steps. The aot_eager backend checks the
    wiring (dynamo + AOTAutograd through rollouts and the training-time test) on CPU without a C++ toolchain."""
    torch._dynamo.reset()
    extra = ("--max_train_steps", "2", "--ttur", "1", "--checkpointing_steps", "100")
    eager = _run(tmp_path / "eager", prompts, *extra)
    compiled = _run(tmp_path / "compiled", prompts, *extra, "--compile", "--compile_backend", "aot_eager")
    for key in ("critic_loss", "dmd_loss"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key
