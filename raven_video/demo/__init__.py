# Copyright 2026 The RAVEN-video authors. Apache-2.0.
"""Browser demo: ``raven-demo`` / ``python -m raven_video.demo`` serves a page that streams a ``CausalWanPipeline``
chunk by chunk at the video's frame rate, with live prompt switching (docs/demo.md). Needs the ``demo`` extra
(``pip install -e .[demo]``: Starlette, uvicorn, websockets)."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("raven_video.demo")

__all__ = ["create_app", "load_demo_pipeline", "main", "parse_args"]


def create_app(*args, **kwargs):
    """See :func:`raven_video.demo.app.create_app` (imported lazily: Starlette is an optional extra)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="raven-demo",
        description="Browser demo: type a prompt and watch the video stream at its frame rate; switch the prompt "
                    "while it runs. Without --model: the world model shipped in the package (docs/world.md), else "
                    "a tiny RANDOM pipeline whose output is noise.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None, help="CausalWanPipeline folder or Hub id 'org/name' (None: the shipped "
                                                 "world model, else a tiny random pipeline).")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (None: cuda if available).")
    p.add_argument("--realtime", action="store_true",
                   help="pipe.enable_realtime() (CUDA only): compiled blocks, CUDA graphs, overlapped VAE decode. The "
                        "first two streams are slow (compilation, graph capture).")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="Student CFG (None: the model's own, its model_index.json 'guidance_scale', else 1 = "
                        "unguided; as generate.py).")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="Transformer/text-encoder dtype (auto: bf16 on CUDA, fp32 on CPU).")
    p.add_argument("--height", type=int, default=None, help="Multiple of 16 (None: the model's native height).")
    p.add_argument("--width", type=int, default=None, help="Multiple of 16 (None: the model's native width).")
    p.add_argument("--max_waiting", type=int, default=4,
                   help="Clients that may wait for the GPU while one streams; more are refused.")
    p.add_argument("--no_video", action="store_true",
                   help="Do not record the mp4 of what was shown (no encoding work, no download button).")
    p.add_argument("--revision", default=None, help="Hub revision for --model.")
    p.add_argument("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0: every interface).")
    p.add_argument("--port", type=int, default=7860, help="TCP port.")
    from ..cli.generate import add_lever_arguments

    add_lever_arguments(p, "(all but --preview / --preview_decoder need --realtime)")
    return p.parse_args(argv)


def load_demo_pipeline(model: str | None = None, device: str | None = None, dtype: str = "auto",
                       revision: str | None = None):
    """``(pipeline, model folder or None)`` with generate.py's loading rules: ``model=None`` means the shipped world
    model, or the tiny random pipeline where this installation has none (said in one line)."""
    from ..cli import generate

    if model is None:
        model = generate.shipped_model()
        if model is None:
            print("raven-demo: no shipped world model in this installation yet (raven_video/world/weights/pipeline); "
                  "using a tiny RANDOM pipeline (noise output) - pass --model PATH_OR_HUB_ID for real video.",
                  file=sys.stderr)
    kind = generate.model_kind(model)  # UsageError for a path that exists nowhere
    generate.check_device(device)
    args = argparse.Namespace(model=model, device=device, dtype=dtype, revision=revision)
    pipe = generate.load_pipeline(args)
    return pipe, (model if kind == "folder" else None)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    from ..cli.generate import UsageError

    try:
        import uvicorn

        from .app import DemoSettings, create_app as _create_app
    except ImportError as err:
        raise UsageError(f"the demo needs its extra ({err.name} is missing): pip install -e '.[demo]'") from None
    if args.guidance_scale is not None and not (args.guidance_scale >= 1 and args.guidance_scale < float("inf")):
        raise UsageError(f"--guidance_scale {args.guidance_scale} must be a finite number >= 1 (1 = unguided).")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 16):
            raise UsageError(f"--{name} {value} must be a positive multiple of 16.")
    if args.max_waiting < 0:
        raise UsageError(f"--max_waiting {args.max_waiting} must be >= 0.")
    from ..cli import generate

    gpu_levers = [flag for flag in generate.given_levers(args) if flag not in ("--preview", "--preview_decoder")]
    if gpu_levers and not args.realtime:
        raise UsageError(f"{', '.join(gpu_levers)} are options of the real-time path; add --realtime (CUDA).")
    levers = generate.check_levers(args, args.model if args.model is not None else generate.shipped_model())
    pipe, folder = load_demo_pipeline(args.model, args.device, args.dtype, args.revision)
    lookahead = 0
    if args.realtime:
        if pipe.device.type != "cuda":
            raise UsageError("--realtime needs a CUDA device (pipe.enable_realtime() compiles CUDA graphs); drop it "
                             "on a CPU.")
        logger.info("Real-time path on: the first stream includes torch.compile time, the second CUDA-graph capture.")
        lookahead = 1  # the overlapped decode yields a chunk after the next one was started
    generate.apply_levers(pipe, levers, compiled=args.realtime)  # without --realtime: the preview decoder alone
    settings = DemoSettings(guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                            max_waiting=args.max_waiting, switch_lookahead=lookahead, record_video=not args.no_video)
    name = args.model or folder or "tiny random pipeline"
    app = _create_app(pipeline=pipe, model=folder, settings=settings, model_name=name)
    logger.info(f"raven-demo: {name} on {pipe.device}; open http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
