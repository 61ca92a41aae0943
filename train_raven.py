#!/usr/bin/env python
"""RAVEN distillation: DMD with the training-time test on a causal Wan2.1 student (``docs/method.md`` §3, Alg. 1).

    accelerate launch --config_file configs/accelerate_fsdp2_8gpu.yaml train_raven.py \
        --pretrained_model_name_or_path <CausalWanPipeline folder> --teacher_model <Wan2.1-T2V-14B diffusers folder> \
        --critic_model <Wan2.1-T2V-1.3B diffusers folder> --prompts prompts.txt --output_dir raven-out

The algorithm lives in ``raven_video.training`` (``rollout.py``, ``raven_step.py``); this script is wiring: arguments,
models, Accelerate, checkpoints, logging, validation and export. See ``docs/training.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_seed
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from tqdm.auto import tqdm

from raven_video.cli.training import (
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
from raven_video.data.latents import LatentDataset
from raven_video.data.prompts import PromptStream, load_prompts
from raven_video.models.transformer_causal_wan import CausalWanTransformer3DModel, cast_weights
from raven_video.pipelines.pipeline_causal_wan import CausalWanPipeline
from raven_video.testing import tiny_causal_transformer, tiny_pipeline
from raven_video.training.chunk_weighting import parse_chunk_weighting
from raven_video.training.ema import EMA
from raven_video.training.raven_step import RAVEN_NEGATIVE_PROMPT, RavenConfig, TrainState, raven_iteration
from raven_video.training.rollout import DATA_HISTORY_MODES, HISTORY_MODES, GeneratorForward

logger = logging.getLogger("train_raven")


# ----------------------------------------------------------------------------------------------------- arguments
def parse_args(input_args=None):
    p = argument_parser("RAVEN DMD distillation with the training-time test (docs/method.md §3, Alg. 1).")
    # models
    p.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="CausalWanPipeline folder or Hub id: the student init (+ text encoder, VAE, tokenizer).")
    p.add_argument("--teacher_model", type=str, default=None,
                   help="Wan2.1 T2V diffusers transformer (1.3B or 14B; a pipeline folder or a transformer folder).")
    p.add_argument("--critic_model", type=str, default=None,
                   help="Fake-score init (Wan2.1-T2V-1.3B). Default: the teacher when it has the student's size.")
    p.add_argument("--revision", type=str, default=None)
    p.add_argument("--tiny_random_models", action="store_true",
                   help="Build tiny random student/critic/teacher/text encoder/VAE (CPU smoke runs, tests).")
    # data
    p.add_argument("--prompts", type=str, default=None, help="txt / csv / parquet / jsonl file, folder or Hub dataset.")
    p.add_argument("--prompt_column", type=str, default="prompt")
    p.add_argument("--latent_dataset", type=str, default=None,
                   help="Folder of precomputed latents + prompts (scripts/precompute_latents.py); needed by "
                        "--history teacher_forcing/diffusion_forcing, and then also the prompt source.")
    p.add_argument("--latents_in_memory", action="store_true",
                   help="With a data history (teacher_forcing, diffusion_forcing): read every latent of "
                        "--latent_dataset onto the training device once, instead of opening its shards for each "
                        "batch (small datasets such as the world's); ignored by the other histories.")
    p.add_argument("--num_frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--max_sequence_length", type=int, default=None,
                   help="Text tokens (zero-padded); default: the pipeline's config (512 for Wan).")
    p.add_argument("--train_batch_size", type=int, default=1, help="Videos per process per iteration (spec: 1).")
    # algorithm
    p.add_argument("--history", type=str, default="raven", choices=HISTORY_MODES)
    p.add_argument("--chunk_weighting", type=str, default="-1", help="docs/method.md §3.5: alpha, uniform, mode_<s>, ln_<m>_<s>.")
    p.add_argument("--ttur", type=int, default=2, help="Generator update every `ttur` iterations (critic every one).")
    p.add_argument("--guidance_scale", type=float, default=3.0, help="Teacher CFG, neg + w(pos - neg).")
    p.add_argument("--rollout_guidance_scale", type=float, default=1.0,
                   help="Student CFG in the rollout; 1 = unguided (default), 3.0 reproduces the reference code's guided rollouts (docs/method.md §5).")
    p.add_argument("--negative_prompt", type=str, default=None, help="Default: RAVEN's negative prompt.")
    p.add_argument("--dmd_loss_type", type=str, default="dmd", choices=("dmd", "sim", "sid"))
    # optimisation
    p.add_argument("--learning_rate", type=float, default=2e-6)
    p.add_argument("--critic_learning_rate", type=float, default=4e-7)
    add_optimizer_arguments(p, adam_epsilon=1e-8)
    p.add_argument("--ema_decay", type=float, default=0.9675)
    p.add_argument("--offload_text_encoder", action="store_true", help="Keep the text encoder on the CPU.")
    p.add_argument("--max_train_steps", type=int, default=220, help="Iterations (RAVEN: 220 = 110 generator updates).")
    p.add_argument("--seed", type=int, default=20001019)
    # checkpoints, logging, validation, export
    add_compile_arguments(p)
    add_run_arguments(p, output_dir="raven-output", checkpointing_steps=110)
    args = p.parse_args(input_args)
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    args.local_rank = env_rank
    return args


# ----------------------------------------------------------------------------------------------------- validation
def validate_args(args) -> None:
    """Cheap checks of the flags alone, before any file or model is touched. Errors name the value and the fix."""
    if not args.tiny_random_models:
        if not args.pretrained_model_name_or_path:
            raise ValueError("--pretrained_model_name_or_path is required (a CausalWanPipeline folder), "
                             "or pass --tiny_random_models for a smoke run.")
        if not args.teacher_model:
            raise ValueError("--teacher_model is required: a Wan2.1 T2V diffusers transformer (1.3B or 14B) used as "
                             "the frozen real score.")
    if args.prompts is None and args.latent_dataset is None:
        raise ValueError("no prompt source: pass --prompts (txt/csv/parquet/Hub dataset) or --latent_dataset.")
    if args.history in DATA_HISTORY_MODES and not args.latent_dataset:
        raise ValueError(f"--history {args.history} builds its history from real-video latents: pass "
                         "--latent_dataset (see scripts/precompute_latents.py).")
    check_run_args(args)
    for name in ("ttur", "train_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)} must be >= 1.")
    for name in ("learning_rate", "critic_learning_rate"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} {getattr(args, name)} must be > 0.")
    if not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError(f"--ema_decay {args.ema_decay} must be in [0, 1] (RAVEN: 0.9675).")
    if args.guidance_scale < 1.0 or args.rollout_guidance_scale < 1.0:
        raise ValueError("--guidance_scale and --rollout_guidance_scale must be >= 1 (1 = no guidance).")
    parse_chunk_weighting(args.chunk_weighting)


_COMPAT_KEYS = ("in_channels", "out_channels", "patch_size", "text_dim")
_SIZE_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim")


def _cfg(config, key):
    value = config.get(key)
    return tuple(value) if isinstance(value, list) else value


def check_model_configs(student_cfg: dict, teacher_cfg: dict, critic_cfg: dict, text_dim: int | None = None) -> None:
    """Student, teacher and critic must share the latent space, patching and text width."""
    for name, cfg in (("teacher", teacher_cfg), ("critic", critic_cfg)):
        for key in _COMPAT_KEYS:
            if _cfg(cfg, key) != _cfg(student_cfg, key):
                raise ValueError(
                    f"{name} config {key}={_cfg(cfg, key)} differs from the student's {_cfg(student_cfg, key)}: "
                    f"the {name} must be a Wan2.1 T2V transformer with the same latent channels, patch size and "
                    "text width as the student."
                )
    if text_dim is not None and _cfg(student_cfg, "text_dim") != text_dim:
        raise ValueError(f"the text encoder outputs width {text_dim} but the transformers expect text_dim="
                         f"{_cfg(student_cfg, 'text_dim')}.")


def same_size(a: dict, b: dict) -> bool:
    return all(_cfg(a, k) == _cfg(b, k) for k in _SIZE_KEYS)


# ----------------------------------------------------------------------------------------------------- models
def model_configs(args) -> tuple:
    """(student, teacher, critic, vae) configs, read without loading weights."""
    if args.tiny_random_models:
        student, vae = tiny_configs()
        return student, dict(student), dict(student), vae
    student_path = args.pretrained_model_name_or_path
    if not os.path.isdir(student_path) and student_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--pretrained_model_name_or_path {student_path!r} does not exist.")
    student = load_transformer_config(student_path, args.revision)
    vae = load_vae_config(student_path, args.revision)
    try:
        teacher = load_transformer_config(args.teacher_model)
    except (OSError, ValueError) as err:
        raise ValueError(f"--teacher_model {args.teacher_model!r} cannot be read: {err}") from None
    if args.critic_model:
        critic = load_transformer_config(args.critic_model)
    elif same_size(teacher, student):
        critic = teacher
    else:
        raise ValueError(
            f"--teacher_model {args.teacher_model!r} is larger than the student (num_layers {teacher['num_layers']} vs "
            f"{student['num_layers']}): pass --critic_model with a student-sized Wan2.1 T2V transformer (RAVEN: "
            "Wan2.1-T2V-1.3B critic, 14B teacher)."
        )
    return student, teacher, critic, vae


def load_models(args, weight_dtype):
    """Student pipeline (text encoder, VAE, tokenizer, student transformer), critic and teacher."""
    if args.tiny_random_models:
        pipe = tiny_pipeline(seed=0)
        teacher = tiny_causal_transformer(seed=2)
        critic = tiny_causal_transformer(seed=2)  # the critic starts from the teacher's weights (same size)
        return pipe, critic, teacher
    pipe = CausalWanPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision)
    teacher = load_transformer(args.teacher_model, dtype=weight_dtype)
    critic = load_transformer(args.critic_model or args.teacher_model, dtype=torch.float32)
    return pipe, critic, teacher


# ----------------------------------------------------------------------------------------------------- export
def export_pipeline(pipe, student_state_dict, output_dir: str) -> None:
    """The EMA student as a ``CausalWanPipeline`` folder (Hub layout) in ``output_dir``."""
    # a fresh model from the config, not a deepcopy: under FSDP2 the student is a sharded FSDP module
    with init_empty_weights():
        transformer = CausalWanTransformer3DModel.from_config(pipe.transformer.config)
    transformer.load_state_dict({k: v.to("cpu", torch.float32) for k, v in student_state_dict.items()},
                                strict=True, assign=True)
    pipeline_with(pipe, transformer).save_pretrained(output_dir)


def model_card_text(args, steps: int) -> str:
    return (
        f"# RAVEN causal few-step Wan2.1 student\n\nEMA student (decay {args.ema_decay}) after {steps} RAVEN iterations "
        f"(DMD with the training-time test, history `{args.history}`, chunk weighting `{args.chunk_weighting}`, "
        f"teacher CFG {args.guidance_scale}). Load with `CausalWanPipeline.from_pretrained(...)` and stream 4-step "
        "chunks (t = 1000, 938, 833, 625).\n"
    )


# ----------------------------------------------------------------------------------------------------- FSDP2
def keep_forward_inputs(accelerator) -> None:
    """FSDP2's default mixed-precision policy casts every floating forward input to bf16: timesteps (938 -> 936),
    the float64 RoPE tables and the fp32 modulation of every block. Keep the policy's dtypes but not that cast;
    Accelerate's autocast (which the training step runs under) casts the matmuls, as on one GPU or with DDP."""
    plugin = accelerator.state.fsdp_plugin
    policy = plugin.mixed_precision_policy
    if plugin.fsdp_version == 2 and policy is not None and getattr(policy, "cast_forward_inputs", False):
        plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype, output_dtype=None,
            cast_forward_inputs=False,
        )


def shard_frozen_model(model, device) -> None:
    """FSDP2 (``fully_shard``) for a frozen model: each block, then the root, sharded over all processes."""
    model.to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


# ----------------------------------------------------------------------------------------------------- main
def main(input_args=None):
    args = parse_args(input_args) if not isinstance(input_args, argparse.Namespace) else input_args
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    # --- validate everything cheap before any heavy work or any write
    with usage_errors():
        validate_args(args)
        student_cfg, teacher_cfg, critic_cfg, vae_cfg = model_configs(args)
        check_model_configs(student_cfg, teacher_cfg, critic_cfg)
        shape = latent_shape(args, student_cfg, vae_cfg)
        dataset = None
        if args.latent_dataset:
            dataset = LatentDataset(args.latent_dataset, latent_shape=shape[1:])
            keys = dataset.keys
        else:
            keys = load_prompts(args.prompts, column=args.prompt_column)

    accelerator = make_accelerator(args)
    is_fsdp = getattr(accelerator.state, "fsdp_plugin", None) is not None
    set_seed(args.seed)
    weight_dtype = mixed_precision_dtype(accelerator)
    stream = PromptStream(keys, seed=args.seed, rank=accelerator.process_index, world_size=accelerator.num_processes)
    resume_path = resolve_resume(args)
    memory = None  # --latents_in_memory: the dataset's float16 latents on the device, indexed by key
    if args.latents_in_memory and dataset is not None and args.history in DATA_HISTORY_MODES:
        memory = dataset.all_latents().to(accelerator.device)
        logger.info("%d latents in %s memory (%.1f MB)", len(dataset), accelerator.device.type,
                    memory.numel() * memory.element_size() / 2**20)

    # --- models
    pipe, critic, teacher = load_models(args, weight_dtype)
    text_dim = pipe.text_encoder.config.d_model if pipe.text_encoder is not None else None
    check_model_configs(dict(pipe.transformer.config), dict(teacher.config), dict(critic.config), text_dim)
    student = pipe.transformer
    teacher.requires_grad_(False).eval()
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    text_device = "cpu" if args.offload_text_encoder else accelerator.device
    pipe.text_encoder.to(text_device, dtype=weight_dtype if text_device != "cpu" else torch.float32)
    pipe.vae.to(accelerator.device)
    student.train().requires_grad_(True)
    critic.train().requires_grad_(True)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
        critic.enable_gradient_checkpointing()
    compile_transformers(args, student, critic, teacher)
    if not is_fsdp:
        cast_weights(teacher, weight_dtype).to(accelerator.device)

    student_opt = make_optimizer(args, student.parameters(), args.learning_rate)
    critic_opt = make_optimizer(args, critic.parameters(), args.critic_learning_rate)
    # the generator forward (every history mode) is one module call so DDP/FSDP2 hooks see it (rollout.py)
    if is_fsdp:
        keep_forward_inputs(accelerator)
    # one model (+ its optimizer) per prepare call: FSDP2 in Accelerate allows no more
    student_train, student_opt = accelerator.prepare(GeneratorForward(student), student_opt)
    critic_train, critic_opt = accelerator.prepare(critic, critic_opt)
    if is_fsdp:  # the frozen teacher has no optimizer, which Accelerate's FSDP2 prepare requires: shard it directly
        shard_frozen_model(teacher, accelerator.device)
        register_fsdp_forward_method(student_train, "rollout")  # the rollout runs through the root's FSDP hooks
    student_module = accelerator.unwrap_model(student_train)  # the GeneratorForward (FSDP2: sharded in place)
    student = student_module.transformer
    ema = EMA(student, decay=args.ema_decay)
    progress_state = register_and_resume(accelerator, (ema, stream), resume_path)
    global_step = first_step = progress_state.global_step
    init_trackers(accelerator, args, "raven")

    # --- text embeddings (the negative prompt once)
    encode = prompt_encoder(pipe, args.max_sequence_length, text_device, accelerator.device)

    negative = args.negative_prompt if args.negative_prompt is not None else RAVEN_NEGATIVE_PROMPT
    need_negative = args.guidance_scale != 1.0 or args.rollout_guidance_scale > 1.0
    negative_text = encode([negative] * args.train_batch_size) if need_negative else None

    raven_config = RavenConfig(
        timesteps=tuple(pipe.config.denoising_timesteps), guidance_scale=args.guidance_scale,
        rollout_guidance_scale=args.rollout_guidance_scale, ttur=args.ttur, chunk_weighting=args.chunk_weighting,
        history=args.history, dmd_loss_type=args.dmd_loss_type, max_grad_norm=args.max_grad_norm,
        world_size=accelerator.num_processes,
    )
    state = TrainState(
        student=student_module, student_train=student_train, critic_train=critic_train, teacher=teacher,
        student_optimizer=student_opt, critic_optimizer=critic_opt, ema=ema, backward=accelerator.backward,
        # Accelerate's FSDP branch of clip_grad_norm_ compares parameter lists with == (fails under FSDP2)
        clip_fn=torch.nn.utils.clip_grad_norm_ if is_fsdp else accelerator.clip_grad_norm_, autocast=accelerator.autocast,
    )

    budget = TimeBudget(accelerator, args.max_train_time)
    bar = tqdm(range(args.max_train_steps), initial=global_step, desc="RAVEN",
               disable=not accelerator.is_local_main_process)
    logs = {}
    stop = False
    while global_step < args.max_train_steps and not stop:
        keys_now = stream.take(args.train_batch_size)
        prompts = [dataset.prompt(k) for k in keys_now] if dataset is not None else keys_now
        data_latents = None
        if memory is not None:
            data_latents = memory[torch.tensor([int(k) for k in keys_now], device=memory.device)].float()
        elif dataset is not None and args.history in DATA_HISTORY_MODES:
            data_latents = torch.stack([dataset.latents(k) for k in keys_now]).to(accelerator.device)
        text = encode(prompts)
        # per-iteration, per-rank seed (Alg. 1): a resumed run replays the same draws
        generator = torch.Generator().manual_seed(
            args.seed + global_step * accelerator.num_processes + accelerator.process_index)
        tic = time.perf_counter()
        logs = raven_iteration(state, global_step, text, negative_text, shape, raven_config, generator, data_latents)
        logs["first_step"] = first_step
        logs["time_iteration"] = time.perf_counter() - tic
        global_step += 1
        progress_state.global_step = global_step
        bar.update(1)
        bar.set_postfix({k: f"{logs[k]:.4g}" for k in ("critic_loss", "dmd_loss") if k in logs})
        accelerator.log(logs, step=global_step)
        if any(not math.isfinite(v) for k, v in logs.items() if k in ("critic_loss", "dmd_loss")):
            logger.warning("step %d: non-finite loss %s", global_step,
                           {k: logs[k] for k in ("critic_loss", "dmd_loss") if k in logs})
        if logs.get("skipped_generator") or logs.get("skipped_critic"):
            logger.warning("step %d: non-finite gradient, optimizer step skipped (generator=%s, critic=%s)",
                           global_step, logs.get("skipped_generator"), logs.get("skipped_critic"))
        stop = end_of_step(accelerator, args, budget, global_step)
        if (args.validation_steps and args.validation_prompts and global_step % args.validation_steps == 0
                and accelerator.is_main_process):
            log_validation(args, accelerator, pipe, student, global_step)
    bar.close()

    # --- export: the EMA student as a CausalWanPipeline folder + model card (+ Hub)
    accelerator.wait_for_everyone()
    ema.copy_to(student)  # training is over: the student now holds the EMA weights
    state_dict = accelerator.get_state_dict(student_train)  # keys "transformer.<name>" (GeneratorForward)
    state_dict = {k.removeprefix("transformer."): v for k, v in state_dict.items()} if state_dict else state_dict
    if accelerator.is_main_process:
        export_pipeline(pipe, state_dict, args.output_dir)
        repo_id = create_hub_repo(args.hub_model_id, args.hub_token) if args.push_to_hub else None
        write_model_card(args.output_dir, model_card_text(args, global_step),
                         ["text-to-video", "diffusers", "raven", "wan", "causal", "distillation"],
                         base_model=hub_base_model(args.pretrained_model_name_or_path),
                         prompt=(args.validation_prompts or [None])[0], repo_id=repo_id, token=args.hub_token)
        if repo_id is not None:
            push_folder(args.output_dir, repo_id, args.hub_token,
                        ignore_patterns=["checkpoint-*", "logs/*", "validation/*", "*.tmp"])
    accelerator.end_training()
    return logs


if __name__ == "__main__":
    run_cli(main)
