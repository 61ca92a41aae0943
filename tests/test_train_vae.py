"""``train_vae.py`` and the world VAE it produced (shipped in the package)."""

import json
import os
import subprocess
import sys

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm
from safetensors.torch import load_file

import train_vae
from raven_video.training.vae import NormWarmup, kaiming_init, psnr, reconstruct
from raven_video.world import vae_path
from raven_video.world.data import WorldClipDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--base_dim", "8", "--dim_mult", "1,2", "--temporal_downsample", "true", "--num_frames", "5",
        "--train_batch_size", "2", "--num_validation_clips", "2", "--validation_num_frames", "9", "--stats_clips", "2",
        "--dataloader_num_workers", "0", "--report_to", "none", "--lr_warmup_steps", "0"]


def _tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[True], scale_factor_spatial=2, scale_factor_temporal=2)


def test_kaiming_init_and_norm_warmup_keep_the_architecture():
    vae = _tiny_vae()
    keys = set(vae.state_dict())
    kaiming_init(vae)
    convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in convs if m.bias is not None)
    norm = next(m for m in vae.modules() if isinstance(m, WanRMS_norm))
    x = torch.randn(1, norm.gamma.shape[0], 2, 4, 4)
    warmup = NormWarmup(vae, steps=4)
    assert warmup.set_step(0) == 0.0 and torch.allclose(norm(x), x)  # a = 0: the identity
    assert warmup.set_step(2) == 0.5
    warmup.set_step(4)  # a = 1: hooks removed, the standard norm
    assert not warmup.handles and torch.allclose(norm(x), WanRMS_norm.forward(norm, x))
    assert set(vae.state_dict()) == keys


def test_train_vae_exports_a_diffusers_vae_with_latent_statistics_and_resumes_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_vae.main([*TINY, "--init", "kaiming", "--norm_warmup_steps", "1", "--max_train_steps", "4",
                    "--checkpointing_steps", "2", "--validation_steps", "4", "--output_dir", str(straight)])
    train_vae.main([*TINY, "--init", "kaiming", "--norm_warmup_steps", "1", "--max_train_steps", "2",
                    "--checkpointing_steps", "2", "--output_dir", str(resumed)])
    train_vae.main([*TINY, "--init", "kaiming", "--norm_warmup_steps", "1", "--max_train_steps", "4",
                    "--checkpointing_steps", "2", "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    a = load_file(str(straight / "checkpoint-4" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoint-4" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    vae = AutoencoderKLWan.from_pretrained(str(straight))
    metrics = json.loads((straight / "metrics.json").read_text())
    assert len(vae.config.latents_mean) == 16 and metrics["latents_std"] == vae.config.latents_std
    assert (straight / "validation" / "step-4.png").is_file()


def test_decoder_only_fine_tuning_keeps_the_latent_space(tmp_path):
    """``--train_decoder_only``: the encoder, quant_conv and latent statistics are those of ``--pretrained_vae``
    (so latents and the models trained on them stay valid), the decoder moves; without a pretrained VAE: one line."""
    base = tmp_path / "base"
    train_vae.main([*TINY, "--init", "kaiming", "--max_train_steps", "2", "--checkpointing_steps", "2",
                    "--output_dir", str(base)])
    train_vae.main([*TINY, "--pretrained_vae", str(base), "--train_decoder_only", "--max_train_steps", "3",
                    "--learning_rate", "1e-2", "--checkpointing_steps", "3", "--output_dir", str(tmp_path / "ft")])
    before, after = AutoencoderKLWan.from_pretrained(str(base)), AutoencoderKLWan.from_pretrained(str(tmp_path / "ft"))
    old, new = before.state_dict(), after.state_dict()
    frozen = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    moved = [k for k in old if k.startswith(("decoder.", "post_quant_conv.")) and not torch.equal(old[k], new[k])]
    assert frozen and all(torch.equal(old[k], new[k]) for k in frozen) and moved
    assert after.config.latents_mean == before.config.latents_mean
    assert after.config.latents_std == before.config.latents_std
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_vae.py"), *TINY, "--train_decoder_only",
                             "--output_dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 2 and "pass --pretrained_vae" in result.stderr and "Traceback" not in result.stderr


def test_train_vae_bad_input_is_one_line(tmp_path):
    run = [sys.executable, os.path.join(ROOT, "train_vae.py"), *TINY, "--output_dir", str(tmp_path / "x")]
    for flags, message in ((["--num_frames", "6"], "must be 2k+1"), (["--norm_warmup_steps", "9", "--max_train_steps",
                                                                      "5"], "--norm_warmup_steps 9")):
        result = subprocess.run(run + flags, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_the_shipped_world_vae_meets_its_psnr_threshold():
    """docs/world.md: >= 30 dB on held-out world clips (measured 30.7 dB on 24 clips of 81 frames)."""
    vae = AutoencoderKLWan.from_pretrained(vae_path()).eval()
    clips = WorldClipDataset(8, split="heldout", evaluation=True, num_frames=33)
    video = torch.stack([clips[i]["video"] for i in range(8)])  # 30.3 dB (clips range 27.7 to 35.6)
    assert psnr(reconstruct(vae, video), video) >= 30.0
    metrics = json.loads(open(os.path.join(vae_path(), "metrics.json")).read())
    assert metrics["evaluation"]["psnr_81_frames"] >= 30.0
