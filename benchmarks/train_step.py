#!/usr/bin/env python
"""One complete RAVEN iteration (rollout, critic step, generator step) at full size with random weights.

Wan2.1-T2V-1.3B student, critic and teacher (random weights measure speed and memory exactly as real ones),
81x480x832 video -> latent [16, 21, 60, 104], 7 chunks of 3 latent frames, random text embeddings [1, 512, 4096].
fp32 master weights + bf16 autocast for student/critic (docs/method.md §5), bf16 teacher. Prints ONE JSON line:
time per phase (seconds), peak GPU memory, options.

    python benchmarks/train_step.py                                  # H100, defaults
    python benchmarks/train_step.py --gradient_checkpointing --use_8bit_adam --text_encoder cpu
    python benchmarks/train_step.py --tiny                           # CPU smoke run with tiny models

``--iterations N`` runs N generator iterations (each = rollout + critic + generator) and reports the last one (the
first includes flex-attention compilation). ``--text_encoder gpu`` also holds a random UMT5-XXL encoder on the GPU
and encodes a prompt each iteration; ``cpu`` keeps it on the CPU (offload); ``none`` (default) uses random
embeddings only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024, num_frames_per_block=3)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random models and latents (runs on CPU)")
    p.add_argument("--num_frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--use_8bit_adam", action="store_true")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--text_encoder", choices=("none", "gpu", "cpu"), default="none")
    p.add_argument("--history", default="raven")
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--iterations", type=int, default=2)
    return p.parse_args(argv)


def build(args, device):
    from raven_video.models.transformer_causal_wan import CausalWanTransformer3DModel
    from raven_video.testing import tiny_causal_transformer

    if args.tiny:
        return [tiny_causal_transformer(seed=s).to(device) for s in (0, 1, 2)], 32
    models = []
    for seed, dtype in ((0, torch.float32), (1, torch.float32), (2, torch.bfloat16)):
        torch.manual_seed(seed)
        with torch.device(device):
            models.append(CausalWanTransformer3DModel(**WAN_1_3B).to(dtype))
    return models, 4096


def main(argv=None):
    args = parse_args(argv)
    from raven_video.training.raven_step import RavenConfig, TrainState, raven_iteration
    from raven_video.training.rollout import GeneratorForward

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.num_frames, args.height, args.width = 21, 32, 48
    (student, critic, teacher), text_dim = build(args, device)
    teacher.requires_grad_(False).eval()
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
        critic.enable_gradient_checkpointing()
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        adam = bnb.optim.AdamW8bit
    else:
        adam = torch.optim.AdamW
    opt_s = adam(student.parameters(), lr=2e-6, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.0)
    opt_c = adam(critic.parameters(), lr=4e-7, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.0)
    from raven_video.training.ema import EMA

    ema = EMA(student, decay=0.9675)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
    import contextlib

    generator_module = GeneratorForward(student)
    state = TrainState(student=generator_module, student_train=generator_module, critic_train=critic, teacher=teacher,
                       student_optimizer=opt_s, critic_optimizer=opt_c, ema=ema,
                       autocast=autocast or contextlib.nullcontext)
    encoder = None
    if args.text_encoder != "none" and not args.tiny:
        from transformers import UMT5Config, UMT5EncoderModel

        enc_device = device if args.text_encoder == "gpu" else torch.device("cpu")
        with torch.device(enc_device):
            encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).to(torch.bfloat16).eval()
    latent = (1, 16, (args.num_frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    gen = torch.Generator().manual_seed(0)
    negative = torch.randn(1, 512, text_dim, generator=gen).to(device)
    config = RavenConfig(guidance_scale=args.guidance_scale, history=args.history, ttur=1)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    logs = {}
    for it in range(args.iterations):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        tic = time.perf_counter()
        if encoder is not None:
            ids = torch.randint(0, 1000, (1, 512), generator=gen).to(encoder.device)
            with torch.no_grad():
                text = encoder(input_ids=ids).last_hidden_state.to(device, torch.float32)
        else:
            text = torch.randn(1, 512, text_dim, generator=gen).to(device)
        t_text = time.perf_counter() - tic
        logs = raven_iteration(state, it, text, negative, latent, config, torch.Generator().manual_seed(it))
        sync()
        logs["time_text"] = t_text
        logs["time_iteration"] = time.perf_counter() - tic
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    result = {
        "benchmark": "raven_train_step",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tiny": args.tiny,
        "video": [args.num_frames, args.height, args.width],
        "latent": list(latent),
        "history": args.history,
        "use_8bit_adam": args.use_8bit_adam,
        "gradient_checkpointing": args.gradient_checkpointing,
        "text_encoder": args.text_encoder,
        "iterations": args.iterations,
        "time_rollout_s": round(logs["time_rollout"], 4),
        "time_critic_s": round(logs["time_critic"], 4),
        "time_generator_s": round(logs["time_generator"], 4),
        "time_text_s": round(logs["time_text"], 4),
        "time_iteration_s": round(logs["time_iteration"], 4),
        "peak_memory_gib": None if peak is None else round(peak, 2),
        "fits_80gb": None if peak is None else peak < 80 * 1e9 / 2**30,
        "dmd_loss": logs.get("dmd_loss"),
        "critic_loss": logs.get("critic_loss"),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
