"""``train_preview_decoder.py`` and TAEHV decoders of other strides than taew2_1's (tiny models, CPU, no network)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_preview_decoder
from raven_video.pipelines.preview_decoder import TAEHVDecoder, TAEHVStreamingDecoder
from raven_video.testing import tiny_pipeline, tiny_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_world_strides_stream_and_round_trip_as_a_diffusers_folder(tmp_path):
    """4x spatial (the world VAE): shapes, chunked == one-shot, save_pretrained / from_file(folder) give the same
    frames, and the state-dict keys keep the taew2_1 layout (an identity where a stage does not upsample)."""
    torch.manual_seed(0)
    world = TAEHVDecoder(widths=(8, 8, 8, 8), space_strides=(1, 2, 2)).eval()
    assert (world.spatial_compression_ratio, world.temporal_compression_ratio) == (4, 4)
    assert world.state_dict().keys() == TAEHVDecoder(widths=(8, 8, 8, 8)).state_dict().keys()
    latents = torch.randn(2, 16, 5, 4, 4, generator=torch.Generator().manual_seed(1))
    whole = world.decode(latents)
    assert whole.shape == (2, 3, 17, 16, 16)
    stream = TAEHVStreamingDecoder(world)
    chunks = torch.cat([stream.decode_chunk(latents[:, :, i:i + 2]) for i in (0, 2, 4)], dim=2)
    torch.testing.assert_close(chunks, whole, rtol=0, atol=1e-6)
    world.save_pretrained(str(tmp_path / "preview"))
    again = TAEHVDecoder.from_file(str(tmp_path / "preview"))
    assert tuple(again.config.space_strides) == (1, 2, 2)
    assert torch.equal(again.decode(latents), whole)


@pytest.mark.parametrize("kwargs, message", [(dict(space_strides=(2, 3, 2)), "must be 1 or 2"),
                                             (dict(widths=(8, 8, 8)), "give 4 widths")])
def test_bad_architecture_is_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TAEHVDecoder(**kwargs)


def test_strides_follow_the_vae_compression():
    assert train_preview_decoder.strides_for(8, "spatial") == [2, 2, 2]
    assert train_preview_decoder.strides_for(4, "spatial") == [1, 2, 2]
    with pytest.raises(ValueError, match="covers 1, 2, 4 or 8"):
        train_preview_decoder.strides_for(16, "spatial")


def test_preview_distillation_learns_exports_and_streams_in_the_pipeline(tmp_path):
    tiny_vae(seed=0).save_pretrained(str(tmp_path / "vae"))
    out = tmp_path / "preview"
    train_preview_decoder.main([
        "--pretrained_vae", str(tmp_path / "vae"), "--widths", "16,16,16,16", "--num_frames", "5", "--height", "32",
        "--width", "32", "--train_batch_size", "2", "--max_train_steps", "40", "--learning_rate", "3e-3",
        "--lr_warmup_steps", "0", "--validation_steps", "20", "--num_validation_clips", "1",
        "--validation_num_frames", "5", "--dataloader_num_workers", "0", "--checkpointing_steps", "40",
        "--output_dir", str(out), "--report_to", "none"])
    with open(out / "logs" / "metrics.jsonl") as handle:
        losses = [row["loss"] for row in map(json.loads, handle) if "loss" in row]
    assert len(losses) == 40 and np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 40 and np.isfinite(metrics["psnr_vs_vae"]) and (out / "validation").is_dir()
    preview = TAEHVDecoder.from_pretrained(str(out))
    assert preview.spatial_compression_ratio == 8  # the tiny VAE's (Wan2.1's) strides
    pipe = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False, preview_decoder=str(out))
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a cat walks", num_frames=9, height=32, width=48, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 9, 3, 32, 48)


def test_bad_input_is_one_line(tmp_path):
    run = [sys.executable, os.path.join(ROOT, "train_preview_decoder.py"), "--output_dir", str(tmp_path / "x")]
    missing = subprocess.run(run, capture_output=True, text=True)
    assert missing.returncode == 2 and "--pretrained_vae is required" in missing.stderr
    tiny_vae(seed=0).save_pretrained(str(tmp_path / "vae"))
    wrong = subprocess.run(run + ["--pretrained_vae", str(tmp_path / "vae"), "--num_frames", "6"], capture_output=True,
                           text=True)
    assert wrong.returncode == 2 and "4k+1" in wrong.stderr and "Traceback" not in wrong.stderr
    assert not (tmp_path / "x").exists()  # nothing written before the checks


def test_world_reconstructions_through_a_preview_decoder_keep_the_clip_length():
    """``evaluate.reconstructed_videos(..., preview=...)``: the shipped world VAE's latents of 81-frame clips decoded
    by a world-strided preview decoder come back as 81 uint8 frames of 64x64, as the VAE's own reconstructions."""
    from diffusers import AutoencoderKLWan

    from raven_video.world import evaluate as ev
    from raven_video.world.shipped import vae_path

    vae = AutoencoderKLWan.from_pretrained(vae_path()).eval()
    torch.manual_seed(0)
    preview = TAEHVDecoder(widths=(8, 8, 8, 8), space_strides=(1, 2, 2)).eval()
    clips = ev.reference_videos(ev.heldout_set(1))
    through_vae = ev.reconstructed_videos(vae, clips)
    through_preview = ev.reconstructed_videos(vae, clips, preview=preview)
    assert [v.shape for v in through_preview] == [v.shape for v in through_vae] == [(81, 64, 64, 3)]
    assert through_preview[0].dtype == np.uint8


def test_evaluate_world_preview_decoder_needs_references(tmp_path):
    run = [sys.executable, os.path.join(ROOT, "scripts", "evaluate_world.py"), "--teacher", str(tmp_path),
           "--preview_decoder", str(tmp_path), "--output", str(tmp_path / "x.json")]
    result = subprocess.run(run, capture_output=True, text=True)
    assert result.returncode == 2 and "used with --references" in result.stderr and "Traceback" not in result.stderr


def test_preview_distillation_is_reproducible(tmp_path):
    """Same flags, same seed: the same initialisation and batches, so the same losses."""
    tiny_vae(seed=0).save_pretrained(str(tmp_path / "vae"))
    runs = []
    for name in ("a", "b"):
        train_preview_decoder.main([
            "--pretrained_vae", str(tmp_path / "vae"), "--widths", "8,8,8,8", "--num_frames", "5", "--height", "32",
            "--width", "32", "--train_batch_size", "2", "--max_train_steps", "3", "--validation_steps", "3",
            "--num_validation_clips", "1", "--validation_num_frames", "5", "--dataloader_num_workers", "0",
            "--output_dir", str(tmp_path / name), "--report_to", "none"])
        with open(tmp_path / name / "logs" / "metrics.jsonl") as handle:
            runs.append([row["loss"] for row in map(json.loads, handle) if "loss" in row])
    assert len(runs[0]) == 3 and runs[0] == runs[1]


def test_preview_linear_schedule_decays_and_a_resumed_run_follows_it(tmp_path):
    """``--lr_scheduler linear``: the rate falls to 0 at ``--max_train_steps``; a run resumed with a longer budget and
    the new schedule continues from its step (how the world preview was extended)."""
    tiny_vae(seed=0).save_pretrained(str(tmp_path / "vae"))
    common = ["--pretrained_vae", str(tmp_path / "vae"), "--widths", "8,8,8,8", "--num_frames", "5", "--height", "32",
              "--width", "32", "--train_batch_size", "2", "--validation_steps", "100", "--num_validation_clips", "1",
              "--validation_num_frames", "5", "--dataloader_num_workers", "0", "--lr_warmup_steps", "0",
              "--learning_rate", "1e-3", "--checkpointing_steps", "2", "--output_dir", str(tmp_path / "run"),
              "--report_to", "none"]
    train_preview_decoder.main(common + ["--max_train_steps", "2"])
    train_preview_decoder.main(common + ["--max_train_steps", "6", "--lr_scheduler", "linear",
                                         "--resume_from_checkpoint", "latest"])
    with open(tmp_path / "run" / "logs" / "metrics.jsonl") as handle:
        rows = [row for row in map(json.loads, handle) if "lr" in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["lr"] for row in rows[:2]] == [1e-3, 1e-3]
    # after step s of 6: 1e-3 * (6 - s) / 6
    np.testing.assert_allclose([row["lr"] for row in rows[2:]], [1e-3 * (6 - s) / 6 for s in (3, 4, 5, 6)], atol=1e-12)
