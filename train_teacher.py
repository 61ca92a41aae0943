#!/usr/bin/env python
"""Flow-matching training (or fine-tuning) of a Wan transformer on precomputed video latents: the recipe's teacher.

    accelerate launch train_teacher.py @configs/world/teacher.args --pretrained_model_name_or_path world/base \\
        --latent_dataset world/latents --output_dir world/teacher                       # the world's teacher
    accelerate launch train_teacher.py --pretrained_model_name_or_path <CausalWanPipeline folder> \\
        --transformer Wan-AI/Wan2.1-T2V-1.3B-Diffusers --latent_dataset latents --mode causal \\
        --learning_rate 1e-5 --output_dir wan-causal-teacher               # a causal Wan teacher, teacher forcing

``--mode bidirectional`` is Wan2.1's objective (one noise level per video, full attention); ``--mode causal`` trains
the same transformer as an autoregressive teacher with teacher forcing (each chunk denoised given the clean chunks
before it, the interleaved forward of Eq. (5)), the teacher of Causal Forcing's ODE initialisation
(``train_ode_init.py --teacher_kind autoregressive``). The objective lives in ``raven_video.training.teacher``; this
script is wiring: arguments, models, Accelerate, EMA, checkpoints, logging, validation and export. The export is a
``CausalWanPipeline`` folder holding the EMA transformer, usable as ``--teacher_model`` of ``train_ode_init.py`` and
``train_raven.py``. See ``docs/training.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os

import numpy as np
import torch
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from raven_video.cli.training import (
    EncodedPrompts,
    TimeBudget,
    add_optimizer_arguments,
    add_compile_arguments,
    add_run_arguments,
    argument_parser,
    check_run_args,
    create_hub_repo,
    end_of_step,
    hub_base_model,
    init_trackers,
    latent_shape,
    load_transformer,
    load_transformer_config,
    load_vae_config,
    make_accelerator,
    make_optimizer,
    mixed_precision_dtype,
    pipeline_with,
    prompt_encoder,
    push_folder,
    register_and_resume,
    resolve_resume,
    run_cli,
    tiny_configs,
    usage_errors,
    write_model_card,
)
from raven_video.data.latents import LatentDataset
from raven_video.data.prompts import PromptStream
from raven_video.models.transformer_causal_wan import cast_weights
from raven_video.pipelines.pipeline_causal_wan import CausalWanPipeline
from raven_video.pipelines.vae_streaming import decode_videos
from raven_video.sampling.flow import DEFAULT_SHIFT
from raven_video.testing import tiny_pipeline
from raven_video.training.ema import EMA
from raven_video.training.ode import teacher_trajectory
from raven_video.training.raven_step import optimizer_step
from raven_video.training.teacher import TEACHER_MODES, TeacherObjective
from raven_video.utils.video_io import frame_strip, save_video, to_uint8_frames

logger = logging.getLogger("train_teacher")
#: ``--latents_in_memory`` also encodes every prompt once if the float32 table fits in this (the world's: 268 MB).
PROMPT_TABLE_MAX_BYTES = 2 * 2**30


# ----------------------------------------------------------------------------------------------------- arguments
def parse_args(input_args=None):
    p = argument_parser("Flow-matching training of a Wan transformer on video latents (the recipe's teacher).")
    # models
    p.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="CausalWanPipeline folder or Hub id: text encoder, tokenizer, VAE and (unless --transformer) "
                        "the transformer to train.")
    p.add_argument("--transformer", type=str, default=None,
                   help="Start from this transformer instead (a Wan2.1 diffusers folder / Hub id or a transformer "
                        "folder), e.g. to fine-tune Wan2.1-T2V-1.3B as a causal teacher.")
    p.add_argument("--revision", type=str, default=None)
    p.add_argument("--tiny_random_models", action="store_true", help="Tiny random models (CPU smoke runs, tests).")
    # data
    p.add_argument("--latent_dataset", type=str, default=None,
                   help="Folder of precomputed latents + prompts (scripts/precompute_latents.py).")
    p.add_argument("--latents_in_memory", action="store_true",
                   help="Read every latent onto the training device once, and encode every prompt once (small "
                        "datasets such as the world's: 2.7 GB of latents, 268 MB of prompt embeddings); a step then "
                        "reads its batch from device memory instead of gathering, casting and copying it on the CPU.")
    p.add_argument("--num_frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--max_sequence_length", type=int, default=None,
                   help="Text tokens (zero-padded); default: the pipeline's config (512 for Wan).")
    p.add_argument("--train_batch_size", type=int, default=8, help="Videos per process per step.")
    # objective
    p.add_argument("--mode", type=str, default="bidirectional", choices=TEACHER_MODES)
    p.add_argument("--timestep_shift", type=float, default=DEFAULT_SHIFT,
                   help="Shift of the training-time distribution (Wan: 5, biased towards high noise).")
    p.add_argument("--cond_dropout", type=float, default=0.1,
                   help="Probability of the empty prompt per video (classifier-free guidance).")
    # optimisation
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--lr_scheduler", type=str, default="constant_with_warmup",
                   choices=("constant", "constant_with_warmup", "cosine", "linear"))
    p.add_argument("--lr_warmup_steps", type=int, default=500)
    add_optimizer_arguments(p, adam_epsilon=1e-8)
    p.set_defaults(adam_beta1=0.9, max_grad_norm=1.0)
    p.add_argument("--ema_decay", type=float, default=0.999, help="EMA of the exported weights; 0 exports the raw ones.")
    p.add_argument("--max_train_steps", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    add_compile_arguments(p)
    # validation sampling (Euler on the PF-ODE, classifier-free guidance)
    p.add_argument("--validation_num_steps", type=int, default=48)
    p.add_argument("--guidance_scale", type=float, default=3.0, help="Validation CFG, neg + w(pos - neg).")
    add_run_arguments(p, output_dir="teacher-output", checkpointing_steps=1000)
    return p.parse_args(input_args)


def validate_args(args) -> None:
    """Cheap checks of the flags alone, before any file or model is touched."""
    if not args.tiny_random_models and not args.pretrained_model_name_or_path:
        raise ValueError("--pretrained_model_name_or_path is required (a CausalWanPipeline folder: text encoder, "
                         "tokenizer, VAE), or pass --tiny_random_models for a smoke run.")
    if not args.latent_dataset:
        raise ValueError("--latent_dataset is required: a folder written by scripts/precompute_latents.py.")
    check_run_args(args)
    if args.train_batch_size < 1 or args.validation_num_steps < 4:
        raise ValueError(f"--train_batch_size {args.train_batch_size} must be >= 1 and --validation_num_steps "
                         f"{args.validation_num_steps} >= 4.")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate {args.learning_rate} must be > 0.")
    if not 0.0 <= args.cond_dropout < 1.0:
        raise ValueError(f"--cond_dropout {args.cond_dropout} must be in [0, 1) (0.1 is usual).")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay {args.ema_decay} must be in [0, 1) (0.999 is usual; 0 = no EMA).")
    if not args.timestep_shift > 0 or args.guidance_scale < 1.0:
        raise ValueError(f"--timestep_shift {args.timestep_shift} must be > 0 and --guidance_scale "
                         f"{args.guidance_scale} >= 1.")
    if not os.path.isdir(args.latent_dataset):
        raise FileNotFoundError(f"--latent_dataset {args.latent_dataset!r} is not a folder; build it with "
                                "scripts/precompute_latents.py.")


def model_configs(args) -> tuple[dict, dict]:
    """(transformer, VAE) configs, read without loading weights."""
    if args.tiny_random_models:
        return tiny_configs()
    path = args.pretrained_model_name_or_path
    if not os.path.isdir(path) and path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--pretrained_model_name_or_path {path!r} does not exist.")
    vae = load_vae_config(path, args.revision)
    try:
        transformer = load_transformer_config(args.transformer or path, None if args.transformer else args.revision)
    except (OSError, ValueError) as err:
        raise ValueError(f"--transformer {args.transformer!r} cannot be read: {err}") from None
    return transformer, vae


def load_pipeline(args) -> CausalWanPipeline:
    if args.tiny_random_models:
        return tiny_pipeline(seed=0)
    pipe = CausalWanPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision)
    if args.transformer:
        pipe = pipeline_with(pipe, load_transformer(args.transformer))
    return pipe


# ----------------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(args, accelerator, pipe, transformer, encode, empty_text, step: int) -> None:
    """Teacher samples (Euler, CFG) for the validation prompts: mp4s and a PNG strip per prompt."""
    folder = os.path.join(args.output_dir, "validation", f"step-{step}")
    os.makedirs(folder, exist_ok=True)
    was_training = transformer.training
    transformer.eval()
    shape = latent_shape(args, dict(transformer.config), dict(pipe.vae.config), batch_size=1)
    kind = "bidirectional" if args.mode == "bidirectional" else "autoregressive"
    generator = torch.Generator().manual_seed(args.seed)
    for i, prompt in enumerate(args.validation_prompts):
        noise = torch.randn(shape, generator=generator).to(accelerator.device)
        with accelerator.autocast():
            sample = teacher_trajectory(transformer, encode([prompt]), noise, pipe.config.denoising_timesteps,
                                        num_steps=args.validation_num_steps, kind=kind,
                                        guidance_scale=args.guidance_scale, negative_text=empty_text,
                                        shift=args.timestep_shift).endpoints
        frames = to_uint8_frames(decode_videos(pipe.vae, sample)[0], value_range=(-1, 1), layout="FCHW")
        save_video(frames, os.path.join(folder, f"{i:02d}.mp4"), fps=pipe.config.fps)
        frame_strip(frames, os.path.join(folder, f"{i:02d}.png"))
    transformer.train(was_training)


def model_card_text(args, steps: int) -> str:
    return (f"# Wan flow-matching teacher ({args.mode})\n\nEMA transformer (decay {args.ema_decay}) after {steps} "
            f"steps of flow matching on video latents (shift {args.timestep_shift}, condition dropout "
            f"{args.cond_dropout}). Sample it with a multi-step Euler PF-ODE solver and classifier-free guidance; it "
            "is the teacher of `train_ode_init.py` and `train_raven.py`.\n")


# ----------------------------------------------------------------------------------------------------- main
def main(input_args=None):
    args = parse_args(input_args) if not isinstance(input_args, argparse.Namespace) else input_args
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with usage_errors():
        validate_args(args)
        transformer_cfg, vae_cfg = model_configs(args)
        shape = latent_shape(args, transformer_cfg, vae_cfg)
        dataset = LatentDataset(args.latent_dataset, latent_shape=shape[1:])
        dataset.latents(dataset.keys[0])  # the first item is read and checked now, not after the models load

    accelerator = make_accelerator(args)
    set_seed(args.seed)
    weight_dtype = mixed_precision_dtype(accelerator)
    resume_path = resolve_resume(args)
    stream = PromptStream(dataset.keys, seed=args.seed, rank=accelerator.process_index,
                          world_size=accelerator.num_processes)
    memory = dataset.all_latents().to(accelerator.device) if args.latents_in_memory else None
    if memory is not None:
        logger.info("%d latents in %s memory (%.1f MB)", len(dataset), accelerator.device.type,
                    memory.numel() * memory.element_size() / 2**20)

    # --- models
    pipe = load_pipeline(args)
    transformer = pipe.transformer
    pipe.text_encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    pipe.vae.requires_grad_(False).to(accelerator.device)
    transformer.train().requires_grad_(True)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.compile:
        transformer.compile_repeated_blocks(backend=args.compile_backend)
    optimizer = make_optimizer(args, transformer.parameters(), args.learning_rate)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.max_train_steps)
    objective = TeacherObjective(transformer, args.mode, args.timestep_shift, args.cond_dropout)
    objective, optimizer, lr_scheduler = accelerator.prepare(objective, optimizer, lr_scheduler)
    transformer = accelerator.unwrap_model(objective).transformer
    ema = EMA(transformer, decay=args.ema_decay) if args.ema_decay > 0 else None
    progress = register_and_resume(accelerator, (stream,) + ((ema,) if ema else ()), resume_path)
    global_step = first_step = progress.global_step
    init_trackers(accelerator, args, "teacher")

    encode = prompt_encoder(pipe, args.max_sequence_length, accelerator.device, accelerator.device)
    empty_text = encode([""])
    prompt_table = None
    if memory is not None:
        prompts = {key: dataset.prompt(key) for key in dataset.keys}
        size = EncodedPrompts.nbytes(len(set(prompts.values())), empty_text.shape[1], empty_text.shape[2])
        if size <= PROMPT_TABLE_MAX_BYTES:
            prompt_table = EncodedPrompts(encode, prompts)
            logger.info("%d distinct prompts encoded once (%.1f MB)", prompt_table.table.shape[0], size / 2**20)
        else:
            logger.info("prompt table would be %.1f GB (> %.1f GB): encoding each batch's prompts per step",
                        size / 2**30, PROMPT_TABLE_MAX_BYTES / 2**30)
    logger.info("teacher (%s): %.2fM parameters, %d videos, batch %d x %d processes", args.mode,
                sum(p.numel() for p in transformer.parameters()) / 1e6, len(dataset), args.train_batch_size,
                accelerator.num_processes)

    budget = TimeBudget(accelerator, args.max_train_time)
    bar = tqdm(range(args.max_train_steps), initial=global_step, desc="teacher",
               disable=not accelerator.is_local_main_process)
    logs, window = {}, []
    stop = False
    while global_step < args.max_train_steps and not stop:
        keys = stream.take(args.train_batch_size)
        if memory is not None:
            latents = memory[torch.tensor([int(k) for k in keys], device=memory.device)].float()
        else:
            latents = torch.stack([dataset.latents(k) for k in keys]).to(accelerator.device)
        text = prompt_table[keys] if prompt_table is not None else encode([dataset.prompt(k) for k in keys])
        # per-step, per-rank draws (times, noise, dropout): a resumed run replays them exactly
        generator = torch.Generator().manual_seed(
            args.seed + global_step * accelerator.num_processes + accelerator.process_index)
        with accelerator.autocast():
            loss, logs = objective(latents, text, empty_text, generator)
        accelerator.backward(loss)
        grad_norm, _ = optimizer_step(objective.parameters(), optimizer, args.max_grad_norm, accelerator.clip_grad_norm_)
        lr_scheduler.step()
        if ema is not None:
            ema.update(transformer)
        global_step += 1
        progress.global_step = global_step
        if not math.isfinite(logs["loss"]):
            raise RuntimeError(f"step {global_step}: the flow-matching loss is {logs['loss']}; lower --learning_rate "
                               "or raise --lr_warmup_steps.")
        window = (window + [logs["loss"]])[-100:]
        logs.update(loss_avg100=float(np.mean(window)), grad_norm=float(grad_norm), lr=lr_scheduler.get_last_lr()[0],
                    first_step=first_step)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss_avg100']:.4f}")
        accelerator.log(logs, step=global_step)
        stop = end_of_step(accelerator, args, budget, global_step)
        if (args.validation_steps and args.validation_prompts and global_step % args.validation_steps == 0
                and accelerator.is_main_process):
            validate(args, accelerator, pipe, transformer, encode, empty_text, global_step)
    bar.close()

    # --- export: the EMA transformer as a CausalWanPipeline folder + model card (+ Hub)
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(transformer)
    if accelerator.is_main_process:
        exported = cast_weights(transformer, torch.float32).to("cpu")
        pipeline_with(pipe, exported).save_pretrained(args.output_dir)
        if args.validation_prompts:
            validate(args, accelerator, pipe, transformer.to(accelerator.device), encode, empty_text, global_step)
        repo_id = create_hub_repo(args.hub_model_id, args.hub_token) if args.push_to_hub else None
        write_model_card(args.output_dir, model_card_text(args, global_step),
                         ["text-to-video", "diffusers", "wan", "flow-matching", "teacher"],
                         base_model=hub_base_model(args.transformer or args.pretrained_model_name_or_path),
                         prompt=(args.validation_prompts or [None])[0], repo_id=repo_id, token=args.hub_token)
        if repo_id is not None:
            push_folder(args.output_dir, repo_id, args.hub_token,
                        ignore_patterns=["checkpoint-*", "logs/*", "validation/*", "*.tmp"])
    accelerator.end_training()
    return logs


if __name__ == "__main__":
    run_cli(main)
