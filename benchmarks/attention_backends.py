"""Streaming attention shape (q = one 3-frame chunk, 4 680 tokens; kv = 3..21 frames), bf16, 12 heads x 128, H100.
Times each available kernel; prints ONE JSON line (ms per call, TFLOP/s)."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(fn, iters=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    result = {"benchmark": "attention_backends", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for frames in (9, 21):
        q = torch.randn(1, 12, 4680, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 12, frames * 1560, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flop = 4 * 12 * 128 * q.shape[2] * k.shape[2]
        row = {}
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
                row[name] = {"ms": round(ms, 3), "tflops": round(flop / ms / 1e9, 1)}
            except Exception as err:  # backend not available for this shape
                row[name] = f"n/a: {type(err).__name__}"
        try:
            ms = bench(lambda: flex(q, k, v))
            row["flex_compiled"] = {"ms": round(ms, 3), "tflops": round(flop / ms / 1e9, 1)}
        except Exception as err:
            row["flex_compiled"] = f"n/a: {type(err).__name__}: {str(err)[:80]}"
        impls = getattr(torch.nn.attention, "list_flash_attention_impls", None)
        row["flash_impls"] = impls() if impls else "api not in this torch"
        result[f"kv_{frames}_frames"] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()
