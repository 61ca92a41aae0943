"""Text -> mp4 with ``CausalWanPipeline`` (the user's main entry point; ``python generate.py --help``).

Every input is validated before the model loads; every mp4 is written to a temporary file and renamed only when the
video is complete, so a failed or interrupted generation leaves no partial file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time

logger = logging.getLogger("raven_video.generate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Generate videos with a causal, KV-cached Wan2.1 student (RAVEN). Without --model a tiny RANDOM "
        "pipeline is built: its output is noise (it only shows the code path runs).",
    )
    p.add_argument("prompts", nargs="*", help="One or more prompts (each gives one video per seed).")
    p.add_argument("--prompt_file", default=None, help="Text file with one prompt per line (blank lines skipped).")
    p.add_argument("--model", default=None,
                   help="CausalWanPipeline folder or Hub id. Default: a tiny random pipeline (noise output).")
    p.add_argument("--output_dir", default="outputs", help="Where the mp4 files go (created if needed).")
    p.add_argument("--num_frames", type=int, default=81, help="Pixel frames, 4k+1 (81 = 5 s at 16 fps).")
    p.add_argument("--height", type=int, default=480, help="Multiple of 16.")
    p.add_argument("--width", type=int, default=832, help="Multiple of 16.")
    p.add_argument("--seed", type=int, default=0, help="Base seed; prompt i uses seed + i.")
    p.add_argument("--guidance_scale", type=float, default=1.0, help="Student CFG (1 = unguided, the released setting).")
    p.add_argument("--negative_prompt", default=None, help="Used only when --guidance_scale > 1.")
    p.add_argument("--stream", action="store_true",
                   help="Write frames as each chunk arrives and print per-chunk timing.")
    p.add_argument("--local_attn_size", type=int, default=None,
                   help="Attention window in latent frames incl. sink (-1 unlimited) for long streams.")
    p.add_argument("--sink_size", type=int, default=None, help="Attention-sink latent frames for long streams.")
    p.add_argument("--fps", type=int, default=None, help="Output frame rate (default: the pipeline's, 16).")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="Transformer/text-encoder dtype (auto: bf16 on CUDA, fp32 on CPU; the VAE stays fp32).")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available).")
    p.add_argument("--eager", action="store_true",
                   help="With --stream on CUDA, skip the real-time path (pipe.enable_realtime(): regional "
                        "torch.compile, CUDA graphs per chunk position, a fused VAE decoder overlapped on a second "
                        "stream). The first two videos then pay no compilation / graph-capture time.")
    p.add_argument("--revision", default=None, help="Hub revision for --model.")
    return p.parse_args(argv)


def read_prompts(args) -> list[str]:
    prompts = [p for p in args.prompts]
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise SystemExit(f"error: --prompt_file {args.prompt_file!r} does not exist; pass a text file with one "
                             "prompt per line.")
        with open(args.prompt_file, encoding="utf-8") as f:
            from_file = [line.strip() for line in f if line.strip()]
        if not from_file:
            raise SystemExit(f"error: --prompt_file {args.prompt_file!r} holds no prompt (only blank lines); "
                             "write one prompt per line.")
        prompts += from_file
    if not prompts:
        raise SystemExit("error: no prompt given; pass prompts as arguments or --prompt_file FILE.")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise SystemExit(f"error: prompt #{i} is empty; every prompt must contain text.")
    return prompts


def check_args(args) -> None:
    """Cheap checks that need no model (the pipeline re-checks the chunking after loading, before generating)."""
    if args.num_frames < 1 or (args.num_frames - 1) % 4:
        k = max((args.num_frames - 1) // 4, 0)
        raise SystemExit(f"error: --num_frames {args.num_frames} is not 4k+1; use {4 * k + 1} or {4 * k + 5}.")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value <= 0 or value % 16:
            raise SystemExit(f"error: --{name} {value} must be a positive multiple of 16, e.g. "
                             f"{max(16, round(value / 16) * 16)}.")
    if args.model is not None and os.path.sep in args.model and not os.path.isdir(args.model):
        raise SystemExit(f"error: --model {args.model!r} is not a folder; pass a CausalWanPipeline folder or a Hub id "
                         "like 'org/name'.")
    if args.model is not None and os.path.isdir(args.model):
        config_path = os.path.join(args.model, "transformer", "config.json")
        if not os.path.isfile(os.path.join(args.model, "model_index.json")) or not os.path.isfile(config_path):
            raise SystemExit(f"error: --model {args.model!r} is not a CausalWanPipeline folder (model_index.json and "
                             "transformer/config.json expected); convert a checkpoint with `raven-convert` first.")
        with open(config_path) as f:
            config = json.load(f)
        from ..models.attention_layout import chunk_sizes

        try:
            chunk_sizes((args.num_frames - 1) // 4 + 1, config.get("num_frames_per_block", 3),
                        config.get("num_frames_first_block"))
        except ValueError as err:
            raise SystemExit(f"error: --num_frames {args.num_frames}: {err}") from None
    os.makedirs(args.output_dir, exist_ok=True)
    if not os.access(args.output_dir, os.W_OK):
        raise SystemExit(f"error: --output_dir {args.output_dir!r} is not writable.")


def load_pipeline(args):
    import torch

    from ..pipelines.pipeline_causal_wan import CausalWanPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if args.model is None:
        from ..testing import tiny_pipeline

        logger.warning("No --model given: using a tiny RANDOM pipeline. Its videos are noise; pass --model for real "
                       "output.")
        pipe = tiny_pipeline(seed=0)
    else:
        try:
            pipe = CausalWanPipeline.from_pretrained(args.model, revision=args.revision, torch_dtype=dtype)
        except (OSError, ValueError, EnvironmentError) as err:
            raise SystemExit(f"error: could not load --model {args.model!r}: {err}") from None
        pipe.vae.to(torch.float32)
    for component in (pipe.transformer, pipe.text_encoder):
        if component.dtype != dtype:
            component.to(dtype)
    return pipe.to(device)


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "video"


def main(argv=None) -> list[str]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    prompts = read_prompts(args)
    check_args(args)

    import torch

    from ..utils.video_io import AtomicVideoWriter

    pipe = load_pipeline(args)
    if args.stream and not args.eager and pipe.device.type == "cuda":
        logger.info("Real-time path on: the first video includes torch.compile time and the second CUDA-graph "
                    "capture (warm-up); use --eager to skip.")
        pipe.enable_realtime()
    fps = args.fps or pipe.config.fps
    window = dict(local_attn_size=args.local_attn_size, sink_size=args.sink_size)
    # Validate against the loaded model before generating anything.
    pipe.check_inputs(prompts[0], args.negative_prompt, args.num_frames, args.height, args.width, None,
                      args.guidance_scale, args.local_attn_size, args.sink_size)
    written = []
    for i, prompt in enumerate(prompts):
        path = os.path.join(args.output_dir, f"{i:03d}_{slug(prompt)}.mp4")
        generator = torch.Generator(device="cpu").manual_seed(args.seed + i)
        common = dict(prompt=prompt, negative_prompt=args.negative_prompt, num_frames=args.num_frames,
                      height=args.height, width=args.width, guidance_scale=args.guidance_scale, generator=generator,
                      **window)
        tic = time.perf_counter()
        with AtomicVideoWriter(path, fps=fps) as writer:
            if args.stream:
                frames_done = 0
                for chunk in pipe.stream(**common, output_type="np"):
                    writer.append(chunk.frames[0])
                    n = chunk.frames.shape[1]
                    frames_done += n
                    logger.info(f"  chunk {chunk.index}: {n} frames in {chunk.seconds * 1000:.0f} ms "
                                f"({n / chunk.seconds:.1f} FPS); first frame at {time.perf_counter() - tic:.2f} s"
                                if chunk.index == 0 else
                                f"  chunk {chunk.index}: {n} frames in {chunk.seconds * 1000:.0f} ms "
                                f"({n / chunk.seconds:.1f} FPS)")
            else:
                video = pipe(**common, output_type="np").frames[0]
                writer.append(video)
                frames_done = video.shape[0]
        seconds = time.perf_counter() - tic
        logger.info(f"[{i + 1}/{len(prompts)}] {path}: {frames_done} frames in {seconds:.2f} s "
                    f"({frames_done / seconds:.1f} FPS end to end)")
        written.append(path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
