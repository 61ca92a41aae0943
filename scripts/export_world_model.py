#!/usr/bin/env python
"""Assemble the shippable world model: one ``CausalWanPipeline`` folder with the trained student (fp16), the world VAE,
the frozen text encoder and tokenizer, the preview decoder, the held-out metrics and a model card, under a size budget.

    python scripts/export_world_model.py --student runs/world/cm_grpo/merged --vae runs/vae_dec_ft \\
        --preview_decoder runs/preview --metrics runs/world/eval/cm_grpo.json \\
        --output raven_video/world/weights/pipeline

The folder loads with ``CausalWanPipeline.from_pretrained`` (``raven_video.world.pretrained()`` when it is the shipped
one); the preview decoder sits in ``preview_decoder/`` for ``pipe.enable_realtime(preview_decoder=...)``. Every input is
checked before anything is written; the folder appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, REPO)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", required=True,
                   help="CausalWanPipeline folder of the final student (e.g. <recipe root>/cm_grpo/merged), or its "
                        "transformer folder")
    p.add_argument("--vae", default=None, help="AutoencoderKLWan folder (default: the student pipeline's VAE); its "
                   "metrics.json, if any, is copied along")
    p.add_argument("--preview_decoder", default=None, help="TAEHVDecoder folder (train_preview_decoder.py)")
    p.add_argument("--metrics", default=None, help="evaluate_world.py JSON of this student, copied as metrics.json")
    p.add_argument("--output", required=True, help="folder to write (replaced if it exists)")
    p.add_argument("--transformer_dtype", default="fp16", choices=("fp16", "bf16", "fp32"),
                   help="storage dtype of the student transformer (the pipeline runs it in the dtype it is given)")
    p.add_argument("--guidance_scale", type=float, default=1.0,
                   help="the folder's default sampling CFG (model_index.json; calls may override it; 1 = unguided)")
    p.add_argument("--max_mb", type=float, default=30.0, help="size budget of the whole folder, in MB (10^6 bytes)")
    args = p.parse_args(argv)
    student_transformer = os.path.join(args.student, "transformer")
    if os.path.isfile(os.path.join(student_transformer, "config.json")):
        args.transformer_dir = student_transformer
    elif os.path.isfile(os.path.join(args.student, "config.json")):
        args.transformer_dir = args.student
    else:
        p.error(f"--student {args.student!r} is neither a CausalWanPipeline folder nor a transformer folder "
                "(config.json expected); pass e.g. <recipe root>/cm_grpo/merged.")
    if args.vae is None:
        args.vae = os.path.join(args.student, "vae")
    if not os.path.isfile(os.path.join(args.vae, "config.json")):
        p.error(f"--vae {args.vae!r} is not an AutoencoderKLWan folder; pass the world VAE (e.g. "
                "raven_video/world/weights/pipeline/vae).")
    if args.preview_decoder is not None and not os.path.isfile(os.path.join(args.preview_decoder, "config.json")):
        p.error(f"--preview_decoder {args.preview_decoder!r} is not a TAEHVDecoder folder (train_preview_decoder.py).")
    if args.metrics is not None:
        try:
            with open(args.metrics, encoding="utf-8") as f:
                args.metrics_data = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            p.error(f"--metrics {args.metrics!r} cannot be read as JSON ({err}); pass evaluate_world.py's output.")
    if not (args.guidance_scale >= 1.0 and args.guidance_scale < float("inf")):
        p.error(f"--guidance_scale {args.guidance_scale} must be a finite number >= 1 (1 = unguided).")
    if args.max_mb <= 0:
        p.error(f"--max_mb {args.max_mb} must be positive.")
    return args


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def model_card(args, size_mb: float) -> str:
    lines = ["---", "library_name: diffusers", "license: apache-2.0", "tags: [text-to-video, raven, world]", "---", "",
             "# RAVEN world model", "",
             "A causal, 4-step, KV-cached text-to-video student trained by raven-video's own scripts on its procedural "
             "video world (64x64, 16 fps; `docs/world.md`): VAE -> teacher -> ODE init -> RAVEN -> CM-GRPO.", "",
             "```python", "from raven_video.world import pretrained",
             "video = pretrained()(\"a red circle moves right quickly, on a black background\").frames[0]", "```", "",
             f"Sampling: 4 steps per chunk of 3 latent frames, guidance {args.guidance_scale:g} by default "
             "(`guidance_scale=` overrides it; 1 = unguided, about 2x faster).", "",
             f"Folder size: {size_mb:.1f} MB. Student transformer stored in {args.transformer_dtype}; "
             "`preview_decoder/` is a TAEHV-architecture decoder for `pipe.enable_realtime(preview_decoder=...)`."]
    metrics = getattr(args, "metrics_data", None)
    if metrics:
        lines += ["", "## Held-out metrics (`metrics.json`, `scripts/evaluate_world.py`)", ""]
        for row, values in _metric_rows(metrics):
            shown = ", ".join(f"{k.removesuffix('_accuracy')} {values[k]:.3f}" for k in
                              ("count_accuracy", "colour_accuracy", "shape_accuracy", "direction_accuracy",
                               "persistence_accuracy", "world_score") if k in values)
            lines.append(f"- {row}: {shown}")
    return "\n".join(lines) + "\n"


def _metric_rows(metrics: dict):
    for name, values in metrics.items():
        if isinstance(values, dict) and "world_score" in values:
            yield name, values
        elif isinstance(values, dict):
            for sub, inner in values.items():
                if isinstance(inner, dict) and "world_score" in inner:
                    yield f"{name} {sub}", inner


def export(args) -> str:
    from diffusers import AutoencoderKLWan

    from raven_video.models.transformer_causal_wan import CausalWanTransformer3DModel
    from raven_video.pipelines.preview_decoder import TAEHVDecoder
    from raven_video.world.stack import world_pipeline

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.transformer_dtype]
    transformer = CausalWanTransformer3DModel.from_pretrained(args.transformer_dir).to(dtype)
    vae = AutoencoderKLWan.from_pretrained(args.vae)
    output = os.path.abspath(args.output)
    tmp = output + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        world_pipeline(vae, transformer, guidance_scale=args.guidance_scale).save_pretrained(tmp)
        vae_record = os.path.join(args.vae, "metrics.json")  # how the VAE was trained and what it scores
        if os.path.isfile(vae_record):
            shutil.copy(vae_record, os.path.join(tmp, "vae", "metrics.json"))
        if args.preview_decoder is not None:
            TAEHVDecoder.from_pretrained(args.preview_decoder).save_pretrained(os.path.join(tmp, "preview_decoder"))
        if getattr(args, "metrics_data", None) is not None:
            with open(os.path.join(tmp, "metrics.json"), "w", encoding="utf-8") as f:
                json.dump(args.metrics_data, f, indent=1, sort_keys=True)
        size_mb = folder_bytes(tmp) / 1e6
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(args, size_mb))
        size_mb = folder_bytes(tmp) / 1e6
        if size_mb > args.max_mb:
            raise SystemExit(f"error: the exported folder is {size_mb:.1f} MB, over --max_mb {args.max_mb}; store the "
                             "transformer in fp16 (--transformer_dtype fp16) or leave out the preview decoder.")
        shutil.rmtree(output, ignore_errors=True)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"output": output, "megabytes": round(size_mb, 2)}))
    return output


def main(argv=None) -> str:
    return export(parse_args(argv))


if __name__ == "__main__":
    main()
