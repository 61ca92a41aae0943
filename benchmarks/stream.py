"""Streaming generation speed at Wan2.1-1.3B size with random weights (weights do not change speed).

Setting: batch 1, bf16 transformer, 81 frames at 480x832 (21 latent frames, 7 chunks of 3), 4 consistency steps +
1 cache pass per chunk, full KV history, full Wan VAE streamed decode, prompt already encoded (random UMT5-sized
embeddings: the text encoder is outside the measured path, as in "encoded prompt -> first frames").

Prints ONE JSON line: fps, first_chunk_latency_s, per_chunk_ms, dit_only_s, peak_mem_gb, floor_ratio, mode, ...

    python benchmarks/stream.py                  # H100/H200
    python benchmarks/stream.py --tiny           # CPU smoke test of the script itself
    python benchmarks/stream.py --mode realtime-selfattn-fa4 --devices cuda:0,cuda:1      # FA4, VAE on a 2nd GPU
    python benchmarks/stream.py --mode realtime-selfattn-fa4 --devices cuda:0,cuda:1 --transformer_split 0.7
    python benchmarks/stream.py --mode realtime --num_frames 969 --local_attn_size 21 --sink_size 3   # one minute
    python benchmarks/stream.py --mode realtime --model raven_video/world/weights/pipeline \
        --prompt "a red circle moves right quickly, on a black background"   # a trained folder, prompt encoded per stream
"""

from __future__ import annotations

import argparse
import datetime
import os
import json
import subprocess
import time

import torch


def build_pipeline(args, device, dtype):
    from diffusers import AutoencoderKLWan, FlowMatchLCMScheduler

    from raven_video import CausalWanPipeline, CausalWanTransformer3DModel
    from raven_video.testing import tiny_causal_transformer, tiny_vae

    if args.model:  # a trained pipeline folder (e.g. the shipped world model), transformer and text encoder in dtype
        pipe = CausalWanPipeline.from_pretrained(args.model)
        pipe.transformer.to(device=device, dtype=dtype).eval()
        if pipe.text_encoder is not None:
            pipe.text_encoder.to(device=device, dtype=dtype)
        pipe.vae.to(device=device, dtype=torch.bfloat16 if args.vae_dtype == "bf16" and device == "cuda" else torch.float32)
        pipe.vae.eval()
        pipe.set_progress_bar_config(disable=True)
        return pipe
    if args.tiny:
        transformer, vae = tiny_causal_transformer(), tiny_vae()
    else:
        with torch.device(device):
            transformer = CausalWanTransformer3DModel(
                num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096,
                freq_dim=256, in_channels=16, out_channels=16, num_frames_per_block=3,
            )
            vae = AutoencoderKLWan()  # the Wan2.1 VAE configuration (base_dim 96)
    transformer.to(device=device, dtype=dtype).eval()
    vae.to(device=device, dtype=torch.bfloat16 if args.vae_dtype == "bf16" and device == "cuda" else torch.float32)
    vae.eval()
    pipe = CausalWanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchLCMScheduler(shift=5.0),
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def stream_inputs(args, text) -> dict:
    """``--prompt``: the text encoded inside each stream (as generate.py and raven-demo), the model's own guidance;
    else the random ``prompt_embeds``, unguided (the prompt encoded beforehand)."""
    return {"prompt": args.prompt} if args.prompt else {"prompt_embeds": text, "guidance_scale": 1.0}


def run_once(pipe, text, args, device, output_type):
    """One streamed generation; per-chunk wall times measured at the moment each chunk's frames exist."""
    sync(device)
    tic = time.perf_counter()
    marks = []
    for chunk in pipe.stream(**stream_inputs(args, text), num_frames=args.num_frames, height=args.height, width=args.width,
                             generator=torch.Generator(device="cpu").manual_seed(0), output_type=output_type,
                             local_attn_size=args.local_attn_size, sink_size=args.sink_size):
        if output_type == "latent":  # latents may still be in flight; yielded frames are complete (StreamChunk)
            sync(device)
        marks.append(time.perf_counter() - tic)
    total = marks[-1]
    per_chunk = [marks[0]] + [b - a for a, b in zip(marks, marks[1:])]
    return total, per_chunk


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="tiny random model on CPU (checks the script only)")
    p.add_argument("--model", default=None,
                   help="a CausalWanPipeline folder (e.g. raven_video/world/weights/pipeline) instead of the random "
                        "Wan-size model; its native size unless --height/--width")
    p.add_argument("--prompt", default=None,
                   help="encode this prompt inside every stream, with the model's own guidance (as generate.py and "
                        "raven-demo do); default: random prompt_embeds, unguided (the prompt encoded beforehand)")
    p.add_argument("--num_frames", type=int, default=81)
    p.add_argument("--height", type=int, default=None, help="default: 480, or the --model's native height")
    p.add_argument("--width", type=int, default=None, help="default: 832, or the --model's native width")
    p.add_argument("--vae_dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mode", default="eager",
                   help="eager | realtime (pipe.enable_realtime()) | realtime-nooverlap | realtime-cudnn-attn "
                        "(diffusers' _native_cudnn for every attention) | realtime-selfattn-<cudnn|flash|fa3>")
    p.add_argument("--compile_mode", default=None, help="torch.compile mode for the realtime modes")
    p.add_argument("--vae_conv", default="conv3d", help="realtime modes: enable_realtime(vae_conv=...) (taps2d, ...)")
    p.add_argument("--no_vae_fuse", action="store_true", help="realtime modes: enable_realtime(vae_fuse=False)")
    p.add_argument("--no_cuda_graphs", action="store_true", help="realtime modes: enable_realtime(cuda_graphs=False)")
    p.add_argument("--devices", default=None,
                   help="realtime modes: enable_realtime(devices=(a, b)), e.g. cuda:0,cuda:1 (VAE on the second GPU)")
    p.add_argument("--preview_decoder", default=None,
                   help="realtime modes: 'random' (TAEHV architecture, random weights: same speed) or a taew2_1 "
                        ".safetensors file: enable_realtime(preview_decoder=...) instead of the Wan VAE")
    p.add_argument("--fp8", action="store_true", help="realtime modes: enable_realtime(fp8=True) (FP8 linear layers)")
    p.add_argument("--transformer_split", type=float, default=None,
                   help="with --devices: enable_realtime(transformer_split=...), the first GPU's share of the tokens")
    p.add_argument("--unsplit_forwards", type=int, default=None,
                   help="with --transformer_split: enable_realtime(unsplit_forwards=N), forwards per chunk run whole "
                        "on the first GPU while the second decodes (0: none, 1: the cache pass, 2 (the default): also "
                        "the next chunk's first step)")
    p.add_argument("--local_attn_size", type=int, default=None, help="KV window (latent frames) for long streams")
    p.add_argument("--sink_size", type=int, default=None, help="sink (latent frames) for long streams")
    args = p.parse_args()
    devices = tuple(args.devices.split(",")) if args.devices else None
    if args.mode == "eager" and (devices or args.fp8 or args.preview_decoder or args.transformer_split):
        p.error("--devices / --fp8 / --preview_decoder / --transformer_split need a realtime mode (they are "
                "enable_realtime options).")
    if args.unsplit_forwards is not None and args.transformer_split is None:
        p.error("--unsplit_forwards needs --transformer_split (it runs some of the split transformer's forwards "
                "whole).")
    if args.transformer_split is not None and not devices:
        p.error("--transformer_split needs --devices (e.g. --devices cuda:0,cuda:1).")
    if args.tiny and args.model:
        p.error("--tiny and --model exclude each other.")
    if args.model and not os.path.isfile(os.path.join(args.model, "model_index.json")):
        p.error(f"--model {args.model!r} is not a CausalWanPipeline folder (no model_index.json).")
    if args.tiny:
        args.num_frames, args.height, args.width, args.repeats = 33, 64, 96, 1
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    pipe = build_pipeline(args, device, dtype)
    if args.prompt and pipe.text_encoder is None:
        p.error("--prompt needs a pipeline with a text encoder (--model FOLDER); the random model has none.")
    args.height = args.height or (pipe.config.height if args.model else 480)
    args.width = args.width or (pipe.config.width if args.model else 832)
    text_dim = pipe.transformer.config.text_dim
    text = torch.randn(1, 512, text_dim, device=device, dtype=dtype)

    eager_latents = None
    if args.mode != "eager":
        # reference output of the eager path, for the equality check of the optimised path
        eager_latents = torch.cat([c.latents for c in pipe.stream(
            **stream_inputs(args, text), num_frames=args.num_frames, height=args.height, width=args.width,
            generator=torch.Generator(device="cpu").manual_seed(0), output_type="latent",
            local_attn_size=args.local_attn_size, sink_size=args.sink_size)], dim=2)
        kwargs = {"mode": args.compile_mode} if args.compile_mode else {}
        preview = args.preview_decoder
        if preview == "random":
            from raven_video.pipelines.preview_decoder import TAEHVDecoder

            preview = TAEHVDecoder()
        pipe.enable_realtime(
            overlap_decode=args.mode != "realtime-nooverlap",
            attention_backend="_native_cudnn" if args.mode == "realtime-cudnn-attn" else None,
            self_attention_kernel=args.mode.split("-")[-1] if args.mode.startswith("realtime-selfattn-") else None,
            vae_conv=args.vae_conv,
            vae_fuse=not args.no_vae_fuse,
            cuda_graphs=not args.no_cuda_graphs,
            devices=devices,
            fp8=args.fp8,
            preview_decoder=preview,
            transformer_split=args.transformer_split,
            unsplit_forwards=args.unsplit_forwards,
            **kwargs,
        )
    tic = time.perf_counter()
    run_once(pipe, text, args, device, "pt")  # warm-up (allocator, kernels, cuDNN autotune, compilation)
    warmup_s = time.perf_counter() - tic
    run_once(pipe, text, args, device, "pt")
    if device == "cuda":
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)
    runs = [run_once(pipe, text, args, device, "pt") for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r[0])
    dit_only = min(run_once(pipe, text, args, device, "latent")[0] for _ in range(args.repeats))
    # the largest per-GPU peak (with --devices the VAE's GPU counts too)
    peak = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30 \
        if device == "cuda" else None
    max_diff = mean_diff = None
    if eager_latents is not None:
        fast = torch.cat([c.latents for c in pipe.stream(
            **stream_inputs(args, text), num_frames=args.num_frames, height=args.height, width=args.width,
            generator=torch.Generator(device="cpu").manual_seed(0), output_type="latent",
            local_attn_size=args.local_attn_size, sink_size=args.sink_size)], dim=2)
        max_diff = (fast - eager_latents).abs().max().item()
        mean_diff = (fast - eager_latents).abs().mean().item()

    from raven_video.eval.speed import floor_seconds, stream_flops

    graphs = pipe._realtime_denoiser  # StreamingGraphs when CUDA graphs are on
    cfg = pipe.transformer.config
    sizes = pipe.transformer.chunk_sizes(pipe.latent_frames(args.num_frames))
    tpf = pipe.transformer.tokens_per_frame_for(args.height // 8, args.width // 8)
    flops = stream_flops(sizes, tpf, dim=cfg.num_attention_heads * cfg.attention_head_dim, ffn_dim=cfg.ffn_dim,
                         num_layers=cfg.num_layers, height=args.height, width=args.width)
    floor = floor_seconds(flops.dit_tflop + flops.vae_tflop)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    result = {
        "benchmark": "stream",
        "mode": args.mode,
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": commit or None,
        "model": args.model,
        "prompt_encoded_in_stream": bool(args.prompt),
        "num_frames": args.num_frames,
        "resolution": f"{args.height}x{args.width}",
        "vae_dtype": args.vae_dtype,
        "vae_conv": args.vae_conv,
        "vae_fuse": args.mode != "eager" and not args.no_vae_fuse,
        "cuda_graphs": args.mode != "eager" and not args.no_cuda_graphs,
        "compile_mode": args.compile_mode,
        "total_s": round(best[0], 4),
        "fps": round(args.num_frames / best[0], 2),
        "first_chunk_latency_s": round(best[1][0], 4),
        "per_chunk_ms": [round(1000 * t, 1) for t in best[1]],
        "devices": list(devices) if devices else None,
        "local_attn_size": args.local_attn_size,
        "sink_size": args.sink_size,
        # constant per-chunk cost on long streams: the later half's chunks against the earlier half's (after chunk 0)
        "per_chunk_ms_first_half_mean": round(1000 * sum(best[1][1:len(best[1]) // 2]) / max(1, len(best[1]) // 2 - 1), 1),
        "per_chunk_ms_second_half_mean": round(1000 * sum(best[1][len(best[1]) // 2:]) / max(1, len(best[1]) - len(best[1]) // 2), 1),
        "dit_only_s": round(dit_only, 4),
        "vae_and_overhead_s": round(best[0] - dit_only, 4),
        "all_runs_s": [round(r[0], 4) for r in runs],
        "peak_mem_gb": round(peak, 2) if peak is not None else None,
        "warmup_s": round(warmup_s, 2),
        "max_abs_diff_vs_eager_latents": max_diff,
        "mean_abs_diff_vs_eager_latents": mean_diff,
        "fp8": args.fp8,
        "transformer_split": args.transformer_split,
        "unsplit_forwards": (2 if args.unsplit_forwards is None else args.unsplit_forwards)
        if args.transformer_split is not None else None,
        "preview_decoder": args.preview_decoder,
        "cuda_graphs_captured": len(graphs.graphs) if graphs else None,
        "cuda_graphs_disabled_reason": graphs.disabled_reason if graphs else None,
        "flops": flops.as_dict(),
        "floor_s_at_800_tflops": round(floor, 4),
        "floor_ratio": round(floor / best[0], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
