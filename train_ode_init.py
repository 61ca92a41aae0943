#!/usr/bin/env python
"""The student's ODE initialisation: regression on a teacher's PF-ODE trajectories at the few-step timesteps.

    accelerate launch train_ode_init.py @configs/world/ode_init.args --pretrained_model_name_or_path world/teacher \\
        --teacher_model world/teacher --prompts world/train_prompts.txt --output_dir world/ode_init
    accelerate launch train_ode_init.py --pretrained_model_name_or_path <CausalWanPipeline folder> \\
        --teacher_model <causal teacher from train_teacher.py --mode causal> --teacher_kind autoregressive \\
        --prompts prompts.txt --output_dir ode-init                        # Causal Forcing's variant

Two phases, both resumable (CausVid / Self Forcing; ``raven_video.training.ode`` holds the math):

1. **Trajectories.** The frozen teacher integrates the flow ODE from seeded noise (Euler, ``--trajectory_steps`` on
   Wan's shifted grid through the student's sigmas, classifier-free guidance) for ``--num_trajectories`` prompts and
   keeps the states at the student's timesteps and the endpoint, written in parts under ``--trajectory_dir``
   (a finished part is never redone; with several processes each writes its own parts).
   ``--teacher_kind bidirectional`` integrates the whole video jointly; ``autoregressive`` integrates chunk by chunk
   with the clean history in the KV cache (a causal teacher, Causal Forcing).
2. **Regression.** The causal student predicts the endpoint from the state at a random student timestep, all chunks
   at once, through the interleaved forward of Eq. (5) with the endpoints as the clean history (the forward of its
   DMD step), ``|| x̂0 - x0 ||^2``.

The export is a ``CausalWanPipeline`` folder: the ``--pretrained_model_name_or_path`` of ``train_raven.py``.
See ``docs/training.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time

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
    compile_transformers,
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
    log_validation,
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
from raven_video.data.latents import LatentDataset, LatentParts, write_latent_shards
from raven_video.data.prompts import PromptStream, load_prompts
from raven_video.models.transformer_causal_wan import cast_weights
from raven_video.pipelines.pipeline_causal_wan import CausalWanPipeline
from raven_video.sampling.flow import DEFAULT_SHIFT
from raven_video.testing import tiny_causal_transformer, tiny_pipeline
from raven_video.training.ema import EMA
from raven_video.training.ode import TEACHER_KINDS, ode_regression_loss, teacher_trajectory
from raven_video.training.raven_step import RAVEN_NEGATIVE_PROMPT, optimizer_step
from raven_video.training.rollout import GeneratorForward, Rollout

logger = logging.getLogger("train_ode_init")


# ----------------------------------------------------------------------------------------------------- arguments
def parse_args(input_args=None):
    p = argument_parser("ODE initialisation of a causal few-step student on a teacher's PF-ODE trajectories.")
    # models
    p.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="CausalWanPipeline folder or Hub id: the student init (+ text encoder, VAE, tokenizer); "
                        "usually the teacher's own export.")
    p.add_argument("--teacher_model", type=str, default=None,
                   help="The teacher transformer (a pipeline folder of train_teacher.py or a Wan2.1 diffusers folder).")
    p.add_argument("--teacher_kind", type=str, default="bidirectional", choices=TEACHER_KINDS,
                   help="bidirectional: whole-video ODE (CausVid, Self Forcing); autoregressive: chunk by chunk with "
                        "a causal teacher (Causal Forcing).")
    p.add_argument("--revision", type=str, default=None)
    p.add_argument("--tiny_random_models", action="store_true", help="Tiny random models (CPU smoke runs, tests).")
    # prompts and sizes
    p.add_argument("--prompts", type=str, default=None, help="txt / csv / parquet / jsonl file, folder or Hub dataset.")
    p.add_argument("--prompt_column", type=str, default="prompt")
    p.add_argument("--latent_dataset", type=str, default=None, help="Or take the prompts of a latent dataset.")
    p.add_argument("--num_frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--max_sequence_length", type=int, default=None,
                   help="Text tokens (zero-padded); default: the pipeline's config (512 for Wan).")
    # phase 1: trajectories
    p.add_argument("--trajectory_dir", type=str, default=None, help="Default: <output_dir>/trajectories.")
    p.add_argument("--num_trajectories", type=int, default=4096)
    p.add_argument("--trajectories_per_part", type=int, default=256, help="The unit of resumption.")
    p.add_argument("--trajectory_batch_size", type=int, default=16, help="Teacher videos per call.")
    p.add_argument("--trajectory_steps", type=int, default=48, help="Euler steps of the teacher's ODE.")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="Teacher CFG, neg + w(pos - neg).")
    p.add_argument("--negative_prompt", type=str, default=None,
                   help="Default: RAVEN's negative prompt; '' for a teacher trained with condition dropout.")
    p.add_argument("--timestep_shift", type=float, default=DEFAULT_SHIFT, help="Shift of the teacher's Euler grid.")
    # phase 2: regression
    p.add_argument("--train_batch_size", type=int, default=8, help="Trajectories per process per step.")
    p.add_argument("--trajectories_on_device", action="store_true",
                   help="Keep the trajectory store on the training device and encode every prompt once (small stores "
                        "such as the world's: 4 096 trajectories are 3.5 GB); a step then reads its batch from device "
                        "memory instead of gathering, casting and copying it on the CPU.")
    p.add_argument("--learning_rate", type=float, default=2e-5)
    p.add_argument("--lr_warmup_steps", type=int, default=100)
    add_optimizer_arguments(p, adam_epsilon=1e-8)
    p.set_defaults(adam_beta1=0.9, max_grad_norm=1.0)
    p.add_argument("--ema_decay", type=float, default=0.0, help="EMA of the exported weights; 0 exports the raw ones.")
    p.add_argument("--max_train_steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    add_compile_arguments(p)
    add_run_arguments(p, output_dir="ode-init-output", checkpointing_steps=500)
    args = p.parse_args(input_args)
    args.trajectory_dir = args.trajectory_dir or os.path.join(args.output_dir, "trajectories")
    return args


def validate_args(args) -> None:
    """Cheap checks of the flags alone, before any file or model is touched."""
    if not args.tiny_random_models:
        if not args.pretrained_model_name_or_path:
            raise ValueError("--pretrained_model_name_or_path is required (a CausalWanPipeline folder: the student "
                             "init), or pass --tiny_random_models for a smoke run.")
        if not args.teacher_model:
            raise ValueError("--teacher_model is required: the teacher transformer (train_teacher.py's export or a "
                             "Wan2.1 diffusers folder).")
    if (args.prompts is None) == (args.latent_dataset is None):
        raise ValueError("give exactly one prompt source: --prompts (txt/csv/parquet/Hub dataset) or --latent_dataset.")
    check_run_args(args)
    for name in ("num_trajectories", "trajectories_per_part", "trajectory_batch_size", "train_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)} must be >= 1.")
    if args.trajectory_steps < 4:
        raise ValueError(f"--trajectory_steps {args.trajectory_steps} must be >= 4 (one Euler step per student "
                         "interval; 48 is usual).")
    if not args.learning_rate > 0 or args.guidance_scale < 1.0 or not args.timestep_shift > 0:
        raise ValueError(f"--learning_rate {args.learning_rate} must be > 0, --guidance_scale {args.guidance_scale} "
                         f">= 1 and --timestep_shift {args.timestep_shift} > 0.")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay {args.ema_decay} must be in [0, 1) (0 = no EMA).")


def model_configs(args) -> tuple[dict, dict, dict]:
    """(student, teacher, VAE) configs, read without loading weights."""
    if args.tiny_random_models:
        student, vae = tiny_configs()
        return student, dict(student), vae
    path = args.pretrained_model_name_or_path
    if not os.path.isdir(path) and path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--pretrained_model_name_or_path {path!r} does not exist.")
    try:
        teacher = load_transformer_config(args.teacher_model)
    except (OSError, ValueError) as err:
        raise ValueError(f"--teacher_model {args.teacher_model!r} cannot be read: {err}") from None
    student = load_transformer_config(path, args.revision)
    for key in ("in_channels", "out_channels", "patch_size", "text_dim"):
        if student.get(key) != teacher.get(key):
            raise ValueError(f"teacher config {key}={teacher.get(key)} differs from the student's {student.get(key)}: "
                             "the teacher must share the student's latent space, patching and text width.")
    return student, teacher, load_vae_config(path, args.revision)


def prompt_source(args) -> list[str]:
    if args.latent_dataset:
        dataset = LatentDataset(args.latent_dataset)
        return [dataset.prompt(k) for k in dataset.keys]
    return load_prompts(args.prompts, column=args.prompt_column)


# ----------------------------------------------------------------------------------------------------- phase 1
@torch.no_grad()
def generate_trajectories(args, accelerator, pipe, teacher, prompts, shape, weight_dtype) -> int:
    """Write the missing parts of this process (part ``i`` belongs to rank ``i % world_size``); returns the number
    of parts. Trajectory ``j`` uses prompt ``prompts[perm[j % n]]`` (one seeded permutation) and noise seeded
    ``seed + j``, so the store does not depend on how many processes wrote it."""
    store = LatentParts(args.trajectory_dir)
    num_parts = math.ceil(args.num_trajectories / args.trajectories_per_part)
    mine = [i for i in range(num_parts) if i % accelerator.num_processes == accelerator.process_index
            and not store.is_complete(i)]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    encode = prompt_encoder(pipe, args.max_sequence_length, accelerator.device, accelerator.device)
    negative = args.negative_prompt if args.negative_prompt is not None else RAVEN_NEGATIVE_PROMPT
    negative_text = encode([negative]) if args.guidance_scale > 1.0 else None
    timesteps = tuple(pipe.config.denoising_timesteps)
    if mine:
        logger.info("rank %d: %d of %d trajectory parts to write", accelerator.process_index, len(mine), num_parts)
    for part in tqdm(mine, desc="trajectories", disable=not accelerator.is_local_main_process):
        first = part * args.trajectories_per_part
        indices = list(range(first, min(first + args.trajectories_per_part, args.num_trajectories)))

        def batches():
            for start in range(0, len(indices), args.trajectory_batch_size):
                batch = indices[start:start + args.trajectory_batch_size]
                texts = [prompts[order[j % len(prompts)]] for j in batch]
                noise = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(args.seed + j))
                                     for j in batch]).to(accelerator.device)
                text = encode(texts)
                with accelerator.autocast():
                    rollout = teacher_trajectory(
                        teacher, text, noise, timesteps, num_steps=args.trajectory_steps, kind=args.teacher_kind,
                        guidance_scale=args.guidance_scale,
                        negative_text=None if negative_text is None else negative_text.expand(len(batch), -1, -1),
                        shift=args.timestep_shift)
                items = torch.cat([rollout.trajectory, rollout.endpoints[None]]).transpose(0, 1)  # [b, K + 1, ...]
                yield items.half().cpu(), [{"prompt": t, "trajectory": j} for t, j in zip(texts, batch)]

        tic = time.perf_counter()
        write_latent_shards(store.part_dir(part), batches(), shard_size=args.trajectories_per_part)
        accelerator.log({"trajectory_part_seconds": time.perf_counter() - tic})
    accelerator.wait_for_everyone()
    return num_parts


# ----------------------------------------------------------------------------------------------------- main
def model_card_text(args, steps: int) -> str:
    return (f"# ODE-initialised causal few-step student\n\nRegression for {steps} steps on {args.num_trajectories} "
            f"{args.teacher_kind} teacher PF-ODE trajectories ({args.trajectory_steps} Euler steps, CFG "
            f"{args.guidance_scale}) at the student's timesteps. Stream it with `CausalWanPipeline`; distil it "
            "further with `train_raven.py`.\n")


def main(input_args=None):
    args = parse_args(input_args) if not isinstance(input_args, argparse.Namespace) else input_args
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with usage_errors():
        validate_args(args)
        student_cfg, _, vae_cfg = model_configs(args)
        shape = latent_shape(args, student_cfg, vae_cfg, batch_size=1)
        prompts = prompt_source(args)

    accelerator = make_accelerator(args)
    set_seed(args.seed)
    weight_dtype = mixed_precision_dtype(accelerator)
    resume_path = resolve_resume(args)
    init_trackers(accelerator, args, "ode-init")

    # --- models
    if args.tiny_random_models:
        pipe, teacher = tiny_pipeline(seed=0), tiny_causal_transformer(seed=2)
    else:
        pipe = CausalWanPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision)
        teacher = load_transformer(args.teacher_model, dtype=weight_dtype)
    pipe.text_encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype)
    pipe.vae.requires_grad_(False).to(accelerator.device)
    cast_weights(teacher.requires_grad_(False).eval(), weight_dtype).to(accelerator.device)
    compile_transformers(args, teacher)

    # --- phase 1: the teacher's trajectories (resumable parts), then the teacher leaves the accelerator
    num_parts = generate_trajectories(args, accelerator, pipe, teacher, prompts, shape, weight_dtype)
    del teacher
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    num_steps = len(pipe.config.denoising_timesteps)
    items, item_prompts = LatentParts(args.trajectory_dir).load(num_parts, (num_steps + 1, *shape[1:]))
    logger.info("%d trajectories (%.1f MB) from %s", len(items), items.numel() * 2 / 2**20, args.trajectory_dir)

    # --- phase 2: regression
    student = pipe.transformer
    student.train().requires_grad_(True)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    compile_transformers(args, student)
    optimizer = make_optimizer(args, student.parameters(), args.learning_rate)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.lr_warmup_steps)
    student_train, optimizer, lr_scheduler = accelerator.prepare(GeneratorForward(student), optimizer, lr_scheduler)
    student = accelerator.unwrap_model(student_train).transformer
    ema = EMA(student, decay=args.ema_decay) if args.ema_decay > 0 else None
    stream = PromptStream([str(i) for i in range(len(items))], seed=args.seed, rank=accelerator.process_index,
                          world_size=accelerator.num_processes)
    progress = register_and_resume(accelerator, (stream,) + ((ema,) if ema else ()), resume_path)
    global_step = first_step = progress.global_step
    encode = prompt_encoder(pipe, args.max_sequence_length, accelerator.device, accelerator.device)
    timesteps = tuple(pipe.config.denoising_timesteps)
    prompt_table = None
    if args.trajectories_on_device:
        items = items.to(accelerator.device)
        prompt_table = EncodedPrompts(encode, dict(enumerate(item_prompts)))
        logger.info("trajectories on %s (%.1f MB); %d distinct prompts encoded once", accelerator.device.type,
                    items.numel() * items.element_size() / 2**20, prompt_table.table.shape[0])

    budget = TimeBudget(accelerator, args.max_train_time)
    bar = tqdm(range(args.max_train_steps), initial=global_step, desc="ODE regression",
               disable=not accelerator.is_local_main_process)
    logs, window = {}, []
    stop = False
    while global_step < args.max_train_steps and not stop:
        keys = [int(k) for k in stream.take(args.train_batch_size)]
        rows = torch.tensor(keys, device=items.device)
        batch = items[rows].to(accelerator.device, torch.float32)  # [B, K + 1, C, F, H, W]
        rollout = Rollout(trajectory=batch[:, :num_steps].transpose(0, 1), endpoints=batch[:, num_steps],
                          timesteps=timesteps)
        generator = torch.Generator().manual_seed(
            args.seed + global_step * accelerator.num_processes + accelerator.process_index)
        step_index = torch.randint(0, num_steps, (len(keys),), generator=generator)
        with accelerator.autocast():
            text = prompt_table[keys] if prompt_table is not None else encode([item_prompts[k] for k in keys])
            loss, logs = ode_regression_loss(student_train, rollout, step_index, text)
        accelerator.backward(loss)
        grad_norm, _ = optimizer_step(student_train.parameters(), optimizer, args.max_grad_norm, accelerator.clip_grad_norm_)
        lr_scheduler.step()
        if ema is not None:
            ema.update(student)
        global_step += 1
        progress.global_step = global_step
        if not math.isfinite(logs["loss"]):
            raise RuntimeError(f"step {global_step}: the regression loss is {logs['loss']}; lower --learning_rate.")
        window = (window + [logs["loss"]])[-100:]
        logs.update(loss_avg100=float(np.mean(window)), grad_norm=float(grad_norm), lr=lr_scheduler.get_last_lr()[0],
                    first_step=first_step)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss_avg100']:.4f}")
        accelerator.log(logs, step=global_step)
        stop = end_of_step(accelerator, args, budget, global_step)
        if (args.validation_steps and args.validation_prompts and global_step % args.validation_steps == 0
                and accelerator.is_main_process):
            log_validation(args, accelerator, pipe, student, global_step)
    bar.close()

    # --- export: the student as a CausalWanPipeline folder + model card (+ Hub)
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(student)
    if accelerator.is_main_process:
        pipeline_with(pipe, cast_weights(student, torch.float32).to("cpu")).save_pretrained(args.output_dir)
        repo_id = create_hub_repo(args.hub_model_id, args.hub_token) if args.push_to_hub else None
        write_model_card(args.output_dir, model_card_text(args, global_step),
                         ["text-to-video", "diffusers", "wan", "causal", "ode-initialisation"],
                         base_model=hub_base_model(args.pretrained_model_name_or_path),
                         prompt=(args.validation_prompts or [None])[0], repo_id=repo_id, token=args.hub_token)
        if repo_id is not None:
            push_folder(args.output_dir, repo_id, args.hub_token,
                        ignore_patterns=["checkpoint-*", "logs/*", "validation/*", "trajectories/*", "*.tmp"])
    accelerator.end_training()
    return logs


if __name__ == "__main__":
    run_cli(main)
