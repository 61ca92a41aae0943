#!/usr/bin/env python
"""Train (or fine-tune) a Wan video VAE, ``AutoencoderKLWan``, on world clips or a folder of videos.

    accelerate launch train_vae.py @configs/world/vae.args --output_dir world/vae          # the world's small VAE
    accelerate launch train_vae.py --pretrained_vae Wan-AI/Wan2.1-T2V-1.3B-Diffusers --videos clips.csv \\
        --num_frames 17 --height 480 --width 832 --learning_rate 1e-5 --output_dir vae-ft     # fine-tune Wan's

Objective: L1 + MSE reconstruction + a small KL (``raven_video.training.vae``). The exported folder is a diffusers
``AutoencoderKLWan`` whose config carries the per-channel latent statistics measured at the end, so the pipeline's
normalised latents have unit scale. Checkpoints resume exactly (``--resume_from_checkpoint latest``); validation
writes the held-out PSNR and a strip of original / reconstructed frames (PNG) to ``output_dir/validation``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os

import torch
from accelerate.utils import set_seed
from diffusers import AutoencoderKLWan
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from raven_video.cli.clip_data import (
    add_clip_arguments,
    check_clip_args,
    clip_batches,
    training_clips,
    validation_clips,
)
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
from raven_video.training.raven_step import optimizer_step
from raven_video.training.vae import (
    VAE_INITS,
    NormWarmup,
    VAEObjective,
    kaiming_init,
    latent_statistics,
    psnr,
    reconstruct,
)
from raven_video.utils.video_io import frame_strip
from raven_video.world.data import WorldClipDataset, tensor_to_frames

logger = logging.getLogger("train_vae")


# ----------------------------------------------------------------------------------------------------- arguments
def parse_args(input_args=None):
    p = argument_parser("Train or fine-tune a Wan video VAE (AutoencoderKLWan).")
    # model
    p.add_argument("--pretrained_vae", type=str, default=None,
                   help="AutoencoderKLWan folder / Hub id (a pipeline's vae subfolder is tried) to fine-tune; None: a "
                        "new VAE with the architecture flags below.")
    p.add_argument("--train_decoder_only", action="store_true",
                   help="Fine-tune only the decoder (and post_quant_conv) of --pretrained_vae: the encoder and the "
                        "latent statistics stay as they are, so models trained on its latents stay valid.")
    p.add_argument("--base_dim", type=int, default=16)
    p.add_argument("--z_dim", type=int, default=16)
    p.add_argument("--dim_mult", type=str, default="1,2,4", help="Channel multipliers; spatial stride 2^(len-1).")
    p.add_argument("--num_res_blocks", type=int, default=1)
    p.add_argument("--temporal_downsample", type=str, default="true,true",
                   help="Per down stage (len(dim_mult)-1 values); temporal stride 2^(#true).")
    add_clip_arguments(p)  # data: --videos or the world, clip size, batch size, workers
    # objective and optimisation
    p.add_argument("--kl_weight", type=float, default=1e-5, help="KL weight per latent element.")
    p.add_argument("--init", type=str, default="default", choices=VAE_INITS,
                   help="Initialisation of a new VAE: PyTorch's default or Kaiming-normal convs with zero biases.")
    p.add_argument("--norm_warmup_steps", type=int, default=0,
                   help="Blend the RMS norms in from the identity over this many steps (0: off); see NormWarmup.")
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=200)
    add_optimizer_arguments(p, adam_epsilon=1e-8)
    p.set_defaults(adam_beta1=0.9, max_grad_norm=1.0)
    p.add_argument("--max_train_steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    # validation and export
    p.add_argument("--num_validation_clips", type=int, default=8, help="Held-out clips for the PSNR.")
    p.add_argument("--validation_num_frames", type=int, default=33)
    p.add_argument("--stats_clips", type=int, default=64, help="Clips for the exported latent statistics.")
    add_run_arguments(p, output_dir="vae-output", checkpointing_steps=500)
    return p.parse_args(input_args)


def _bools(text: str) -> list[bool]:
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    if any(v not in ("true", "false") for v in values):
        raise ValueError(f"--temporal_downsample {text!r}: give comma-separated true/false values, e.g. true,true.")
    return [v == "true" for v in values]


def vae_config(args) -> dict:
    """The architecture of a new VAE, with its strides (checked against the clip size)."""
    dim_mult = [int(v) for v in args.dim_mult.split(",") if v.strip()]
    temporal = _bools(args.temporal_downsample)
    if len(dim_mult) < 2 or len(temporal) != len(dim_mult) - 1:
        raise ValueError(f"--dim_mult {args.dim_mult} needs >= 2 entries and --temporal_downsample exactly "
                         f"{len(dim_mult) - 1} (one per down stage), got {args.temporal_downsample!r}.")
    return dict(base_dim=args.base_dim, z_dim=args.z_dim, dim_mult=dim_mult, num_res_blocks=args.num_res_blocks,
                attn_scales=[], temperal_downsample=temporal, scale_factor_spatial=2 ** (len(dim_mult) - 1),
                scale_factor_temporal=2 ** sum(temporal))


def validate_args(args) -> dict:
    """Cheap checks; returns the architecture of a new VAE (``{}`` when fine-tuning)."""
    check_run_args(args)
    for name in ("num_validation_clips", "stats_clips", "base_dim", "z_dim", "num_res_blocks"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)} must be >= 1.")
    if not args.learning_rate > 0 or args.kl_weight < 0:
        raise ValueError(f"--learning_rate {args.learning_rate} must be > 0 and --kl_weight {args.kl_weight} >= 0.")
    if args.norm_warmup_steps < 0 or args.norm_warmup_steps >= args.max_train_steps:
        raise ValueError(f"--norm_warmup_steps {args.norm_warmup_steps} must be in [0, --max_train_steps "
                         f"{args.max_train_steps}): the exported VAE has the full norms.")
    if args.train_decoder_only and not args.pretrained_vae:
        raise ValueError("--train_decoder_only fine-tunes the decoder of a trained VAE: pass --pretrained_vae.")
    if args.pretrained_vae and args.init != "default":
        raise ValueError(f"--init {args.init} initialises a new VAE; drop it when fine-tuning --pretrained_vae.")
    config = {} if args.pretrained_vae else vae_config(args)
    check_clip_args(args, config.get("scale_factor_temporal", 4), config.get("scale_factor_spatial", 8),
                    ("num_frames", "validation_num_frames"))
    return config


# ----------------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(vae, clips: torch.Tensor, folder: str, step: int) -> float:
    """Held-out PSNR of the deterministic reconstruction; writes a PNG strip (rows: original, reconstruction)."""
    vae.eval()
    outs = torch.cat([reconstruct(vae, clip[None]).cpu() for clip in clips])
    vae.train()
    value = psnr(outs, clips)
    os.makedirs(folder, exist_ok=True)
    frame_strip(tensor_to_frames(torch.stack([clips[0], outs[0]])), os.path.join(folder, f"step-{step}.png"))
    return value


def model_card_text(args, steps: int, metrics: dict) -> str:
    return (f"# Wan video VAE ({'fine-tuned' if args.pretrained_vae else 'trained from scratch'})\n\n"
            f"`AutoencoderKLWan` after {steps} steps of L1 + MSE + KL ({args.kl_weight}) on "
            f"{'the procedural world of raven-video' if args.videos is None else 'video clips'} at "
            f"{args.height}x{args.width}, {args.num_frames}-frame clips. Held-out PSNR: {metrics['psnr']:.2f} dB. "
            "The config's `latents_mean` / `latents_std` were measured on the training data.\n")


# ----------------------------------------------------------------------------------------------------- main
def main(input_args=None):
    args = parse_args(input_args) if not isinstance(input_args, argparse.Namespace) else input_args
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with usage_errors():
        architecture = validate_args(args)

    accelerator = make_accelerator(args)
    set_seed(args.seed)
    resume_path = resolve_resume(args)
    if args.pretrained_vae:
        vae = load_vae(args.pretrained_vae)
    else:
        vae = AutoencoderKLWan(**architecture)
        if args.init == "kaiming":
            kaiming_init(vae)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae.train()
    if args.train_decoder_only:  # the latent space is frozen: encoder + quant_conv
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    optimizer = make_optimizer(args, [p for p in vae.parameters() if p.requires_grad], args.learning_rate)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.lr_warmup_steps)
    objective, optimizer, lr_scheduler = accelerator.prepare(VAEObjective(vae, args.kl_weight), optimizer,
                                                             lr_scheduler)
    progress = register_and_resume(accelerator, (), resume_path)
    global_step = first_step = progress.global_step
    init_trackers(accelerator, args, "vae")
    model = accelerator.unwrap_model(objective).vae
    warmup = NormWarmup(model, args.norm_warmup_steps)
    held_out = (validation_clips(args, args.num_validation_clips, args.validation_num_frames)
                if accelerator.is_main_process else None)

    data = clip_batches(training_clips(args, accelerator.num_processes), args, accelerator, global_step)
    budget = TimeBudget(accelerator, args.max_train_time)
    bar = tqdm(range(args.max_train_steps), initial=global_step, desc="VAE", disable=not accelerator.is_local_main_process)
    logs = {}
    stop = False
    while global_step < args.max_train_steps and not stop:
        video = next(data)
        logs_alpha = warmup.set_step(global_step)
        generator = torch.Generator(device=accelerator.device).manual_seed(
            args.seed + global_step * accelerator.num_processes + accelerator.process_index)
        with accelerator.autocast():
            loss, logs = objective(video, generator)
        accelerator.backward(loss)
        grad_norm, _ = optimizer_step(objective.parameters(), optimizer, args.max_grad_norm, accelerator.clip_grad_norm_)
        lr_scheduler.step()
        global_step += 1
        progress.global_step = global_step
        logs.update(loss=float(loss.detach()), grad_norm=float(grad_norm), lr=lr_scheduler.get_last_lr()[0],
                    first_step=first_step, norm_blend=logs_alpha)
        if not math.isfinite(logs["loss"]):
            raise RuntimeError(f"step {global_step}: the VAE loss is {logs['loss']}; lower --learning_rate.")
        bar.update(1)
        bar.set_postfix({k: f"{logs[k]:.4g}" for k in ("loss", "psnr")})
        if (args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process):
            logs["val_psnr"] = validate(model, held_out, os.path.join(args.output_dir, "validation"), global_step)
            logger.info("step %d: held-out PSNR %.2f dB", global_step, logs["val_psnr"])
        accelerator.log(logs, step=global_step)
        stop = end_of_step(accelerator, args, budget, global_step)
    bar.close()

    # --- export: the VAE with its latent statistics, the held-out PSNR, a model card
    accelerator.wait_for_everyone()
    if warmup.set_step(global_step) < 1.0:
        logger.warning("training stopped at step %d, inside --norm_warmup_steps %d: the exported VAE (full norms) is "
                       "not the network that was trained; train longer.", global_step, args.norm_warmup_steps)
        warmup.set_step(args.norm_warmup_steps)
    if accelerator.is_main_process:
        model.eval()
        stats_data = training_clips(args, 1) if args.videos is not None else WorldClipDataset(
            args.stats_clips, start=10**8, num_frames=args.validation_num_frames, height=args.height,
            width=args.width, max_objects=args.world_max_objects)
        loader = DataLoader(stats_data, batch_size=min(8, args.stats_clips), num_workers=args.dataloader_num_workers)
        clips = (batch["video"] for i, batch in zip(range(max(1, args.stats_clips // loader.batch_size)), loader))
        if args.train_decoder_only:  # same encoder, same latent space: keep its statistics
            mean, std = list(model.config.latents_mean), list(model.config.latents_std)
        else:
            mean, std = latent_statistics(model, clips)
            model.register_to_config(latents_mean=mean, latents_std=std)
        metrics = {"psnr": validate(model, held_out, os.path.join(args.output_dir, "validation"), global_step),
                   "steps": global_step, "latents_mean": mean, "latents_std": std,
                   "parameters": sum(p.numel() for p in model.parameters())}
        model.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as handle:
            json.dump(metrics, handle, indent=2)
        logger.info("exported %s: held-out PSNR %.2f dB", args.output_dir, metrics["psnr"])
        repo_id = create_hub_repo(args.hub_model_id, args.hub_token) if args.push_to_hub else None
        write_model_card(args.output_dir, model_card_text(args, global_step, metrics),
                         ["video", "vae", "diffusers", "raven"], base_model=hub_base_model(args.pretrained_vae),
                         repo_id=repo_id, token=args.hub_token)
        if repo_id is not None:
            push_folder(args.output_dir, repo_id, args.hub_token,
                        ignore_patterns=["checkpoint-*", "logs/*", "validation/*", "*.tmp"])
    accelerator.end_training()
    return logs


if __name__ == "__main__":
    run_cli(main)
