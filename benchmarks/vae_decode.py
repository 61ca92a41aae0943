"""Streaming Wan VAE decode of 81 frames at 480x832 (21 latent frames, 7 chunks), random weights: what each lever buys.

Variants: eager bf16; + cudnn.benchmark; + channels_last_3d weights; ``FastWanDecoder`` of ``raven_video.pipelines.vae_fast``
with each causal-convolution implementation (``conv3d``, ``taps2d``, ``stack2d``), unfused and fused; and, per decoder
convolution shape, the time of one call of each implementation. Prints ONE JSON line with seconds per full decode (best
of 3 after a warm-up) and the max abs difference to the eager output.
"""

from __future__ import annotations

import json
import time

import torch
from diffusers import AutoencoderKLWan

from raven_video.pipelines.vae_fast import FastWanDecoder
from raven_video.pipelines.vae_streaming import StreamingWanDecoder


def decode(vae, latents, fast=None):
    decoder = StreamingWanDecoder(vae, decoder=fast)
    outs = [decoder.decode_chunk(latents[:, :, s:s + 3]) for s in range(0, latents.shape[2], 3)]
    return torch.cat(outs, dim=2)


def timed(vae, latents, fast=None, repeats=3):
    decode(vae, latents, fast)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        out = decode(vae, latents, fast)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - tic)
    return best, out


def per_conv_times(vae):
    """One call of each implementation on the decoder's 3x3x3 convolution shapes (2 cache frames + T new ones)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    shapes = {(384, 1, 60, 104), (384, 2, 120, 208), (192, 4, 240, 416), (96, 4, 480, 832)}
    times = {}
    for channels, frames, height, width in sorted(shapes):
        conv = WanCausalConv3d(channels, channels, 3, padding=1).to("cuda", torch.bfloat16)
        x = torch.randn(1, channels, frames, height, width, device="cuda", dtype=torch.bfloat16)
        cache = torch.randn(1, channels, 2, height, width, device="cuda", dtype=torch.bfloat16)
        flop = 2 * channels * channels * 27 * frames * height * width
        row = {}
        for impl in ("diffusers", "conv3d", "taps2d", "stack2d"):
            fast = FastWanDecoder(vae, conv_impl=impl, fuse=False)
            args = (x, cache) if impl == "diffusers" else (  # the fast paths keep activations channels-last
                x.contiguous(memory_format=torch.channels_last_3d), cache.contiguous(memory_format=torch.channels_last_3d))
            for _ in range(3):
                fast.causal_conv(conv, *args)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                fast.causal_conv(conv, *args)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / 10
            row[impl] = {"ms": round(ms, 3), "tflops": round(flop / ms / 1e9, 1)}
        times[f"C{channels}_T{frames}_{height}x{width}"] = row
    return times


def main():
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = AutoencoderKLWan()
    vae = vae.to(torch.bfloat16).eval()
    latents = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    result = {"benchmark": "vae_decode", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    with torch.no_grad():
        t, ref = timed(vae, latents)
        result["eager_s"] = round(t, 3)
        torch.backends.cudnn.benchmark = True
        t, out = timed(vae, latents)
        result["cudnn_benchmark_s"] = round(t, 3)
        convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv3d)]
        for m in convs:
            m.to(memory_format=torch.channels_last_3d)
        t, out = timed(vae, latents)
        result["channels_last_3d_s"] = round(t, 3)
        result["channels_last_3d_max_abs_diff"] = (out.float() - ref.float()).abs().max().item()
        for m in convs:
            m.to(memory_format=torch.contiguous_format)
        for impl in ("conv3d", "taps2d", "stack2d"):
            t, out = timed(vae, latents, FastWanDecoder(vae, conv_impl=impl, fuse=False))
            result[f"{impl}_s"] = round(t, 3)
            result[f"{impl}_max_abs_diff"] = (out.float() - ref.float()).abs().max().item()
        for impl in ("conv3d", "taps2d"):
            t, out = timed(vae, latents, FastWanDecoder(vae, conv_impl=impl, fuse=True))
            result[f"{impl}_fused_s"] = round(t, 3)
            result[f"{impl}_fused_max_abs_diff"] = (out.float() - ref.float()).abs().max().item()
        result["per_conv_ms"] = per_conv_times(vae)
    result["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
