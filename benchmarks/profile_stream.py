"""Where the GPU time of one streamed 81-frame video goes: ``torch.profiler`` over ``benchmarks/stream.py``'s setting.

Prints ONE JSON line: total CUDA time per kernel name (top ``--top``), grouped into categories (GEMM, attention,
convolution, pointwise/reduction, copies), for the transformer-only run (``output_type="latent"``) and the full run
(VAE decode included). A development tool; numbers go to BENCHMARKS.md only through ``stream.py``.

    python benchmarks/profile_stream.py --mode realtime
    python benchmarks/profile_stream.py --mode realtime --self_attention_kernel fa4 --fp8 --first_chunk
    python benchmarks/profile_stream.py --mode realtime --model raven_video/world/weights/pipeline --first_chunk
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream import build_pipeline, run_once, stream_inputs  # noqa: E402

CATEGORIES = [
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|sdpa)|sm90_.*(fprop|mha)|triton_tem_fused.*flex"),
    ("convolution", r"conv|implicit_gemm|cudnn|xmma_fprop|sm90_xmma"),
    ("gemm", r"gemm|cutlass|sm90_xmma_gemm|nvjet|matmul|mm_"),
    ("copy", r"copy|cat|memcpy|memset|fill"),
]


def categorize(name: str) -> str:
    lowered = name.lower()
    for category, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return category
    return "pointwise/other"


def kernel_table(prof, top: int) -> dict:
    per_name = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_name[event.name][0] += event.device_time / 1000.0  # ms
            per_name[event.name][1] += 1
    categories = defaultdict(float)
    for name, (ms, _) in per_name.items():
        categories[categorize(name)] += ms
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "cuda_ms_total": round(sum(ms for ms, _ in per_name.values()), 1),
        "by_category_ms": {k: round(v, 1) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:120], "ms": round(ms, 2), "calls": c, "category": categorize(n)}
                        for n, (ms, c) in ranked],
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="realtime", choices=("eager", "realtime"))
    p.add_argument("--vae_conv", default="conv3d")
    p.add_argument("--no_vae_fuse", action="store_true")
    p.add_argument("--no_cuda_graphs", action="store_true")
    p.add_argument("--self_attention_kernel", default=None,
                   help="realtime: enable_realtime(self_attention_kernel=...), e.g. fa4 (as stream.py's realtime-selfattn-fa4)")
    p.add_argument("--fp8", action="store_true", help="realtime: enable_realtime(fp8=True)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--model", default=None, help="a CausalWanPipeline folder (as stream.py --model), native size")
    p.add_argument("--prompt", default=None, help="encode this prompt inside every stream (as stream.py --prompt)")
    p.add_argument("--first_chunk", action="store_true",
                   help="also profile CPU and CUDA of a warm stream's first chunk alone (start to first frames)")
    args = p.parse_args()
    args.tiny, args.num_frames, args.vae_dtype = False, 81, "bf16"
    args.local_attn_size = args.sink_size = None
    pipe = build_pipeline(args, "cuda", torch.bfloat16)
    args.height, args.width = (pipe.config.height, pipe.config.width) if args.model else (480, 832)
    text = torch.randn(1, 512, pipe.transformer.config.text_dim, device="cuda", dtype=torch.bfloat16)
    if args.mode == "realtime":
        pipe.enable_realtime(vae_conv=args.vae_conv, vae_fuse=not args.no_vae_fuse,
                             cuda_graphs=not args.no_cuda_graphs, self_attention_kernel=args.self_attention_kernel,
                             fp8=args.fp8)
    for _ in range(3):  # compile, CUDA-graph capture, one replay
        run_once(pipe, text, args, "cuda", "pt")
    result = {"benchmark": "profile_stream", "mode": args.mode, "vae_conv": args.vae_conv,
              "vae_fuse": not args.no_vae_fuse, "cuda_graphs": not args.no_cuda_graphs,
              "self_attention_kernel": args.self_attention_kernel, "fp8": args.fp8}
    for output_type in ("latent", "pt"):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run_once(pipe, text, args, "cuda", output_type)
            torch.cuda.synchronize()
        result["dit_only" if output_type == "latent" else "full"] = kernel_table(prof, args.top)
    if args.first_chunk:
        result["first_chunk"] = first_chunk_table(pipe, text, args, args.top)
    if not args.model:
        result["vae_decoder"] = type(pipe._fast_decoder or pipe.vae.decoder).__name__
        result["vae_ops"] = vae_op_table(pipe.vae, args.top, decoder=pipe._fast_decoder)
    print(json.dumps(result))


def first_chunk_table(pipe, text, args, top: int) -> dict:
    """Wall time from a warm stream's start to its first chunk's frames, and the ops (self CPU and CUDA time) in it."""
    def first():
        stream = pipe.stream(**stream_inputs(args, text), num_frames=args.num_frames, height=args.height,
                             width=args.width, generator=torch.Generator(device="cpu").manual_seed(0), output_type="np")
        chunk = next(stream)
        stream.close()
        torch.cuda.synchronize()
        return chunk

    first()
    tic = time.perf_counter()
    first()
    wall = time.perf_counter() - tic
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        first()
    events = prof.key_averages()
    by_cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    by_cuda = sorted(events, key=lambda e: -e.self_device_time_total)[:top]
    return {"wall_s": round(wall, 4),
            "self_cpu": [{"op": e.key, "ms": round(e.self_cpu_time_total / 1000, 2), "calls": e.count} for e in by_cpu],
            "self_cuda": [{"op": e.key, "ms": round(e.self_device_time_total / 1000, 2), "calls": e.count}
                          for e in by_cuda]}


def vae_op_table(vae, top: int, decoder=None) -> list:
    """Self CUDA time per (aten op, input shapes) of one streamed decode of 21 latent frames, top ``top``, with the
    decoder the stream uses (``enable_realtime``'s ``FastWanDecoder``; None: diffusers' ``vae.decoder``)."""
    from raven_video.pipelines.vae_streaming import StreamingWanDecoder

    latents = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)

    def decode():
        streaming = StreamingWanDecoder(vae, decoder=decoder)
        for start in range(0, 21, 3):
            streaming.decode_chunk(latents[:, :, start:start + 3])
        torch.cuda.synchronize()

    decode()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        decode()
    rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_device_time_total)[:top]
    return [{"op": e.key, "shapes": str(e.input_shapes)[:160], "self_cuda_ms": round(e.self_device_time_total / 1000, 2),
             "calls": e.count} for e in rows]


if __name__ == "__main__":
    main()
