"""Both training scripts under a real 2-process launch (torchrun, gloo on CPU): DDP gradients, the advantage
all-gather across processes, per-rank RNG states in checkpoints, and one output written by the main process."""

import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--tiny_random_models", "--num_frames", "21", "--height", "32", "--width", "48", "--max_sequence_length",
          "16", "--report_to", "none", "--checkpointing_steps", "2", "--max_train_steps", "2"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(script, args, tmp_path, extra_env=None):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat walks on the grass\na dog runs along the beach\na red car drives\nwaves crash\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()),
           os.path.join(ROOT, script), "--prompts", str(prompts), *COMMON, *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script,args", [
    ("train_raven.py", []),
    ("train_cm_grpo.py", ["--rank", "4", "--lora_alpha", "4", "--group_size", "2", "--groups_per_infer", "2",
                          "--sync_group_size", "2", "--reward_weights", "proxy_motion=1"]),
])
def test_two_process_training(script, args, tmp_path):
    out = tmp_path / "out"
    result = _launch(script, [*args, "--output_dir", str(out)], tmp_path, {"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "random_states_0.pkl").exists() and (checkpoint / "random_states_1.pkl").exists()
    assert (out / "model_index.json").exists() or (out / "pytorch_lora_weights.safetensors").exists()
    assert not list(out.glob("*.tmp"))


def test_launch_that_accelerate_would_not_distribute_is_refused(tmp_path):
    env = {"ACCELERATE_USE_CPU": None}  # unset: Accelerate would run each worker as its own single process
    result = _launch("train_raven.py", ["--output_dir", str(tmp_path / "out")], tmp_path, env)
    assert result.returncode != 0
    assert "ACCELERATE_USE_CPU=1" in result.stderr
    assert not (tmp_path / "out" / "checkpoint-2").exists()
