"""Text -> mp4 with ``CausalWanPipeline`` (the user's main entry point; ``python generate.py --help``).

Every input is validated before the model loads (the model's own config is read first, a few kB, so frame counts are
checked against its chunking); every mp4 is written to a temporary file and renamed only when the video is complete,
so a failed or interrupted generation leaves no partial file, and leftovers of killed runs are removed on the next run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time

from ..models.attention_layout import num_frames_problem

logger = logging.getLogger("raven_video.generate")

# a Hub repo id: "org/name" (huggingface_hub's rules: letters, digits, "-", "_", "."; no leading "." or "/")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class UsageError(SystemExit):
    """Bad command-line input: printed as one ``error: ...`` line, exit status 2, no traceback."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Generate videos with a causal, KV-cached Wan2.1 student (RAVEN). Without --model: the world model "
        "shipped in the package (raven_video.world.pretrained(), docs/world.md) where this installation has it, "
        "otherwise a tiny RANDOM pipeline whose output is noise (it only shows the code path runs).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("prompts", nargs="*", help="One or more prompts (each gives one video per seed).")
    p.add_argument("--prompt_file", default=None, help="Text file with one prompt per line (blank lines skipped).")
    p.add_argument("--model", default=None,
                   help="CausalWanPipeline folder or Hub id 'org/name' (None: the shipped world model if present, else "
                        "a tiny random pipeline, noise output).")
    p.add_argument("--output_dir", default="outputs", help="Where the mp4 files go (created if needed).")
    p.add_argument("--num_frames", type=int, default=81,
                   help="Pixel frames, 4k+1, fitting the model's chunks (81 = 5 s at 16 fps).")
    p.add_argument("--height", type=int, default=None, help="Multiple of 16 (None: the model's native height).")
    p.add_argument("--width", type=int, default=None, help="Multiple of 16 (None: the model's native width).")
    p.add_argument("--seed", type=int, default=0, help="Base seed; prompt i uses seed + i.")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="Student CFG (1 = unguided, the released RAVEN setting; default: the model's own, its "
                        "model_index.json `guidance_scale`).")
    p.add_argument("--negative_prompt", default=None, help="Used only when --guidance_scale > 1.")
    p.add_argument("--stream", action="store_true",
                   help="Write frames as each chunk arrives and print per-chunk timing.")
    p.add_argument("--local_attn_size", type=int, default=None,
                   help="Attention window in latent frames incl. sink (-1 unlimited) for long streams "
                        "(None: the model's).")
    p.add_argument("--sink_size", type=int, default=None,
                   help="Attention-sink latent frames for long streams (None: the model's).")
    p.add_argument("--fps", type=int, default=None, help="Output frame rate (None: the pipeline's, 16).")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="Transformer/text-encoder dtype (auto: bf16 on CUDA, fp32 on CPU; the VAE stays fp32).")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (None: cuda if available).")
    p.add_argument("--eager", action="store_true",
                   help="With --stream on CUDA, skip the real-time path (pipe.enable_realtime(): regional "
                        "torch.compile, CUDA graphs per chunk position, a fused VAE decoder overlapped on a second "
                        "stream). The first two videos then pay no compilation / graph-capture time.")
    p.add_argument("--revision", default=None, help="Hub revision for --model.")
    add_lever_arguments(p, "for --stream")
    return p.parse_args(argv)


LEVER_FLAGS = ("self_attention_kernel", "fp8", "preview", "preview_decoder", "vae_device", "transformer_split")


def add_lever_arguments(parser: argparse.ArgumentParser, when: str) -> None:
    """The ``enable_realtime`` levers as flags (generate.py and raven-demo)."""
    levers = parser.add_argument_group(
        "real-time levers", f"pipe.enable_realtime() options {when} (speeds: BENCHMARKS.md). Each falls back with one "
        "log line where its package or GPU is missing.")
    levers.add_argument("--self_attention_kernel", default=None, choices=["fa4", "cudnn", "flash", "efficient", "math",
                                                                          "fa3"],
                        help="Kernel of the streaming self-attention: fa4 = FlashAttention-4 (pip install "
                             "raven-video[fa4]; falls back to cuDNN).")
    levers.add_argument("--fp8", action="store_true",
                        help="FP8 linear layers in the transformer blocks (sm89+ GPUs; ~3%% error per layer).")
    levers.add_argument("--preview", action="store_true",
                        help="Decode with the model's own TAEHV preview decoder (its preview_decoder/ folder; the "
                             "shipped world model has one) instead of the VAE: fast, lower quality.")
    levers.add_argument("--preview_decoder", default=None, metavar="PATH",
                        help="As --preview, with this decoder: a .safetensors file in the official TAEHV layout (e.g. "
                             "taew2_1) or a TAEHVDecoder folder (train_preview_decoder.py).")
    levers.add_argument("--vae_device", default=None,
                        help="Decode on this second GPU (e.g. cuda:1), overlapped with the transformer's work.")
    levers.add_argument("--transformer_split", type=float, default=None, metavar="SHARE",
                        help="With --vae_device: run the transformer over both GPUs too, token-parallel; the first "
                             "computes this share of each chunk's tokens (0.5 was fastest on 2 H200s).")


def given_levers(args) -> list[str]:
    return [f"--{name}" for name in LEVER_FLAGS if getattr(args, name)]


def check_levers(args, model: str | None) -> dict:
    """The ``enable_realtime`` options the lever flags ask for, checked before any weight loads: ``--preview`` resolved
    to ``model``'s own ``preview_decoder/`` folder, which must exist like any ``--preview_decoder`` path. ``devices``
    holds ``(None, vae_device)`` until :func:`apply_levers` knows the transformer's device."""
    levers = {}
    if args.self_attention_kernel:
        levers["self_attention_kernel"] = args.self_attention_kernel
    if args.fp8:
        levers["fp8"] = True
    if args.vae_device is not None:
        try:
            import torch

            torch.device(args.vae_device)
        except (RuntimeError, ValueError):
            raise UsageError(f"--vae_device {args.vae_device!r} is not a device; use cuda:N.") from None
        levers["devices"] = (None, args.vae_device)
    if args.transformer_split is not None:
        if args.vae_device is None:
            raise UsageError("--transformer_split splits the transformer over the GPU it runs on and --vae_device's; "
                             "add --vae_device cuda:1.")
        if not 0.0 < args.transformer_split < 1.0:
            raise UsageError(f"--transformer_split {args.transformer_split} must be in (0, 1): the first GPU's share "
                             "of the tokens, e.g. 0.5.")
        levers["transformer_split"] = args.transformer_split
    if args.preview and args.preview_decoder:
        raise UsageError("--preview uses the model's own preview decoder, --preview_decoder PATH another one; give "
                         "one of them.")
    if args.preview:
        kind = model_kind(model)
        folder = os.path.join(model, "preview_decoder") if kind == "folder" else None
        if folder is None or not os.path.isdir(folder):
            what = {"default": "the tiny random stand-in model", "hub": f"the Hub model {model!r}"}.get(
                kind, f"--model {model!r}")
            raise UsageError(f"--preview: {what} has no preview_decoder/ folder; pass one with --preview_decoder "
                             "FILE.safetensors or a TAEHVDecoder folder.")
        levers["preview_decoder"] = folder
    elif args.preview_decoder is not None:
        path = args.preview_decoder
        if not os.path.exists(path):
            raise UsageError(f"--preview_decoder {path!r} does not exist; pass a .safetensors file or a TAEHVDecoder "
                             "folder.")
        if not (os.path.isdir(path) or path.endswith(".safetensors")):
            raise UsageError(f"--preview_decoder {path!r}: pass a .safetensors file or a TAEHVDecoder folder (pickle "
                             "files such as .pth are not loaded; convert them to safetensors).")
        levers["preview_decoder"] = path
    return levers


def apply_levers(pipe, levers: dict, compiled: bool) -> None:
    """``pipe.enable_realtime(**levers)``: the whole real-time path when ``compiled``, else the levers alone (no
    compilation, CUDA graphs or fused CUDA decoder: a CPU, or a GPU without the real-time path)."""
    if "devices" in levers:
        levers = {**levers, "devices": (pipe.transformer.device, levers["devices"][1])}
    if compiled:
        pipe.enable_realtime(**levers)
    elif levers:
        pipe.enable_realtime(compile=False, overlap_decode=False, cudnn_benchmark=False, vae_conv="diffusers",
                             vae_fuse=False, cuda_graphs=False, **levers)


def read_prompts(args) -> list[str]:
    prompts = [p for p in args.prompts]
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise UsageError(f"--prompt_file {args.prompt_file!r} does not exist; pass a text file with one prompt "
                             "per line.")
        with open(args.prompt_file, encoding="utf-8") as f:
            from_file = [line.strip() for line in f if line.strip()]
        if not from_file:
            raise UsageError(f"--prompt_file {args.prompt_file!r} holds no prompt (only blank lines); write one "
                             "prompt per line.")
        prompts += from_file
    if not prompts:
        raise UsageError("no prompt given; pass prompts as arguments or --prompt_file FILE.")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise UsageError(f"prompt #{i} is empty; every prompt must contain text.")
    return prompts


# ----------------------------------------------------------------------------------------------------- the model
def shipped_model() -> str | None:
    """The world pipeline shipped in the package (``raven_video.world.pretrained_path()``), or ``None`` where this
    installation has none (then the tiny random pipeline stands in)."""
    from ..world.shipped import pretrained_path

    try:
        return pretrained_path()
    except FileNotFoundError:
        return None


def model_kind(model: str | None) -> str:
    """``"default"``, ``"folder"`` or ``"hub"``; a path that exists nowhere is a :class:`UsageError`."""
    if model is None:
        return "default"
    if os.path.isdir(model):
        return "folder"
    if _HUB_ID.match(model) and not os.path.exists(model):
        return "hub"
    raise UsageError(f"--model {model!r} is not a folder and not a Hub id 'org/name'; pass a CausalWanPipeline folder "
                     "or a Hub id.")


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{what} {path!r} cannot be read as JSON ({err}); re-save the model "
                         "(pipe.save_pretrained) or re-download it.") from None


def model_configs(args) -> tuple[dict, dict]:
    """``(model_index, transformer config)`` of ``--model``, read before any weight (a few kB; Hub: downloaded)."""
    kind = model_kind(args.model)
    if kind == "default":
        from ..testing import tiny_pipeline

        pipe = tiny_pipeline(seed=0)
        return dict(pipe.config), dict(pipe.transformer.config)
    if kind == "folder":
        index_path = os.path.join(args.model, "model_index.json")
        config_path = os.path.join(args.model, "transformer", "config.json")
        if not os.path.isfile(index_path) or not os.path.isfile(config_path):
            raise UsageError(f"--model {args.model!r} is not a CausalWanPipeline folder (model_index.json and "
                             "transformer/config.json expected); convert a checkpoint with `raven-convert` first.")
    else:
        from huggingface_hub import hf_hub_download

        try:
            index_path = hf_hub_download(args.model, "model_index.json", revision=args.revision)
            config_path = hf_hub_download(args.model, "transformer/config.json", revision=args.revision)
        except Exception as err:  # noqa: BLE001 - offline, private, missing: one line with the cause
            raise UsageError(f"--model {args.model!r}: cannot fetch its config from the Hub ({type(err).__name__}: "
                             f"{err}); check the id, your network or HF_HUB_OFFLINE.") from None
    return _read_json(index_path, "model_index.json"), _read_json(config_path, "transformer config")


def check_args(args) -> dict:
    """Every check that needs no weights; returns the pipeline config (``model_index.json``) with the defaults the
    run will use. Raises :class:`UsageError` with the fix."""
    if args.output_dir and os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir!r} is a file; pass a folder (it is created if needed).")
    if args.fps is not None and args.fps <= 0:
        raise UsageError(f"--fps {args.fps} must be a positive frame rate, e.g. 16 (or leave it out: the model's).")
    if args.guidance_scale is not None and (not math.isfinite(args.guidance_scale) or args.guidance_scale < 1):
        raise UsageError(f"--guidance_scale {args.guidance_scale} must be a finite number >= 1 (1 = unguided).")
    if args.model is None:
        args.model = shipped_model()
    index, config = model_configs(args)
    problem = num_frames_problem(args.num_frames, int(config.get("num_frames_per_block", 3)),
                                 config.get("num_frames_first_block"))
    if problem:
        raise UsageError(f"--num_frames {args.num_frames} {problem}.")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 16):
            raise UsageError(f"--{name} {value} must be a positive multiple of 16, e.g. {max(16, round(value / 16) * 16)}.")
    check_device(args.device)
    given = given_levers(args)
    if given and not args.stream:
        raise UsageError(f"{', '.join(given)} are real-time options of --stream; add --stream.")
    if given and args.eager:
        raise UsageError(f"{', '.join(given)} need the real-time path, which --eager turns off; drop --eager.")
    args.levers = check_levers(args, args.model)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--output_dir {args.output_dir!r} cannot be created ({err.strerror}).") from None
    if not os.access(args.output_dir, os.W_OK):
        raise UsageError(f"--output_dir {args.output_dir!r} is not writable.")
    return index


def check_device(device: str | None) -> None:
    import torch

    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N.") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu "
                             "or install a CUDA build of torch.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible.")
    elif parsed.type != "cpu":
        raise UsageError(f"--device {device!r}: use cpu, cuda or cuda:N.")


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
        pipe = tiny_pipeline(seed=0, dtype=dtype)
    else:
        try:
            # the VAE stays float32 (loaded as such, not rounded through bf16)
            pipe = CausalWanPipeline.from_pretrained(args.model, revision=args.revision,
                                                     dtype={"default": dtype, "vae": torch.float32})
        except (OSError, ValueError) as err:
            raise UsageError(f"could not load --model {args.model!r}: {err}") from None
    return pipe.to(device)


def check_world_prompts(model: str | None, prompts: list[str]) -> None:
    """A world model (its tokenizer is the world's closed vocabulary, ``raven_video.world.captions``) maps any other
    word to ``<unk>`` and draws something unrelated: name the unknown words and show a caption, before any weight."""
    if model is None or not os.path.isfile(os.path.join(model, "tokenizer", "tokenizer.json")):
        return
    from ..world.captions import VOCABULARY, tokenize

    vocab = _read_json(os.path.join(model, "tokenizer", "tokenizer.json"), "tokenizer").get("model", {}).get("vocab")
    if not isinstance(vocab, dict) or not set(VOCABULARY) <= set(vocab) or len(vocab) > len(VOCABULARY) + 8:
        return  # not a world tokenizer
    for prompt in prompts:
        unknown = sorted({word for word in tokenize(prompt) if word not in vocab})
        if unknown:
            raise UsageError(f"prompt {prompt!r}: {', '.join(repr(w) for w in unknown)} not in the world model's "
                             "vocabulary; write a world caption, e.g. \"a red circle moves right quickly and bounces off "
                             "the wall, on a black background\" (docs/world.md).")


def slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "video"


def main(argv=None) -> list[str]:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    prompts = read_prompts(args)
    index = check_args(args)
    check_world_prompts(args.model if model_kind(args.model) == "folder" else None, prompts)
    height = args.height or index.get("height", 480)
    width = args.width or index.get("width", 832)

    import torch

    from ..utils.video_io import AtomicVideoWriter, cleanup_partial_files

    removed = cleanup_partial_files(args.output_dir)
    if removed:
        logger.info(f"removed {removed} partial video file(s) left in {args.output_dir} by an interrupted run")
    pipe = load_pipeline(args)
    compiled = args.stream and not args.eager and pipe.device.type == "cuda"
    if compiled:
        logger.info("Real-time path on: the first video includes torch.compile time and the second CUDA-graph "
                    "capture (warm-up); use --eager to skip.")
    apply_levers(pipe, args.levers, compiled)  # on CPU: the levers alone
    fps = args.fps or pipe.config.fps
    if args.guidance_scale is None:
        args.guidance_scale = pipe.default_guidance_scale
        if args.guidance_scale != 1.0:
            logger.info(f"guidance scale {args.guidance_scale:g} (the model's default; --guidance_scale 1 samples "
                        "unguided, about 2x faster)")
    window = dict(local_attn_size=args.local_attn_size, sink_size=args.sink_size)
    # Validate against the loaded model before generating anything.
    try:
        pipe.check_inputs(prompts[0], args.negative_prompt, args.num_frames, height, width, None,
                          args.guidance_scale, args.local_attn_size, args.sink_size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    written = []
    for i, prompt in enumerate(prompts):
        path = os.path.join(args.output_dir, f"{i:03d}_{slug(prompt)}.mp4")
        generator = torch.Generator(device="cpu").manual_seed(args.seed + i)
        common = dict(prompt=prompt, negative_prompt=args.negative_prompt, num_frames=args.num_frames,
                      height=height, width=width, guidance_scale=args.guidance_scale, generator=generator, **window)
        tic = time.perf_counter()
        with AtomicVideoWriter(path, fps=fps) as writer:
            if args.stream:
                frames_done = 0
                for chunk in pipe.stream(**common, output_type="np"):
                    writer.append(chunk.frames[0])
                    n = chunk.frames.shape[1]
                    frames_done += n
                    first = f"; first frame at {time.perf_counter() - tic:.2f} s" if chunk.index == 0 else ""
                    logger.info(f"  chunk {chunk.index}: {n} frames in {chunk.seconds * 1000:.0f} ms "
                                f"({n / chunk.seconds:.1f} FPS){first}")
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
