#!/usr/bin/env python
"""Score world models against the ground truth on held-out prompt combinations (``docs/world.md``).

    python scripts/evaluate_world.py --model runs/world/final --teacher runs/world/teacher --references \\
        --num_prompts 64 --output runs/world/eval.json
    python scripts/evaluate_world.py --model raven_video/world/pretrained --lengths 1,2,4   # the shipped model

Writes one JSON (``{"reference": ..., "reconstruction": ..., "teacher": ..., "student": {"1x": ..., "2x": ...}}``,
every entry the mean world scores of :mod:`raven_video.world.evaluate`) and a PNG frame strip per row beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from raven_video.pipelines.pipeline_causal_wan import CausalWanPipeline
from raven_video.utils.atomic import atomic_write_text
from raven_video.world import evaluate as ev


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                fromfile_prefix_chars="@")  # configs/world/evaluate.args, as the recipe passes it
    p.add_argument("--model", default=None, help="CausalWanPipeline folder of a causal few-step student")
    p.add_argument("--teacher", default=None, help="CausalWanPipeline folder of a bidirectional teacher")
    p.add_argument("--references", action="store_true", help="also score the rendered clips and their VAE "
                   "reconstructions (the VAE of --model or --teacher)")
    p.add_argument("--preview_decoder", default=None,
                   help="with --references: also score the clips decoded by this TAEHVDecoder folder from the VAE's "
                        "latents (train_preview_decoder.py), the ceiling of a stream shown through it")
    p.add_argument("--num_prompts", type=int, default=64)
    p.add_argument("--split", default="heldout", choices=("heldout", "train"),
                   help="heldout: prompt combinations never trained on (evaluation seeds either way)")
    p.add_argument("--lengths", default="1,2,4", help="multiples of the 81-frame training length for --model")
    p.add_argument("--local_attn_size", type=int, default=21, help="latent frames of the window beyond 1x")
    p.add_argument("--sink_size", type=int, default=3, help="latent frames of the sink beyond 1x")
    p.add_argument("--student_guidance", type=float, default=None,
                   help="CFG of --model against the empty prompt (1: none, one branch; default: the model's own, its "
                        "model_index.json guidance_scale)")
    p.add_argument("--teacher_steps", type=int, default=48)
    p.add_argument("--teacher_guidance", type=float, default=3.0)
    p.add_argument("--teacher_shift", type=float, default=None,
                   help="timestep shift of the teacher's Euler grid (default: the shift it was trained with, Wan's 5)")
    p.add_argument("--word_swaps", action="store_true",
                   help="also report how much the teacher reads each kind of word (evaluate.word_swap_gaps: loss gap "
                        "when the prompt's shapes / colours / directions / background are swapped; ~0 = ignored)")
    p.add_argument("--encoder", default=None, help="clip-encoder folder for the Fréchet distance (save_encoder); "
                   "default: the one shipped with the world model, if any")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--workers", type=int, default=None, help="processes scoring videos (default: up to 16)")
    p.add_argument("--output", required=True, help="JSON file to write (PNG strips go beside it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp8", action="store_true",
                   help="FP8 linear layers in --model's transformer blocks (raven_video/models/fp8.py; the same "
                        "conversion as enable_realtime(fp8=True)): the world metrics with and without FP8")
    args = p.parse_args(argv)
    if not (args.model or args.teacher or args.references):
        p.error("nothing to evaluate: pass --model, --teacher and/or --references.")
    if args.references and not (args.model or args.teacher):
        p.error("--references needs the VAE of --model or --teacher.")
    if args.preview_decoder is not None and not (args.references and os.path.isdir(args.preview_decoder)):
        p.error(f"--preview_decoder {args.preview_decoder!r} must be a TAEHVDecoder folder, used with --references.")
    try:
        args.lengths = [int(v) for v in args.lengths.split(",") if v.strip()]
    except ValueError:
        p.error(f"--lengths {args.lengths!r}: give comma-separated integers, e.g. 1,2,4.")
    if args.student_guidance is not None and not args.student_guidance >= 1.0:
        p.error(f"--student_guidance {args.student_guidance} must be >= 1 (1 = no guidance).")
    if not args.lengths or min(args.lengths) < 1 or args.num_prompts < 2:
        p.error(f"--lengths {args.lengths} must be >= 1 and --num_prompts {args.num_prompts} >= 2.")
    if args.fp8:
        from raven_video.models.fp8 import fp8_supported

        ok, reason = fp8_supported(args.device) if args.model else (False, "it converts --model, and none is given")
        if not ok:
            p.error(f"--fp8 cannot run here: {reason}.")
    for name in ("model", "teacher", "encoder"):
        path = getattr(args, name)
        if path is not None and not os.path.isdir(path):
            p.error(f"--{name} {path!r} is not a folder.")
    return args


def load(path, device):
    pipe = CausalWanPipeline.from_pretrained(path).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None):
    args = parse_args(argv)
    from raven_video.world.features import load_encoder
    from raven_video.world.shipped import default_encoder_dir

    encoder_dir = args.encoder or default_encoder_dir()
    encoder = load_encoder(encoder_dir) if encoder_dir else None
    evalset = ev.heldout_set(args.num_prompts, split=args.split)
    reference = ev.reference_videos(evalset)
    stem = os.path.splitext(args.output)[0]
    report, timings = {"num_prompts": args.num_prompts, "split": args.split}, {}

    def record(name, videos, key=None):
        report[name] = ev.score(videos, evalset, encoder, reference, args.workers, strip=f"{stem}-{key or name}.png")
        print(f"{key or name}: world_score {report[name]['world_score']:.3f}", file=sys.stderr)
        return report[name]

    student = load(args.model, args.device) if args.model else None
    if student is not None and args.fp8:
        from raven_video.models.fp8 import enable_fp8

        report["student_fp8"] = enable_fp8(student.transformer)  # checked above: True here
        print("student: FP8 linear layers in the transformer blocks", file=sys.stderr)
    teacher = load(args.teacher, args.device) if args.teacher else None
    if args.references:
        record("reference", reference)
        vae = (student or teacher).vae
        record("reconstruction", ev.reconstructed_videos(vae, reference))
        if args.preview_decoder:
            from raven_video.pipelines.preview_decoder import TAEHVDecoder

            preview = TAEHVDecoder.from_pretrained(args.preview_decoder).to(vae.device).eval()
            record("preview_reconstruction", ev.reconstructed_videos(vae, reference, preview=preview))
    if teacher is not None:
        tic = time.perf_counter()
        record("teacher", ev.teacher_videos(teacher, evalset, args.teacher_steps, args.teacher_guidance,
                                            shift=args.teacher_shift, batch_size=args.batch_size))
        timings["teacher_seconds"] = time.perf_counter() - tic
        if args.word_swaps:
            report["teacher_word_swap_gaps"] = ev.word_swap_gaps(teacher, evalset, batch_size=args.batch_size)
            print("teacher word-swap loss gaps: " + ", ".join(
                f"{k} {report['teacher_word_swap_gaps'][k]:+.4f}" for k in (*ev.WORD_KINDS, "empty")), file=sys.stderr)
    if student is not None:
        guidance = student.default_guidance_scale if args.student_guidance is None else args.student_guidance
        report["student"], report["student_guidance"] = {}, guidance
        for length in args.lengths:
            tic = time.perf_counter()
            long = length > 1
            videos = ev.student_videos(student, evalset, num_frames=ev.frames_for_length(length),
                                       batch_size=args.batch_size,
                                       local_attn_size=args.local_attn_size if long else None,
                                       sink_size=args.sink_size if long else None,
                                       guidance_scale=guidance)
            timings[f"student_{length}x_seconds"] = time.perf_counter() - tic
            report["student"][f"{length}x"] = ev.score(videos, evalset, encoder, reference, args.workers,
                                                       strip=f"{stem}-student-{length}x.png")
            print(f"student {length}x: world_score {report['student'][f'{length}x']['world_score']:.3f}",
                  file=sys.stderr)
    report["seconds"] = timings
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    # atomic: the world grid treats an existing JSON as a finished evaluation and reads it at once
    atomic_write_text(args.output, json.dumps(report, indent=1, sort_keys=True))
    return report


if __name__ == "__main__":
    main()
