#!/usr/bin/env python
"""CM-GRPO: reinforcement fine-tuning of a causal few-step Wan student with LoRA (``docs/method.md`` §4, Alg. 2).

    accelerate launch --multi_gpu --num_processes 8 train_cm_grpo.py \
        --pretrained_model_name_or_path <RAVEN CausalWanPipeline folder> --prompts prompts.txt \
        --reward_weights dynamic_degree=0.35,text_alignment=2,aesthetic=1,imaging=1,motion_smoothness=0.75 \
        --vbench_cache_dir /data/vbench_cache --reward_checkpoints rewards.json --sync_group_size 8 --output_dir cmgrpo-out

The algorithm lives in ``raven_video.training.cm_grpo_step`` (rollouts, rewards, advantages, kernel regression); this
script is wiring: arguments, models, LoRA, Accelerate, checkpoints, logging, validation and the three export flavours
(LoRA adapter, base + LoRA bundle, merged pipeline). Shared wiring comes from ``raven_video.cli.training``. See
``docs/cm_grpo.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time

import torch
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from diffusers.training_utils import _collate_lora_metadata
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm

from raven_video.cli.training import (
    TimeBudget,
    UsageError,
    add_optimizer_arguments,
    add_run_arguments,
    argument_parser,
    check_run_args,
    create_hub_repo,
    end_of_step,
    hub_base_model,
    init_trackers,
    latent_shape,
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
from raven_video.data.prompts import PromptStream, load_prompts
from raven_video.models.transformer_causal_wan import cast_weights
from raven_video.pipelines.pipeline_causal_wan import CausalWanPipeline
from raven_video.rewards.composer import AGGREGATIONS, RewardComposer, checkpoints_from_vbench_cache, \
    parse_reward_weights
from raven_video.testing import tiny_pipeline
from raven_video.training.chunk_weighting import parse_chunk_weighting
from raven_video.training.cm_grpo_step import (
    DEFAULT_LORA_TARGET_MODULES,
    POLICY_KERNELS,
    CMGRPOConfig,
    CMGRPOState,
    adapters_disabled_reference,
    cm_grpo_step,
    lora_config,
    lora_parameter_names,
)
from raven_video.training.ema import EMA
from raven_video.training.rollout import GeneratorForward

logger = logging.getLogger("train_cm_grpo")

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
BUNDLE_DIR = "base_plus_lora"
MERGED_DIR = "merged"


# ----------------------------------------------------------------------------------------------------- arguments
def parse_args(input_args=None):
    p = argument_parser("CM-GRPO with LoRA on a causal Wan student (docs/method.md §4, Alg. 2).")
    # models
    p.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="CausalWanPipeline folder or Hub id: the policy init (RAVEN EMA) + text encoder, VAE, tokenizer.")
    p.add_argument("--revision", type=str, default=None)
    p.add_argument("--tiny_random_models", action="store_true", help="Tiny random pipeline (CPU smoke runs, tests).")
    # LoRA (docs/method.md §4.1)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--lora_alpha", type=float, default=256.0)
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--lora_target_modules", type=str, default=",".join(DEFAULT_LORA_TARGET_MODULES),
                   help="Comma-separated Linear names (suffix match). Default: the paper's 16 module types (all linear layers).")
    # data
    p.add_argument("--prompts", type=str, default=None, help="txt / csv / parquet / jsonl file, folder or Hub dataset.")
    p.add_argument("--prompt_column", type=str, default="prompt")
    p.add_argument("--num_frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--max_sequence_length", type=int, default=None,
                   help="Text tokens (zero-padded); default: the pipeline's config (512 for Wan).")
    # rollouts (Alg. 2 l.1-13)
    p.add_argument("--group_size", type=int, default=4, help="Rollouts of the prompt per process per step.")
    p.add_argument("--groups_per_infer", type=int, default=4, help="Rollouts per inference call (batch).")
    p.add_argument("--sync_group_size", type=int, default=1,
                   help="Consecutive processes sharing one prompt: a group spans group_size * sync_group_size rollouts.")
    p.add_argument("--rollout_guidance_scale", type=float, default=1.0,
                   help="Student CFG in rollouts; 1 = unguided (default, docs/method.md §5), 3.0 reproduces the reference code's guided rollouts.")
    p.add_argument("--negative_prompt", type=str, default="", help="Negative prompt of guided rollouts (ref: empty).")
    # rewards (Alg. 2 l.14-20, docs/rewards_eval.md)
    p.add_argument("--reward_weights", type=str, default="proxy_motion=1",
                   help="e.g. dynamic_degree=0.35,text_alignment=2,aesthetic=1,imaging=1,motion_smoothness=0.75")
    p.add_argument("--reward_aggregation", type=str, default="normalize_then_sum", choices=AGGREGATIONS)
    p.add_argument("--reward_checkpoints", type=str, default=None,
                   help="JSON file {reward: path or {constructor kwargs}} for the learned rewards (docs/rewards_eval.md).")
    p.add_argument("--vbench_cache_dir", type=str, default=None,
                   help="$VBENCH_CACHE_DIR: fills the checkpoints of dynamic_degree, motion_smoothness, aesthetic, imaging.")
    p.add_argument("--reward_device", type=str, default=None, help="Default: the training device.")
    p.add_argument("--allow_pickle", action="store_true",
                   help="Consent to unpickle reward checkpoints that torch.load(weights_only=True) refuses (e.g. an "
                        "official .pth holding Python objects). Unpickling runs code stored in the file: trusted "
                        "files only.")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--adv_clip_max", type=float, default=5.0)
    # policy objective (Alg. 2 l.22; Eq. 9)
    p.add_argument("--policy_kernel", type=str, default="consistency", choices=POLICY_KERNELS,
                   help="consistency (CM-GRPO) or euler_maruyama (Flow-GRPO SDE baseline; rollouts sample it).")
    p.add_argument("--noise_level", type=float, default=0.7, help="Euler-Maruyama noise level (Flow-GRPO: 0.7).")
    p.add_argument("--skip_timesteps", type=int, default=1, help="Never train the last skip_timesteps transitions.")
    p.add_argument("--chunk_weighting", type=str, default="-1", help="docs/method.md §3.5 (alpha = -1: later chunks weigh more).")
    p.add_argument("--policy_loss_scaling", type=float, default=100.0)
    p.add_argument("--beta", type=float, default=0.0,
                   help="KL to the reference consistency model (= base model, adapters disabled), Eq. 10.")
    p.add_argument("--slices_per_step", type=int, default=2, help="Rollouts per forward/backward (micro-batch).")
    # optimisation (docs/method.md §5)
    p.add_argument("--learning_rate", type=float, default=5e-6)
    add_optimizer_arguments(p, adam_epsilon=1e-10)
    p.add_argument("--ema_decay", type=float, default=0.9675, help="EMA of the LoRA parameters, per optimizer step.")
    p.add_argument("--export_weights", type=str, default="ema", choices=("ema", "raw"),
                   help="Which LoRA weights the exports hold (docs/method.md §5: the release's choice is unverified).")
    p.add_argument("--offload_text_encoder", action="store_true", help="Keep the text encoder on the CPU.")
    p.add_argument("--max_train_steps", type=int, default=160)
    p.add_argument("--seed", type=int, default=20001019)
    # checkpoints, logging, validation, export
    add_run_arguments(p, output_dir="cm-grpo-output", checkpointing_steps=80)  # --push_to_hub: the adapter to
    # --hub_model_id, the bundle to <id>-bundle, the merged model to <id>-merged
    p.add_argument("--no_merged_export", action="store_true", help="Skip the merged pipeline folder.")
    p.add_argument("--no_bundle_export", action="store_true", help="Skip the base + LoRA bundle folder.")
    args = p.parse_args(input_args)
    args.local_rank = int(os.environ.get("LOCAL_RANK", -1))
    return args


# ----------------------------------------------------------------------------------------------------- validation
def validate_args(args, world_size: int = 1) -> None:
    """Cheap checks of the flags alone, before any file or model is touched. Errors name the value and the fix."""
    if not args.tiny_random_models and not args.pretrained_model_name_or_path:
        raise ValueError("--pretrained_model_name_or_path is required (the RAVEN CausalWanPipeline folder), "
                         "or pass --tiny_random_models for a smoke run.")
    if args.prompts is None:
        raise ValueError("no prompt source: pass --prompts (txt/csv/parquet/jsonl or a Hub dataset).")
    if args.group_size < 1 or args.sync_group_size < 1:
        raise ValueError(f"--group_size {args.group_size} and --sync_group_size {args.sync_group_size} must be >= 1.")
    if args.group_size * args.sync_group_size < 2:
        raise ValueError(
            f"a group of {args.group_size * args.sync_group_size} rollout (--group_size {args.group_size} x "
            f"--sync_group_size {args.sync_group_size}): group-relative advantages need >= 2 rollouts per prompt; "
            "raise --group_size (RAVEN: 4 per process x 8 processes)."
        )
    if args.reward_aggregation == "normalize_then_sum" and args.group_size < 2:
        raise ValueError(
            f"--reward_aggregation normalize_then_sum z-scores each reward over the --group_size {args.group_size} "
            "rollouts of this process (Alg. 2 l.17): with 1 every reward is 0. Use --group_size >= 2 or "
            "--reward_aggregation weighted_sum."
        )
    if world_size % args.sync_group_size:
        raise ValueError(f"--sync_group_size {args.sync_group_size} must divide the number of processes "
                         f"({world_size}).")
    parse_reward_weights(args.reward_weights)
    parse_chunk_weighting(args.chunk_weighting)
    CMGRPOConfig(group_size=args.group_size, groups_per_infer=args.groups_per_infer, policy_kernel=args.policy_kernel,
                 noise_level=args.noise_level, skip_timesteps=args.skip_timesteps, beta=args.beta,
                 slices_per_step=args.slices_per_step)
    check_run_args(args)
    if args.rank < 1:
        raise ValueError(f"--rank {args.rank} must be >= 1 (CM-GRPO: 256).")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate {args.learning_rate} must be > 0 (CM-GRPO: 5e-6).")
    if not args.adv_clip_max > 0:
        raise ValueError(f"--adv_clip_max {args.adv_clip_max} must be > 0 (CM-GRPO: 5).")
    if not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError(f"--ema_decay {args.ema_decay} must be in [0, 1] (CM-GRPO: 0.9675).")
    if args.rollout_guidance_scale < 1.0:
        raise ValueError(f"--rollout_guidance_scale {args.rollout_guidance_scale} must be >= 1 (1 = unguided).")
    if not [m for m in args.lora_target_modules.split(",") if m.strip()]:
        raise ValueError("--lora_target_modules is empty; give Linear names, e.g. attn1.to_q,attn1.to_k.")
    if args.reward_checkpoints and not os.path.isfile(args.reward_checkpoints):
        raise FileNotFoundError(f"--reward_checkpoints {args.reward_checkpoints!r} is not a file (expected JSON).")


def reward_checkpoints(args) -> dict:
    ckpts = {}
    if args.vbench_cache_dir:
        ckpts.update(checkpoints_from_vbench_cache(args.vbench_cache_dir))
    if args.reward_checkpoints:
        with open(args.reward_checkpoints) as fh:
            ckpts.update(json.load(fh))
    return ckpts


def video_latent_shape(args) -> tuple:
    """``(C, F, H, W)`` of one video, from the model configs (read without weights); validates the chunking."""
    if args.tiny_random_models:
        transformer_cfg, vae_cfg = tiny_configs()
    else:
        path = args.pretrained_model_name_or_path
        if not os.path.isdir(path) and path.startswith((".", "/", "~")):
            raise FileNotFoundError(f"--pretrained_model_name_or_path {path!r} does not exist.")
        transformer_cfg, vae_cfg = load_transformer_config(path, args.revision), load_vae_config(path, args.revision)
    return latent_shape(args, transformer_cfg, vae_cfg, batch_size=1)[1:]


# ----------------------------------------------------------------------------------------------------- models
def load_pipeline(args):
    if args.tiny_random_models:
        return tiny_pipeline(seed=0)
    return CausalWanPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision)


def add_lora(transformer, args) -> list:
    """Freeze the base, inject the LoRA adapter (``docs/method.md`` §4.1); returns the trainable LoRA parameters
    (fp32)."""
    targets = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
    linear_names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear_names)]
    if unmatched:
        raise ValueError(f"--lora_target_modules {unmatched} match no Linear layer of the transformer; "
                         f"Linear names look like {linear_names[:6]}.")
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(args.rank, args.lora_alpha, targets, args.lora_dropout))
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
        p.data = p.data.float()
    return params


def lora_state_dict(transformer) -> dict:
    return {k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in get_peft_model_state_dict(transformer).items()}


def save_lora(pipeline_cls, transformer, folder: str, state_dict=None) -> None:
    """``pytorch_lora_weights.safetensors`` in diffusers format (keys ``transformer.<...>.lora_A.weight``, metadata)."""
    pipeline_cls.save_lora_weights(folder, transformer_lora_layers=state_dict or lora_state_dict(transformer),
                                   weight_name=LORA_WEIGHT_NAME,
                                   **_collate_lora_metadata({"transformer": transformer}))


def load_lora_into(transformer, folder: str) -> None:
    state = CausalWanPipeline.lora_state_dict(folder, weight_name=LORA_WEIGHT_NAME)
    state = state[0] if isinstance(state, tuple) else state
    state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    result = set_peft_model_state_dict(transformer, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA checkpoint {folder} has keys the model lacks: {unexpected[:5]} (different "
                         "--lora_target_modules or --rank than the saved run?).")


# ----------------------------------------------------------------------------------------------------- export
def export_all(args, pipe, base_transformer, lora_sd: dict, output_dir: str) -> dict:
    """The three export flavours the reference code's README describes. Returns ``{flavour: folder}``.

    * ``output_dir/pytorch_lora_weights.safetensors`` -- the adapter alone: ``pipe.load_lora_weights(output_dir)``;
    * ``output_dir/base_plus_lora/`` -- the base ``CausalWanPipeline`` + the adapter file next to it;
    * ``output_dir/merged/`` -- the adapter fused into the transformer (``fuse_lora`` + ``unload_lora``).
    """
    cls = type(pipe)
    folders = {"lora": output_dir}
    save_lora(cls, base_transformer, output_dir, lora_sd)
    if not args.no_bundle_export:
        bundle = os.path.join(output_dir, BUNDLE_DIR)
        base = copy.deepcopy(base_transformer).to("cpu", torch.float32)
        base.unload_lora()
        pipeline_with(pipe, base).save_pretrained(bundle)
        save_lora(cls, base_transformer, bundle, lora_sd)
        folders["bundle"] = bundle
    if not args.no_merged_export:
        merged_dir = os.path.join(output_dir, MERGED_DIR)
        merged = copy.deepcopy(base_transformer).to("cpu", torch.float32)  # holds the exported LoRA weights
        merged.fuse_lora(lora_scale=1.0)
        merged.unload_lora()
        pipeline_with(pipe, merged).save_pretrained(merged_dir)
        folders["merged"] = merged_dir
    return folders


def model_card_text(args, flavour: str, steps: int) -> str:
    base = args.pretrained_model_name_or_path
    recipe = (f"CM-GRPO (docs/method.md §4) for {steps} steps: LoRA r={args.rank}, alpha={args.lora_alpha}; "
              f"{args.export_weights.upper()} LoRA weights (decay {args.ema_decay}); policy kernel "
              f"`{args.policy_kernel}`; rewards `{args.reward_weights}` ({args.reward_aggregation}); group "
              f"{args.group_size} x {args.sync_group_size} processes; chunk weighting `{args.chunk_weighting}`.")
    title, code = {
        "lora": ("LoRA adapter (diffusers format)",
                 "```python\nfrom raven_video import CausalWanPipeline\n\npipe = CausalWanPipeline.from_pretrained("
                 f"\"{base or '<base CausalWanPipeline>'}\")\npipe.load_lora_weights(\"<this repo or folder>\")\n"
                 "# optional: pipe.fuse_lora(); pipe.unload_lora_weights()\n```"),
        "bundle": ("base pipeline + LoRA adapter",
                   "```python\nfrom raven_video import CausalWanPipeline\n\npipe = CausalWanPipeline.from_pretrained("
                   "\"<this folder>\")   # the base\npipe.load_lora_weights(\"<this folder>\")   # "
                   f"{LORA_WEIGHT_NAME} next to it\n```"),
        "merged": ("merged pipeline (LoRA fused into the transformer)",
                   "```python\nfrom raven_video import CausalWanPipeline\n\npipe = CausalWanPipeline.from_pretrained("
                   "\"<this folder>\")\n```"),
    }[flavour]
    return (f"# RAVEN CM-GRPO: {title}\n\n{recipe}\n\nLoad:\n\n{code}\n\nStream 4-step chunks "
            "(t = 1000, 938, 833, 625), guidance 1.0.\n")


# ----------------------------------------------------------------------------------------------------- main
def main(input_args=None):
    args = parse_args(input_args) if not isinstance(input_args, argparse.Namespace) else input_args
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    # --- validate everything cheap before any heavy work or any write
    with usage_errors():
        validate_args(args, world_size=int(os.environ.get("WORLD_SIZE", 1)))
        shape = video_latent_shape(args)
        prompts = load_prompts(args.prompts, column=args.prompt_column)

    accelerator = make_accelerator(args, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        raise UsageError("train_cm_grpo.py trains a LoRA adapter with DDP (the 1.3B base fits every GPU); launch "
                         "with a MULTI_GPU accelerate config, not FSDP.")
    with usage_errors():
        validate_args(args, world_size=accelerator.num_processes)
    set_seed(args.seed)
    weight_dtype = mixed_precision_dtype(accelerator)
    stream = PromptStream(prompts, seed=args.seed, rank=accelerator.process_index,
                          world_size=accelerator.num_processes, sync_group_size=args.sync_group_size)
    resume_path = resolve_resume(args)
    with usage_errors():
        composer = RewardComposer(args.reward_weights, aggregation=args.reward_aggregation, build_missing=True,
                                  checkpoints=reward_checkpoints(args), device=args.reward_device or accelerator.device,
                                  allow_pickle=args.allow_pickle)

    # --- models: frozen base in weight_dtype, fp32 LoRA
    pipe = load_pipeline(args)
    policy = pipe.transformer
    pipe.vae.requires_grad_(False).to(accelerator.device)
    pipe.text_encoder.requires_grad_(False)
    text_device = "cpu" if args.offload_text_encoder else accelerator.device
    pipe.text_encoder.to(text_device, dtype=weight_dtype if text_device != "cpu" else torch.float32)
    cast_weights(policy, weight_dtype).to(accelerator.device)  # frozen base; fp32 norms / modulation kept
    with usage_errors():
        lora_params = add_lora(policy, args)
    if args.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    optimizer = make_optimizer(args, lora_params, args.learning_rate)
    policy_train, optimizer = accelerator.prepare(GeneratorForward(policy), optimizer)
    policy_module = accelerator.unwrap_model(policy_train)  # the GeneratorForward
    policy = policy_module.transformer
    ema = EMA(policy, decay=args.ema_decay, names=lora_parameter_names(policy))

    # checkpoints hold the LoRA weights only (diffusers format), not the frozen base
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_lora(type(pipe), accelerator.unwrap_model(model).transformer, output_dir)
        while weights:
            weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            load_lora_into(accelerator.unwrap_model(models.pop()).transformer, input_dir)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    progress_state = register_and_resume(accelerator, (ema, stream), resume_path)
    global_step = first_step = progress_state.global_step
    init_trackers(accelerator, args, "cm-grpo")
    encode = prompt_encoder(pipe, args.max_sequence_length, text_device, accelerator.device)

    negative_text = encode([args.negative_prompt]) if args.rollout_guidance_scale > 1.0 else None
    config = CMGRPOConfig(
        timesteps=tuple(pipe.config.denoising_timesteps), group_size=args.group_size,
        groups_per_infer=args.groups_per_infer, policy_kernel=args.policy_kernel, noise_level=args.noise_level,
        skip_timesteps=args.skip_timesteps, chunk_weighting=args.chunk_weighting,
        policy_loss_scaling=args.policy_loss_scaling, beta=args.beta, adv_clip_max=args.adv_clip_max,
        slices_per_step=args.slices_per_step, rollout_guidance_scale=args.rollout_guidance_scale,
        max_grad_norm=args.max_grad_norm, world_size=accelerator.num_processes, fps=args.fps,
    )
    state = CMGRPOState(
        policy=policy_module, policy_train=policy_train, vae=pipe.vae, composer=composer, optimizer=optimizer, ema=ema,
        backward=accelerator.backward, clip_fn=accelerator.clip_grad_norm_, autocast=accelerator.autocast,
        no_sync=accelerator.no_sync if accelerator.num_processes > 1 else None,
        reference=adapters_disabled_reference(policy) if args.beta > 0 else None,
    )

    budget = TimeBudget(accelerator, args.max_train_time)
    bar = tqdm(range(args.max_train_steps), initial=global_step, desc="CM-GRPO",
               disable=not accelerator.is_local_main_process)
    logs = {}
    stop = False
    while global_step < args.max_train_steps and not stop:
        prompt = stream.take(1)[0]
        text = encode([prompt])
        # per-step, per-rank seed: a resumed run replays the same draws; ranks of a sync group differ
        generator = torch.Generator().manual_seed(
            args.seed + global_step * accelerator.num_processes + accelerator.process_index)
        tic = time.perf_counter()
        logs = cm_grpo_step(state, prompt, text, negative_text, shape, config, generator)
        logs["first_step"] = first_step
        logs["time_step"] = time.perf_counter() - tic
        global_step += 1
        progress_state.global_step = global_step
        bar.update(1)
        bar.set_postfix({k: f"{logs[k]:.4g}" for k in ("policy_loss", "grad_norm") if k in logs})
        accelerator.log(logs, step=global_step)
        if logs.get("skipped"):
            logger.warning("step %d: non-finite loss/gradient, optimizer step skipped", global_step)
        stop = end_of_step(accelerator, args, budget, global_step)
        if (args.validation_steps and args.validation_prompts and global_step % args.validation_steps == 0
                and accelerator.is_main_process):
            log_validation(args, accelerator, pipe, policy, global_step)
    bar.close()

    # --- export: adapter, base + adapter bundle, merged pipeline; a model card each (+ Hub)
    accelerator.wait_for_everyone()
    if args.export_weights == "ema":
        ema.copy_to(policy)  # training is over: the policy now holds the EMA LoRA weights
    if accelerator.is_main_process:
        folders = export_all(args, pipe, policy, lora_state_dict(policy), args.output_dir)
        suffix = {"lora": "", "bundle": "-bundle", "merged": "-merged"}
        tags = ["text-to-video", "diffusers", "raven", "cm-grpo", "wan", "causal", "reinforcement-learning"]
        for flavour, folder in folders.items():
            repo_id = create_hub_repo(args.hub_model_id + suffix[flavour], args.hub_token) if args.push_to_hub else None
            write_model_card(folder, model_card_text(args, flavour, global_step),
                             tags + (["lora"] if flavour != "merged" else []),
                             base_model=hub_base_model(args.pretrained_model_name_or_path),
                             prompt=(args.validation_prompts or [None])[0], repo_id=repo_id, token=args.hub_token)
            if repo_id is not None:
                ignore = ["checkpoint-*", "logs/*", "validation/*", "*.tmp", f"{BUNDLE_DIR}/*", f"{MERGED_DIR}/*"]
                push_folder(folder, repo_id, args.hub_token, ignore_patterns=ignore if flavour == "lora" else None)
    accelerator.end_training()
    return logs


if __name__ == "__main__":
    run_cli(main)
