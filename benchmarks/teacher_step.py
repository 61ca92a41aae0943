#!/usr/bin/env python
"""One flow-matching step of the world teacher (forward, backward, fused AdamW; bf16 autocast, fp32 weights), eager
and with ``compile_repeated_blocks`` (``train_teacher.py --compile``), at several batch sizes. Random weights and
latents ``[B, 16, 21, 16, 16]`` (81 frames at 64x64) and random text ``[B, 64, 64]``: the step's cost does not depend
on them. Prints one JSON line per (compile, batch): ms per step, clips per second, peak memory.

    python benchmarks/teacher_step.py                        # one GPU, batches 32,128,256, eager and compiled
    python benchmarks/teacher_step.py --device cpu --batch_sizes 2 --no_compile --steps 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raven_video.models.transformer_causal_wan import CausalWanTransformer3DModel  # noqa: E402
from raven_video.training.teacher import TeacherObjective  # noqa: E402
from raven_video.world.stack import MAX_SEQUENCE_LENGTH, TEXT_DIM, WORLD_TRANSFORMER  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch_sizes", default="32,128,256")
    p.add_argument("--no_compile", action="store_true", help="eager only")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    return p.parse_args(argv)


def measure(compiled: bool, batch: int, args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = CausalWanTransformer3DModel(**WORLD_TRANSFORMER).to(device).train()
    if compiled:
        model.compile_repeated_blocks()
    objective = TeacherObjective(model, "bidirectional", 5.0, 0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    latents = torch.randn(batch, 16, 21, 16, 16, device=device)
    text = torch.randn(batch, MAX_SEQUENCE_LENGTH, TEXT_DIM, device=device)
    empty = torch.zeros(1, MAX_SEQUENCE_LENGTH, TEXT_DIM, device=device)

    def step(i: int) -> None:
        with torch.autocast(device.type, torch.bfloat16):
            loss, _ = objective(latents, text, empty, torch.Generator().manual_seed(i))  # logs sync, as in training
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    return {"benchmark": "teacher_step", "date": datetime.date.today().isoformat(), "compile": compiled,
            "batch": batch, "ms_per_step": round(seconds * 1e3, 1), "clips_per_s": round(batch / seconds),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if device.type == "cuda" else None,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__}


def main(argv=None):
    args = parse_args(argv)
    for compiled in (False,) if args.no_compile else (False, True):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            print(json.dumps(measure(compiled, batch, args)), flush=True)


if __name__ == "__main__":
    main()
