"""Wiring shared by the training scripts (``train_*.py`` at the repository root), in the diffusers examples'
conventions: argument groups and their checks, one-line usage errors, model configs read without weights, the
optimizer, atomic checkpoints and exact resume, trackers, prompt encoding, validation videos, and the export tail
(pipeline folder, model card, Hub upload). The algorithms live in :mod:`raven_video.training`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import re
import shutil
import sys
import time

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import ProjectConfiguration
from diffusers import AutoencoderKLWan
from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, load_or_create_model_card, populate_model_card
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder

from ..models.attention_layout import num_frames_problem
from ..models.transformer_causal_wan import CausalWanTransformer3DModel
from ..pipelines.pipeline_causal_wan import CausalWanPipeline
from ..testing import tiny_pipeline
from ..utils.video_io import save_video

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """Bad command-line input, found before any heavy work: the script prints one ``error: ...`` line, no traceback."""


@contextlib.contextmanager
def usage_errors():
    """Errors raised while the command line is checked are the user's to fix: re-raise them as :class:`UsageError`."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None


def run_cli(main) -> None:
    """Run a training script's ``main()``: a :class:`UsageError` exits with status 2 and one ``error:`` line."""
    try:
        main()
    except UsageError as err:
        print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr)
        sys.exit(2)


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The scripts' parser: defaults shown in ``--help``; ``@file`` reads arguments from a file, one per line (the
    recipes in ``configs/``)."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                   fromfile_prefix_chars="@")


def add_optimizer_arguments(p, *, adam_epsilon: float) -> None:
    """AdamW, precision and clipping flags shared by the training scripts (reference defaults: beta1 0, no clipping)."""
    p.add_argument("--adam_beta1", type=float, default=0.0)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_epsilon", type=float, default=adam_epsilon)
    p.add_argument("--adam_weight_decay", type=float, default=0.0)
    p.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit (CUDA).")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--mixed_precision", type=str, default=None, choices=("no", "fp16", "bf16"))
    p.add_argument("--max_grad_norm", type=float, default=1000.0, help="Reference default 1000 (= no clipping).")


def add_compile_arguments(p) -> None:
    """``--compile`` / ``--compile_backend``: small transformers are launch-bound, compiled blocks fuse their kernels."""
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the transformers' blocks in place (regional: one graph shared by all blocks, "
                        "state-dict keys unchanged); small models are launch-bound, compiled blocks fuse their "
                        "pointwise kernels.")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend of --compile.")


def compile_transformers(args, *transformers) -> None:
    """``--compile`` for causal students and their critics / teachers: ``compile_streaming`` (the static-shape halves
    of each block; the attention, whose key length and mask change with the chunk and the history, stays eager, so
    rollouts and training-time-test sequences do not recompile per position)."""
    if args.compile:
        for transformer in transformers:
            transformer.compile_streaming(backend=args.compile_backend)


def add_run_arguments(p, *, output_dir: str, checkpointing_steps: int) -> None:
    """Checkpoint, resume, logging and validation flags shared by the training scripts."""
    p.add_argument("--output_dir", type=str, default=output_dir)
    p.add_argument("--checkpointing_steps", type=int, default=checkpointing_steps)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder.")
    p.add_argument("--max_train_time", type=float, default=None,
                   help="Seconds of training after which to stop early (checkpoint and export as at the last step); "
                        "for runs in time-limited stretches.")
    p.add_argument("--report_to", type=str, default="tensorboard", choices=("tensorboard", "wandb", "none"))
    p.add_argument("--logging_dir", type=str, default="logs")
    p.add_argument("--validation_steps", type=int, default=None)
    p.add_argument("--validation_prompts", type=str, nargs="*", default=None)
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", type=str, default=None)
    p.add_argument("--hub_token", type=str, default=None)


def check_run_args(args) -> None:
    """The checks of :func:`add_run_arguments`' flags (and ``--max_train_steps``)."""
    for name in ("max_train_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)} must be >= 1.")
    if args.max_train_time is not None and not args.max_train_time > 0:
        raise ValueError(f"--max_train_time {args.max_train_time} must be > 0 seconds.")
    if args.validation_steps is not None and args.validation_steps < 1:
        raise ValueError(f"--validation_steps {args.validation_steps} must be >= 1.")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError("--report_to wandb together with --hub_token would expose the token in the run config; "
                         "log in with `huggingface-cli login` instead of passing --hub_token.")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. user/raven-wan-1.3b).")


def latent_shape(args, transformer_cfg: dict, vae_cfg: dict, batch_size: int | None = None) -> tuple:
    """``(B, C, F, H, W)`` of ``--num_frames/--height/--width`` for these configs (strides from the VAE, patch and
    chunking from the transformer); raises with the fix when they do not fit (``docs/method.md`` §1.4)."""
    temporal = int(vae_cfg.get("scale_factor_temporal", 4))
    spatial = int(vae_cfg.get("scale_factor_spatial", 8))
    multiple = spatial * int(transformer_cfg.get("patch_size", (1, 2, 2))[1])
    problem = num_frames_problem(args.num_frames, transformer_cfg.get("num_frames_per_block", 3),
                                 transformer_cfg.get("num_frames_first_block"), temporal)
    if problem:
        raise ValueError(f"--num_frames {args.num_frames} {problem}.")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value <= 0 or value % multiple:
            raise ValueError(f"--{name} {value} must be a positive multiple of {multiple} (VAE stride {spatial} x "
                             f"patch {multiple // spatial}), e.g. {max(multiple, round(value / multiple) * multiple)}.")
    frames = (args.num_frames - 1) // temporal + 1
    batch = args.train_batch_size if batch_size is None else batch_size
    return (batch, transformer_cfg["in_channels"], frames, args.height // spatial, args.width // spatial)


def _transformer_location(path: str) -> dict:
    """``{"pretrained_model_name_or_path": ..., "subfolder": ...}`` for a pipeline or a bare transformer folder."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return {"pretrained_model_name_or_path": path}
        if os.path.isfile(os.path.join(path, "transformer", "config.json")):
            return {"pretrained_model_name_or_path": path, "subfolder": "transformer"}
        raise ValueError(f"{path!r} holds neither a transformer (config.json) nor a pipeline (transformer/config.json).")
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"model path {path!r} does not exist; pass a local folder or a Hub id 'org/name'.")
    return {"pretrained_model_name_or_path": path, "subfolder": "transformer"}


def load_transformer_config(path: str, revision=None) -> dict:
    return dict(CausalWanTransformer3DModel.load_config(**_transformer_location(path), revision=revision))


def load_transformer(path: str, revision=None, **kwargs):
    """Any Wan2.1 T2V diffusers transformer into ``CausalWanTransformer3DModel`` (same parameter names)."""
    return CausalWanTransformer3DModel.from_pretrained(**_transformer_location(path), revision=revision, **kwargs)


def load_vae_config(path: str, revision=None) -> dict:
    """The ``vae/config.json`` of a pipeline folder or Hub id (read without weights)."""
    return dict(AutoencoderKLWan.load_config(path, subfolder="vae", revision=revision))


def load_vae(path: str) -> AutoencoderKLWan:
    """An ``AutoencoderKLWan`` from a pipeline folder / Hub id (its ``vae`` subfolder) or a VAE folder itself."""
    try:
        return AutoencoderKLWan.from_pretrained(path, subfolder="vae")
    except (OSError, EnvironmentError):
        return AutoencoderKLWan.from_pretrained(path)


def tiny_configs() -> tuple[dict, dict]:
    """``(transformer, vae)`` configs of ``--tiny_random_models`` (chunks of 3 latent frames)."""
    pipe = tiny_pipeline(seed=0)
    return dict(pipe.transformer.config), dict(pipe.vae.config)


def make_optimizer(args, params, lr):
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb  # optional, CUDA only
        except ImportError as err:
            raise ImportError("--use_8bit_adam needs bitsandbytes (CUDA): pip install bitsandbytes") from err
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=lr, betas=(float(args.adam_beta1), float(args.adam_beta2)), eps=args.adam_epsilon,
               weight_decay=args.adam_weight_decay)


# ----------------------------------------------------------------------------------------------------- checkpoints
class TimeBudget:
    """``--max_train_time``: every process stops after the same step once the main clock passes the budget (the
    flag is max-reduced over processes, so no rank waits in a collective the others left)."""

    def __init__(self, accelerator, seconds: float | None):
        self.accelerator = accelerator
        self.deadline = time.monotonic() + seconds if seconds else None

    def expired(self) -> bool:
        if self.deadline is None:
            return False
        flag = torch.tensor([float(time.monotonic() > self.deadline)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="max")
        return bool(flag.item())


def end_of_step(accelerator, args, budget: TimeBudget, global_step: int) -> bool:
    """The end of every training step: checkpoint every ``--checkpointing_steps``, at ``--max_train_steps`` and when
    the ``--max_train_time`` budget runs out; returns whether to stop."""
    stop = budget.expired()
    if stop:
        logger.info("--max_train_time %s s reached at step %d: stopping", args.max_train_time, global_step)
    if stop or global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
        logger.info("saved %s", save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit))
    return stop


class TrainingProgress:
    """The global step, checkpointed with ``register_for_checkpointing``."""

    def __init__(self):
        self.global_step = 0

    def state_dict(self):
        return {"global_step": self.global_step}

    def load_state_dict(self, state):
        self.global_step = int(state["global_step"])


_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoints (``checkpoint-<step>``; unfinished ``*.tmp`` saves are ignored), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(output_dir) if (m := _CKPT.match(d))]
    return [os.path.join(output_dir, d) for _, d in sorted(found)]


def check_distributed(accelerator) -> None:
    """Refuse a launcher that started several processes which Accelerate then runs as independent single processes
    (e.g. ``torchrun`` on a machine without GPUs): they would train separately and race on the same output folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"WORLD_SIZE={launched} processes were launched but Accelerate runs {accelerator.num_processes}. "
            "On CPU-only machines set ACCELERATE_USE_CPU=1 (or `accelerate launch --cpu`) so they use gloo; on GPU "
            "machines check the accelerate config."
        )


def make_accelerator(args, **kwargs):
    """The training scripts' ``Accelerator``: ``--mixed_precision``, the ``--report_to`` trackers, logs under
    ``<output_dir>/<logging_dir>``, and a launch that really is distributed (:func:`check_distributed`)."""
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=trackers(args),
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        **kwargs,
    )
    check_distributed(accelerator)
    return accelerator


def mixed_precision_dtype(accelerator) -> torch.dtype:
    """The dtype of the frozen models under the accelerator's mixed precision (bf16 / fp16, else fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit) -> str:
    """Save into ``checkpoint-<step>.tmp`` then rename: a crash mid-save never damages the last good checkpoint."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                logger.info("removing old checkpoint %s", old)
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(args) -> str | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args.output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting fresh.", args.output_dir)
            return None
        return found[-1]
    if not os.path.isdir(args.resume_from_checkpoint):
        raise FileNotFoundError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a folder.")
    return args.resume_from_checkpoint


def log_validation(args, accelerator, pipe, student, step: int) -> None:
    """Videos for the fixed validation prompts (current student), written to ``output_dir/validation`` and logged."""
    val = pipeline_with(pipe, student, device=None)
    val.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    folder = os.path.join(args.output_dir, "validation", f"step-{step}")
    os.makedirs(folder, exist_ok=True)
    videos = []
    was_training = student.training
    student.eval()
    for i, prompt in enumerate(args.validation_prompts):
        with accelerator.autocast():
            frames = val(prompt=prompt, num_frames=args.num_frames, height=args.height, width=args.width,
                         generator=generator, output_type="np", max_sequence_length=args.max_sequence_length).frames[0]
        videos.append(frames)
        save_video(frames, os.path.join(folder, f"{i:02d}.mp4"), fps=pipe.config.fps)
    student.train(was_training)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            clip = torch.from_numpy(np.stack(videos)).permute(0, 1, 4, 2, 3)  # [N, F, 3, H, W]
            try:
                tracker.writer.add_video("validation", clip, step, fps=pipe.config.fps)
            except Exception:  # add_video needs moviepy: fall back to the first frames
                tracker.writer.add_images("validation_first_frame", clip[:, 0], step)
        elif tracker.name == "wandb":
            import wandb  # optional extra

            tracker.log({"validation": [wandb.Video(os.path.join(folder, f"{i:02d}.mp4"), caption=p)
                                        for i, p in enumerate(args.validation_prompts)]}, step=step)


def register_and_resume(accelerator, objects, resume_path) -> "TrainingProgress":
    """Register ``objects`` (EMA, prompt stream, ...) and a :class:`TrainingProgress` for checkpointing, then restore
    everything from ``resume_path`` (models, optimizers, RNG states, these objects, the step) if given."""
    progress = TrainingProgress()
    for obj in (*objects, progress):
        accelerator.register_for_checkpointing(obj)
    if resume_path:
        logger.info("resuming from %s", resume_path)
        accelerator.load_state(resume_path)
    return progress


class JsonlTracker(GeneralTracker):
    """An Accelerate tracker that appends every logged step as one JSON line to ``<logging_dir>/metrics.jsonl``: the
    machine-readable curve that ``raven_video.world.recipe`` summarises and plots (tensorboard / wandb still get the
    same values). A resumed run appends; readers keep the last line of each step."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, logging_dir: str):
        super().__init__()
        self.path = os.path.join(logging_dir, "metrics.jsonl")

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(os.path.join(os.path.dirname(self.path), "config.json"), "w", encoding="utf-8") as handle:
            json.dump(values, handle, indent=1, sort_keys=True)

    def log(self, values: dict, step: int | None = None, **kwargs):
        row = {"step": step, **{k: v for k, v in values.items() if isinstance(v, (int, float, bool, str))}}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def read_metrics(logging_dir: str) -> list[dict]:
    """The rows of a :class:`JsonlTracker` file, one per step (the last written wins after a resume), by step."""
    path = os.path.join(logging_dir, "metrics.jsonl")
    rows: dict = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    rows[row.get("step")] = row
    return [rows[k] for k in sorted(rows, key=lambda s: -1 if s is None else s)]


def trackers(args) -> list:
    """``log_with`` for the Accelerator: always the JSONL curve, plus ``--report_to`` (tensorboard / wandb)."""
    chosen = [JsonlTracker(os.path.join(args.output_dir, args.logging_dir))]
    return chosen + ([args.report_to] if args.report_to != "none" else [])


def init_trackers(accelerator, args, project_name: str) -> None:
    """Create the output folder and the trackers of :func:`trackers` on the main process; the Hub token is never
    logged."""
    if not accelerator.is_main_process:
        return
    os.makedirs(args.output_dir, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "hub_token" and not isinstance(v, list)}
    config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
    accelerator.init_trackers(project_name, config=config)


def prompt_encoder(pipe, max_sequence_length: int | None, text_device, device):
    """``texts -> [N, max_sequence_length, text_dim]`` float32 UMT5 embeddings on ``device`` (no CFG branch);
    ``max_sequence_length=None``: the pipeline's own (its config, 512 for Wan)."""
    if max_sequence_length is None:
        max_sequence_length = pipe.config.max_sequence_length

    def encode(texts):
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompt=texts, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                           max_sequence_length=max_sequence_length, device=text_device)
        return embeds.to(device, torch.float32)

    return encode


class EncodedPrompts:
    """Every prompt of a dataset through ``encode`` once: ``table[keys]`` gives the ``[B, L, D]`` rows that
    ``encode([prompts of keys])`` would (the text encoder is frozen, so a row never changes). The world's 16 384
    captions make a 268 MB float32 table; encoding 128 prompts per step instead costs about as much as the world
    transformer's compiled step (tokenizer, per-prompt trimming, a launch-bound encoder).

    Args:
        encode: ``texts -> [N, L, D]`` (:func:`prompt_encoder`).
        prompts: ``{key: prompt}`` of the dataset.
        batch_size: prompts per ``encode`` call while filling the table.
    """

    def __init__(self, encode, prompts: dict, batch_size: int = 256):
        unique = sorted(set(prompts.values()))
        rows = {prompt: i for i, prompt in enumerate(unique)}
        self.index = {key: rows[prompt] for key, prompt in prompts.items()}
        self.table = torch.cat([encode(unique[i:i + batch_size]) for i in range(0, len(unique), batch_size)])

    @staticmethod
    def nbytes(num_prompts: int, max_sequence_length: int, text_dim: int) -> int:
        """Size of the float32 table of ``num_prompts`` distinct prompts (decide before building it)."""
        return num_prompts * max_sequence_length * text_dim * 4

    def __getitem__(self, keys) -> torch.Tensor:
        rows = torch.tensor([self.index[key] for key in keys], device=self.table.device)
        return self.table.index_select(0, rows)


# ----------------------------------------------------------------------------------------------------- export
def pipeline_with(pipe, transformer, device="cpu") -> CausalWanPipeline:
    """A ``CausalWanPipeline`` of ``pipe``'s components (moved to ``device`` unless ``None``) with ``transformer``."""
    components = dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae)
    if device is not None:
        components.update(text_encoder=pipe.text_encoder.to(device), vae=pipe.vae.to(device))
    return CausalWanPipeline(**components, scheduler=copy.deepcopy(pipe.scheduler), transformer=transformer,
                             denoising_timesteps=pipe.config.denoising_timesteps, fps=pipe.config.fps,
                             height=pipe.config.height, width=pipe.config.width,
                             max_sequence_length=pipe.config.max_sequence_length)


def hub_base_model(path: str | None) -> str | None:
    """``path`` if it names a Hub repo (model cards list only Hub ids as ``base_model``), else ``None``."""
    return path if path and not os.path.exists(path) else None


def write_model_card(folder: str, description: str, tags: list[str], base_model: str | None = None,
                     prompt: str | None = None, repo_id: str | None = None, token: str | None = None) -> None:
    """``folder/README.md`` from diffusers' training template; with ``repo_id`` an existing Hub card is kept and
    updated (``load_or_create_model_card``), without one the card is made locally, asking the Hub nothing."""
    kwargs = dict(license="apache-2.0", base_model=base_model, model_description=description)
    if repo_id is not None:
        card = load_or_create_model_card(repo_id, token=token, from_training=True, prompt=prompt, **kwargs)
    else:
        card = ModelCard.from_template(
            card_data=ModelCardData(license=kwargs["license"], library_name="diffusers", base_model=base_model,
                                    instance_prompt=prompt),
            template_path=MODEL_CARD_TEMPLATE_PATH, model_description=description,
        )
    populate_model_card(card, tags=tags).save(os.path.join(folder, "README.md"))


def push_folder(folder: str, repo_id: str, token: str | None, ignore_patterns: list[str] | None = None) -> None:
    """Upload an exported folder to ``repo_id`` (see :func:`create_hub_repo`)."""
    upload_folder(repo_id=repo_id, folder_path=folder, token=token, commit_message="End of training",
                  ignore_patterns=ignore_patterns)


def create_hub_repo(repo_id: str, token: str | None) -> str:
    """Create (or find) the model repo ``repo_id``; returns its full id."""
    return create_repo(repo_id, exist_ok=True, token=token).repo_id
