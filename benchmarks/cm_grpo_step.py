#!/usr/bin/env python
"""Time one CM-GRPO step by phase (rollout, decode, reward, policy fwd/bwd) and the peak memory; one JSON line.

Full size (default, GPU): causal Wan2.1-1.3B with random weights, 81x480x832 (21 latent frames = 7 chunks), group 4,
weight-free rewards, LoRA r=256 on the paper's 16 module types (all linear layers), bf16 autocast. ``--tiny``: the tiny test models on CPU.

    python benchmarks/cm_grpo_step.py            # GPU
    python benchmarks/cm_grpo_step.py --tiny     # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(tiny: bool, device, dtype):
    from diffusers import AutoencoderKLWan

    from raven_video.models.transformer_causal_wan import CausalWanTransformer3DModel
    from raven_video.testing import tiny_causal_transformer, tiny_vae

    if tiny:
        return tiny_causal_transformer(seed=0).to(device), tiny_vae(seed=0).to(device), (16, 6, 4, 6), 32
    transformer = CausalWanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=1024, num_frames_per_block=3,
    ).to(device, dtype)
    vae = AutoencoderKLWan().to(device, dtype)  # Wan2.1 VAE architecture, random weights
    return transformer, vae, (16, 21, 60, 104), 512


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--group_size", type=int, default=4)
    p.add_argument("--slices_per_step", type=int, default=2)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="Timed steps (after one warm-up step).")
    p.add_argument("--rewards", type=str, default="proxy_motion=1,proxy_flicker=1,proxy_smoothness=1")
    p.add_argument("--gradient_checkpointing", action="store_true")
    args = p.parse_args(argv)

    from raven_video.rewards import RewardComposer
    from raven_video.training.cm_grpo_step import CMGRPOConfig, CMGRPOState, cm_grpo_step, lora_config
    from raven_video.training.rollout import GeneratorForward

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    transformer, vae, shape, text_len = build(args.tiny, device, dtype)
    transformer.requires_grad_(False)
    vae.requires_grad_(False)
    rank = 4 if args.tiny else args.rank
    transformer.add_adapter(lora_config(rank, rank))
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for q in params:
        q.data = q.data.float()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=5e-6, betas=(0.0, 0.999), eps=1e-10)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None
    policy = GeneratorForward(transformer)
    state = CMGRPOState(policy=policy, policy_train=policy, vae=vae,
                        composer=RewardComposer(args.rewards, build_missing=True, device=device),
                        optimizer=optimizer, **({"autocast": autocast} if autocast else {}))
    config = CMGRPOConfig(group_size=args.group_size, groups_per_infer=args.group_size,
                          slices_per_step=args.slices_per_step)
    text = torch.randn(1, text_len, transformer.config.text_dim, device=device)
    phases = ("time_rollout", "time_decode", "time_reward", "time_policy")
    totals = dict.fromkeys(phases, 0.0)
    step_times = []
    for step in range(args.steps + 1):
        if cuda:
            torch.cuda.synchronize()
            if step == 1:
                torch.cuda.reset_peak_memory_stats()
        tic = time.perf_counter()
        logs = cm_grpo_step(state, "a cat", text, None, shape, config, torch.Generator().manual_seed(step))
        if cuda:
            torch.cuda.synchronize()
        if step > 0:  # step 0 is warm-up
            step_times.append(time.perf_counter() - tic)
            for k in phases:
                totals[k] += logs[k]
    result = {
        "benchmark": "cm_grpo_step", "tiny": args.tiny, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "latent_shape": list(shape), "group_size": args.group_size, "slices_per_step": args.slices_per_step,
        "lora_rank": rank, "lora_params": sum(q.numel() for q in params), "rewards": args.rewards,
        "gradient_checkpointing": args.gradient_checkpointing,
        "step_s": sum(step_times) / len(step_times),
        **{k.replace("time_", "") + "_s": v / args.steps for k, v in totals.items()},
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
