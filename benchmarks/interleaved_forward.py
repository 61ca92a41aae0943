"""GPU check + timing of the training-time-test forward (Eq. 5) at Wan2.1-1.3B size, random weights.

1. correctness on CUDA: tiny model, the flex-attention ``BlockMask`` path equals the SDPA bool-mask path (fwd + grads);
2. speed/memory: one interleaved forward + backward over ``[z1, x1, ..., z7]`` (13 segments x 4680 = 60 840 tokens),
   bf16 autocast over fp32 weights, per-block activation checkpointing on/off.

Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def check_flex_equals_sdpa(device):
    from raven_video.testing import tiny_causal_transformer

    model = tiny_causal_transformer().to(device)
    g = torch.Generator(device=device).manual_seed(0)
    noisy = torch.randn(2, 16, 9, 8, 8, device=device, generator=g)
    clean = torch.randn(2, 16, 9, 8, 8, device=device, generator=g)
    text = torch.randn(2, 16, 32, device=device, generator=g)
    u = torch.tensor([938.0, 625.0], device=device)
    out = {}
    for backend in ("sdpa", "flex"):
        model.zero_grad()
        y = model.forward_interleaved(noisy, clean, u, text, mask_backend=backend)
        y.square().mean().backward()
        out[backend] = (y.detach(), model.blocks[0].attn1.to_k.weight.grad.clone())
    return {
        "flex_vs_sdpa_max_abs_out": (out["flex"][0] - out["sdpa"][0]).abs().max().item(),
        "flex_vs_sdpa_max_abs_grad": (out["flex"][1] - out["sdpa"][1]).abs().max().item(),
    }


def time_full_size(device, checkpointing, repeats=3):
    from raven_video import CausalWanTransformer3DModel

    with torch.device(device):
        model = CausalWanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                            num_layers=30, text_dim=4096, freq_dim=256, num_frames_per_block=3)
    if checkpointing:
        model.enable_gradient_checkpointing()
    noisy = torch.randn(1, 16, 21, 60, 104, device=device)
    clean = torch.randn(1, 16, 21, 60, 104, device=device)
    text = torch.randn(1, 512, 4096, device=device)
    u = torch.tensor([833.0], device=device)
    times = []
    for _ in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**30
        tic = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model.forward_interleaved(noisy, clean, u, text)
        torch.cuda.synchronize()
        forward_peak = torch.cuda.max_memory_allocated() / 2**30
        after_forward = torch.cuda.memory_allocated() / 2**30
        y.float().square().mean().backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model
    torch.cuda.empty_cache()
    return {"fwd_bwd_s": round(min(times[1:]), 3), "first_call_s": round(times[0], 2), "peak_mem_gb": round(peak, 2),
            "weights_and_inputs_gb": round(base, 2), "forward_peak_gb": round(forward_peak, 2),
            "saved_for_backward_gb": round(after_forward - base, 2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--skip_full", action="store_true")
    p.add_argument("--checkpointing_only", action="store_true")
    args = p.parse_args()
    device = "cuda"
    result = {"benchmark": "interleaved_forward", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    result.update(check_flex_equals_sdpa(device))
    if not args.skip_full:
        for ckpt in ((True,) if args.checkpointing_only else (True, False)):
            try:
                result[f"full_size_checkpointing_{ckpt}"] = time_full_size(device, ckpt)
            except torch.OutOfMemoryError as err:
                result[f"full_size_checkpointing_{ckpt}"] = f"OOM: {str(err)[:120]}"
                torch.cuda.empty_cache()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
