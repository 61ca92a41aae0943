#!/usr/bin/env python
"""Distil a Wan VAE's decoder into a small TAEHV-architecture preview decoder (``enable_realtime(preview_decoder=...)``).

    accelerate launch train_preview_decoder.py @configs/world/preview.args --output_dir world/preview  # the world's
    accelerate launch train_preview_decoder.py --pretrained_vae Wan-AI/Wan2.1-T2V-1.3B-Diffusers --videos clips.csv \\
        --pretrained_preview taew2_1.safetensors --num_frames 17 --height 480 --width 832 --output_dir taew-ft

Objective (``raven_video.training.preview``): MSE + L1 between the preview's frames and the frozen VAE's decoding of
the same normalised latents (or the clips themselves, ``--target frames``). The architecture follows the VAE: its
spatial compression sets the stages that upsample (``space_strides``), its temporal compression the ``time_strides``;
``--widths`` sets the size (``taew2_1``: 256,128,64,64). The exported folder loads with
``TAEHVDecoder.from_pretrained`` or ``enable_realtime(preview_decoder=<folder>)``. Checkpoints resume exactly
(``--resume_from_checkpoint latest``); validation writes the held-out PSNR against the VAE's frames and against the
clips, and a PNG strip (rows: clip, VAE, preview) to ``output_dir/validation``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os

import torch
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from raven_video.cli.clip_data import add_clip_arguments, check_clip_args, clip_batches, training_clips, validation_clips
from raven_video.cli.training import (
    TimeBudget,
    add_optimizer_arguments,
    add_run_arguments,
    argument_parser,
    check_run_args,
    create_hub_repo,
    end_of_step,
    hub_base_model,
    init_trackers,
    load_vae,
    make_accelerator,
    make_optimizer,
    push_folder,
    register_and_resume,
    resolve_resume,
    run_cli,
    usage_errors,
    write_model_card,
)
from raven_video.pipelines.preview_decoder import TAEHVDecoder
from raven_video.training.preview import PREVIEW_TARGETS, PreviewDistillation, distillation_batch
from raven_video.training.raven_step import optimizer_step
from raven_video.training.vae import psnr
from raven_video.utils.video_io import frame_strip
from raven_video.world.data import tensor_to_frames

logger = logging.getLogger("train_preview_decoder")


# ----------------------------------------------------------------------------------------------------- arguments
def parse_args(input_args=None):
    p = argument_parser("Distil a Wan VAE's decoder into a TAEHV-architecture preview decoder.")
    p.add_argument("--pretrained_vae", type=str, default=None,
                   help="AutoencoderKLWan folder / Hub id (a pipeline's vae subfolder is tried): the decoder to distil.")
    p.add_argument("--pretrained_preview", type=str, default=None,
                   help="Start from these preview weights: a TAEHVDecoder folder, or taew2_1.safetensors (Wan2.1).")
    p.add_argument("--widths", type=str, default="256,128,64,64",
                   help="Channels of the three stages and the last conv (taew2_1: 256,128,64,64).")
    p.add_argument("--target", type=str, default="vae", choices=PREVIEW_TARGETS,
                   help="vae: the VAE's decoding of the latents (distillation); frames: the clips themselves.")
    add_clip_arguments(p, num_frames=17)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=100)
    p.add_argument("--lr_scheduler", type=str, default="constant_with_warmup",
                   choices=("constant_with_warmup", "linear", "cosine"),
                   help="linear / cosine decay to 0 at --max_train_steps (a resumed run follows the new schedule from "
                        "its step)")
    add_optimizer_arguments(p, adam_epsilon=1e-8)
    p.set_defaults(adam_beta1=0.9, max_grad_norm=1.0)
    p.add_argument("--max_train_steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_validation_clips", type=int, default=8, help="Held-out clips for the PSNR.")
    p.add_argument("--validation_num_frames", type=int, default=33)
    add_run_arguments(p, output_dir="preview-output", checkpointing_steps=500)
    return p.parse_args(input_args)


def _ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) < 1:
        raise ValueError(f"--{flag} {text!r}: give 4 comma-separated positive integers, e.g. 256,128,64,64.")
    return values


def strides_for(ratio: int, kind: str) -> list[int]:
    """Three per-stage strides whose product is the VAE's compression ``ratio`` (1, 2, 4 or 8; the last stages grow)."""
    if ratio not in (1, 2, 4, 8):
        raise ValueError(f"the VAE's {kind} compression is {ratio}; a TAEHV preview decoder covers 1, 2, 4 or 8.")
    doublings = int(math.log2(ratio))
    return [1] * (3 - doublings) + [2] * doublings


def build_preview(args, vae) -> TAEHVDecoder:
    spatial = strides_for(vae.config.scale_factor_spatial, "spatial")
    temporal = strides_for(vae.config.scale_factor_temporal, "temporal")
    if args.pretrained_preview:
        preview = TAEHVDecoder.from_file(args.pretrained_preview)
        if (list(preview.config.space_strides), list(preview.config.time_strides)) != (spatial, temporal):
            raise ValueError(f"--pretrained_preview {args.pretrained_preview!r} upsamples by "
                             f"{preview.spatial_compression_ratio}x / {preview.temporal_compression_ratio}x, the VAE "
                             f"compresses by {math.prod(spatial)}x / {math.prod(temporal)}x; pick a matching one.")
        return preview
    with torch.random.fork_rng():  # a --seed-determined initialisation, before the Accelerator exists
        torch.manual_seed(args.seed)
        return TAEHVDecoder(latent_channels=vae.config.z_dim, widths=_ints("widths", args.widths),
                            time_strides=temporal, space_strides=spatial)


def validate_args(args) -> None:
    check_run_args(args)
    if not args.pretrained_vae:
        raise ValueError("--pretrained_vae is required: the AutoencoderKLWan whose decoder the preview distils.")
    _ints("widths", args.widths)
    if args.num_validation_clips < 1 or not args.learning_rate > 0:
        raise ValueError(f"--num_validation_clips {args.num_validation_clips} must be >= 1 and --learning_rate "
                         f"{args.learning_rate} > 0.")
    if args.pretrained_preview and not os.path.exists(args.pretrained_preview):
        raise FileNotFoundError(f"--pretrained_preview {args.pretrained_preview!r} does not exist.")


# ----------------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def held_out_set(vae, clips: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The held-out clips, their latents (one clip each) and the VAE's frames: the frozen VAE's part of every
    validation, computed once."""
    pairs = [distillation_batch(vae, clip[None], "vae") for clip in clips]
    return clips.cpu(), [latents for latents, _ in pairs], torch.cat([decoded.cpu() for _, decoded in pairs])


@torch.no_grad()
def validate(preview, held_out, folder: str, step: int) -> dict:
    """Held-out PSNR of the preview against the VAE's frames and against the clips; a PNG strip of the first clip."""
    clips, latents, vaes = held_out
    preview.eval()
    outs = torch.cat([preview.decode(z).float().cpu() for z in latents])
    preview.train()
    os.makedirs(folder, exist_ok=True)
    frame_strip(tensor_to_frames(torch.stack([clips[0], vaes[0], outs[0]])), os.path.join(folder, f"step-{step}.png"))
    return {"psnr_vs_vae": psnr(outs, vaes), "psnr_vs_frames": psnr(outs, clips), "vae_psnr": psnr(vaes, clips)}


def model_card_text(args, steps: int, metrics: dict) -> str:
    return (f"# TAEHV preview decoder for `{args.pretrained_vae}`\n\n"
            f"Distilled from the VAE's decoder ({args.target} targets) in {steps} steps on "
            f"{'the procedural world of raven-video' if args.videos is None else 'video clips'} at "
            f"{args.height}x{args.width}. Held-out PSNR against the VAE's frames {metrics['psnr_vs_vae']:.2f} dB, "
            f"against the clips {metrics['psnr_vs_frames']:.2f} dB (the VAE itself: {metrics['vae_psnr']:.2f} dB). "
            "Use: `pipe.enable_realtime(preview_decoder=<this folder>)`.\n")


# ----------------------------------------------------------------------------------------------------- main
def main(input_args=None):
    args = parse_args(input_args) if not isinstance(input_args, argparse.Namespace) else input_args
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with usage_errors():
        validate_args(args)
        vae = load_vae(args.pretrained_vae)
        check_clip_args(args, vae.config.scale_factor_temporal, vae.config.scale_factor_spatial,
                        ("num_frames", "validation_num_frames"))
        preview = build_preview(args, vae)

    accelerator = make_accelerator(args)
    set_seed(args.seed)
    resume_path = resolve_resume(args)
    vae.requires_grad_(False).eval().to(accelerator.device)
    preview.train()
    optimizer = make_optimizer(args, preview.parameters(), args.learning_rate)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    objective, optimizer, lr_scheduler = accelerator.prepare(PreviewDistillation(preview), optimizer, lr_scheduler)
    progress = register_and_resume(accelerator, (), resume_path)
    global_step = first_step = progress.global_step
    init_trackers(accelerator, args, "preview")
    model = accelerator.unwrap_model(objective).preview
    logger.info("preview decoder: %.2fM parameters, %dx spatial / %dx temporal, %s targets",
                sum(p.numel() for p in model.parameters()) / 1e6, model.spatial_compression_ratio,
                model.temporal_compression_ratio, args.target)
    held_out = (held_out_set(vae, validation_clips(args, args.num_validation_clips, args.validation_num_frames))
                if accelerator.is_main_process else None)

    data = clip_batches(training_clips(args, accelerator.num_processes), args, accelerator, global_step)
    budget = TimeBudget(accelerator, args.max_train_time)
    bar = tqdm(range(args.max_train_steps), initial=global_step, desc="preview",
               disable=not accelerator.is_local_main_process)
    logs = {}
    stop = False
    while global_step < args.max_train_steps and not stop:
        latents, target = distillation_batch(vae, next(data), args.target)
        with accelerator.autocast():
            loss, logs = objective(latents, target)
        accelerator.backward(loss)
        grad_norm, _ = optimizer_step(objective.parameters(), optimizer, args.max_grad_norm, accelerator.clip_grad_norm_)
        lr_scheduler.step()
        global_step += 1
        progress.global_step = global_step
        logs.update(grad_norm=float(grad_norm), lr=lr_scheduler.get_last_lr()[0], first_step=first_step)
        if not math.isfinite(logs["loss"]):
            raise RuntimeError(f"step {global_step}: the distillation loss is {logs['loss']}; lower --learning_rate.")
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4g}")
        if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
            metrics = validate(model, held_out, os.path.join(args.output_dir, "validation"), global_step)
            logs.update({f"val_{k}": v for k, v in metrics.items()})
            logger.info("step %d: held-out PSNR %.2f dB vs the VAE, %.2f dB vs the clips", global_step,
                        metrics["psnr_vs_vae"], metrics["psnr_vs_frames"])
        accelerator.log(logs, step=global_step)
        stop = end_of_step(accelerator, args, budget, global_step)
    bar.close()

    # --- export: the preview decoder (diffusers folder), its held-out PSNRs, a model card
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metrics = validate(model, held_out, os.path.join(args.output_dir, "validation"), global_step)
        metrics.update(steps=global_step, parameters=sum(p.numel() for p in model.parameters()))
        model.to("cpu").save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as handle:
            json.dump(metrics, handle, indent=2)
        logger.info("exported %s: held-out PSNR %.2f dB vs the VAE", args.output_dir, metrics["psnr_vs_vae"])
        repo_id = create_hub_repo(args.hub_model_id, args.hub_token) if args.push_to_hub else None
        write_model_card(args.output_dir, model_card_text(args, global_step, metrics),
                         ["video", "preview-decoder", "taehv", "raven"],
                         base_model=hub_base_model(args.pretrained_vae), repo_id=repo_id, token=args.hub_token)
        if repo_id is not None:
            push_folder(args.output_dir, repo_id, args.hub_token,
                        ignore_patterns=["checkpoint-*", "logs/*", "validation/*", "*.tmp"])
    accelerator.end_training()
    return logs


if __name__ == "__main__":
    run_cli(main)
