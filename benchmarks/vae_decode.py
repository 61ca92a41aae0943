"""Streaming Wan VAE decode of 81 frames at 480x832 (21 latent frames, 7 chunks), random weights: what each lever buys.

Variants: eager bf16; + cudnn.benchmark; + channels_last_3d; + torch.compile of every decoder residual block / the
mid block / up blocks (regional). Prints ONE JSON line with seconds per full decode (best of 3 after a warm-up) and
the max abs difference to the eager output.
"""

from __future__ import annotations

import json
import time

import torch
from diffusers import AutoencoderKLWan

from raven_video.pipelines.vae_streaming import StreamingWanDecoder


def decode(vae, latents):
    decoder = StreamingWanDecoder(vae)
    outs = [decoder.decode_chunk(latents[:, :, s:s + 3]) for s in range(0, latents.shape[2], 3)]
    return torch.cat(outs, dim=2)


def timed(vae, latents, repeats=3):
    decode(vae, latents)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        out = decode(vae, latents)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - tic)
    return best, out


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
        for block in [*vae.decoder.up_blocks, vae.decoder.mid_block]:
            block.compile()
        t, out = timed(vae, latents)
        result["compiled_blocks_s"] = round(t, 3)
        result["compiled_blocks_max_abs_diff"] = (out.float() - ref.float()).abs().max().item()
    result["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
