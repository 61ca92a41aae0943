"""``raven-convert``: an original-format Wan2.1 / Self Forcing / Causal Forcing / RAVEN transformer checkpoint ->
a diffusers folder (:func:`raven_video.models.checkpoints.convert_checkpoint`).

    raven-convert --checkpoint self_forcing_dmd.pt --output_dir ./raven-transformer --key generator_ema
"""

from __future__ import annotations

import argparse
import sys

from diffusers import WanTransformer3DModel

from ..models.checkpoints import convert_checkpoint


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="raven-convert",
        description="Convert an original-format Wan2.1 / Self Forcing / Causal Forcing / RAVEN transformer checkpoint "
        "(.pt, .pth or .safetensors) into a diffusers folder loadable with "
        "CausalWanTransformer3DModel.from_pretrained.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (.pt/.pth/.bin/.ckpt/.safetensors)")
    parser.add_argument("--output_dir", required=True, help="destination folder (must not exist unless --overwrite)")
    parser.add_argument("--key", default=None, help="container to read, e.g. generator_ema (default) or generator")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="cast weights (default: keep)")
    parser.add_argument("--num_frames_per_block", type=int, default=None, help="latent frames per causal chunk (3)")
    parser.add_argument(
        "--num_frames_first_block", type=int, default=None, help="latent frames of the first chunk (3)"
    )
    parser.add_argument("--local_attn_size", type=int, default=None, help="local attention window in latent frames")
    parser.add_argument("--sink_size", type=int, default=None, help="attention-sink size in latent frames")
    parser.add_argument("--attention_head_dim", type=int, default=None, help="head size (default 128, all Wan2.1)")
    parser.add_argument(
        "--model_class", default="causal", choices=["causal", "wan"],
        help="causal: CausalWanTransformer3DModel (default); wan: plain diffusers WanTransformer3DModel",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`raven-convert` entry point; returns the process exit code."""
    args = _parse_args(argv)
    overrides = {
        name: getattr(args, name)
        for name in (
            "num_frames_per_block", "num_frames_first_block", "local_attn_size", "sink_size", "attention_head_dim"
        )
        if getattr(args, name) is not None
    }
    if args.model_class == "wan":
        model_cls = WanTransformer3DModel
        causal_only = sorted(set(overrides) - {"attention_head_dim"})
        if causal_only:
            print(f"error: {causal_only} only apply to --model_class causal.", file=sys.stderr)
            return 2
    else:
        model_cls = None
    try:
        result = convert_checkpoint(
            args.checkpoint,
            args.output_dir,
            key=args.key,
            config_overrides=overrides,
            dtype=args.dtype,
            model_cls=model_cls,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, ImportError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(f"Converted {result.checkpoint} ({result.source_layout} layout) -> {result.output_dir}")
    print(f"  class      : {result.model_class}")
    print(f"  parameters : {result.num_parameters / 1e6:.2f} M ({', '.join(result.dtypes)})")
    print("  config     : " + ", ".join(f"{k}={v}" for k, v in result.config.items()))
    print(f"  time       : {result.seconds} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
