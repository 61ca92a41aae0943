"""Opt-in FP8 linear layers for the transformer blocks (inference only): row-wise scaled ``torch._scaled_mm``.

Why: on an H200, FP8 GEMMs with row-wise scales on the block's shapes (4,680 tokens, Wan2.1-1.3B) run at
1536->1536 866 vs 694 TFLOP/s in bf16, 1536->8960 1120 vs 747, 8960->1536 1195 vs 776. The attention kernels are
not touched (they stay bf16).

Scaling recipe (``float8_e4m3fn``: 3 mantissa bits, largest finite value 448, no infinity):

- weights: quantised ONCE at conversion, one fp32 scale per output channel, ``scale = amax(|W[n, :]|) / 448``;
- activations: quantised at every call, dynamically, one fp32 scale per row (token), ``scale = amax(|x[m, :]|) / 448``
  (amax over the last dim), so one outlier token does not crush the resolution of the others (a tensor-wise scale
  would);
- amax is clamped away from zero (an all-zero row quantises to zeros, never NaN) and the scaled values are clamped to
  +-448 before the cast (e4m3fn has no infinity: an overflowing cast gives NaN);
- ``torch._scaled_mm(x_fp8, W_fp8.t(), scale_a=[M, 1], scale_b=[1, N])`` accumulates in fp32 and applies both
  scales in its epilogue; the output is bf16 (the bias is fused there when it is bf16), then cast to the input
  dtype (fp16 / fp32 inputs: bf16 output cast back, because older CUDA builds only support a bf16 output for
  row-wise scaling). Relative error per layer: ~3.5 % (Frobenius) on random data, the e4m3 rounding of both
  operands (2^-4 relative at most per element).

What stays in higher precision, and why: only the block's self-attention Q/K/V/out projections and the FFN linears
are converted by default (the bulk of the FLOPs); cross-attention is optional (``include=("attn1", "attn2",
"ffn")``: its K/V run once per prompt, its Q/out are small). Never converted: the patch embedding (a Conv3d on raw
latents), the time and text embedders (their outputs drive every block's modulation / every cross-attention) and the
output head (``proj_out``, whose error goes straight into the predicted velocity); biases, norms, RoPE, modulation
tables and the attention itself keep their dtype.

Constraints (``torch._scaled_mm``): on CUDA, ``K`` and ``N`` must be multiples of 16, ``a`` row-major, ``b``
column-major, scales fp32 and contiguous, bias bf16 with a bf16 output; linears whose ``in_features`` or
``out_features`` is not a multiple of 16 are left as ``nn.Linear``. No autograd formula exists for ``_scaled_mm``:
a converted model is for inference (convert after loading and casting, and do not ``save_pretrained`` it: the
converted layers' state is ``weight_fp8`` / ``weight_scale``, which a plain Wan checkpoint does not have). LoRA
(peft) wrapped linears are left alone: merge the adapters first.

Usage::

    from raven_video.models.fp8 import enable_fp8
    enable_fp8(pipe.transformer)  # after .to("cuda") and the dtype cast; logs one line and returns False if unsupported
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["FP8_INCLUDE_CHOICES", "Float8Linear", "convert_to_fp8", "enable_fp8", "fp8_supported", "quantize_rowwise"]

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_AMAX_EPS = 1e-12  # amax floor: an all-zero row gets a tiny scale and quantises to zeros
_ALIGN = 16  # _scaled_mm on CUDA: K and N multiples of 16

# Sub-modules of a transformer block that may be converted; the default excludes the cross-attention.
FP8_INCLUDE_CHOICES = ("attn1", "attn2", "ffn")


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[M, K]`` -> (``float8_e4m3fn`` ``[M, K]`` row-major, fp32 scales ``[M, 1]``) with
    ``x ~= x_fp8.float() * scale`` and ``scale = amax(|x[m, :]|) / 448`` per row."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=_AMAX_EPS) / FP8_MAX
    x_fp8 = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_fp8.contiguous(), scale.contiguous()


class Float8Linear(nn.Module):
    """A drop-in replacement for an ``nn.Linear`` whose GEMM runs in FP8 (row-wise scales), for inference.

    State: ``weight_fp8`` (``float8_e4m3fn`` ``[out, in]``, row-major: passed to ``_scaled_mm`` as its column-major
    transpose), ``weight_scale`` (fp32 ``[1, out]``, one per output channel) and ``bias`` (the original linear's
    dtype, or ``None``). Build with :meth:`from_linear`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if FP8_DTYPE is None:
            raise RuntimeError(f"torch {torch.__version__} has no float8_e4m3fn dtype.")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(1, out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Float8Linear:
        """Quantise ``linear``'s weight once (per-output-channel scale ``amax / 448``); the bias is kept as is."""
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=weight.device,
                     dtype=weight.dtype)
        w_fp8, w_scale = quantize_rowwise(weight)  # rows of W = output channels
        module.weight_fp8.copy_(w_fp8)
        module.weight_scale.copy_(w_scale.view(1, -1))
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().clone()
        return module

    @staticmethod
    def supports(linear: nn.Module) -> bool:
        """Whether ``linear`` is a plain ``nn.Linear`` whose shape ``_scaled_mm`` accepts (both dims multiples of 16)."""
        return (
            isinstance(linear, nn.Linear)
            and linear.in_features % _ALIGN == 0
            and linear.out_features % _ALIGN == 0
            and linear.weight.is_floating_point()
            and linear.weight.dtype != FP8_DTYPE
            and linear.weight.device.type != "meta"
        )

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() / .bfloat16() cast every floating tensor, float8 ones included: keep the stored
        # fp8 weight and its fp32 scale in their dtypes (device moves still apply); the bias follows the cast.
        weight, scale = self.weight_fp8, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_fp8.dtype != weight.dtype:
            self.weight_fp8 = weight.to(self.weight_fp8.device)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_fp8.dtype != FP8_DTYPE or self.weight_scale.dtype != torch.float32:
            raise RuntimeError(
                f"Float8Linear state was cast ({self.weight_fp8.dtype}, {self.weight_scale.dtype}) after conversion; "
                "cast the model first, then convert it to FP8."
            )
        lead = x.shape[:-1]
        if x.numel() == 0:  # _scaled_mm rejects the [0, 1] scale of an empty input
            return x.new_zeros(*lead, self.out_features)
        x_fp8, x_scale = quantize_rowwise(x.reshape(-1, self.in_features))
        out_dtype = torch.bfloat16  # fp16 / fp32 inputs: bf16 output cast back below
        fuse_bias = self.bias is not None and self.bias.dtype == out_dtype
        out = torch._scaled_mm(
            x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
            bias=self.bias if fuse_bias else None, out_dtype=out_dtype,
        )
        out = out.to(x.dtype)
        if self.bias is not None and not fuse_bias:
            out = out + self.bias.to(out.dtype)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8=e4m3fn rowwise"


# ---------------------------------------------------------------------------------------------- support probe
_SUPPORT_CACHE: dict[str, tuple[bool, str]] = {}


def _probe(device: torch.device) -> tuple[bool, str]:
    """One tiny row-wise ``_scaled_mm`` (with a bf16 bias), checked against a float reference."""
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(16, 32, generator=gen).to(device)
        linear = nn.Linear(32, 16).to(device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(16, 32, generator=gen).to(device))
            fp8 = Float8Linear.from_linear(linear)
            out = fp8(x.bfloat16()).float()
            ref = linear(x.bfloat16()).float()
        err = ((out - ref).norm() / ref.norm()).item()
    except Exception as exc:  # noqa: BLE001 -- any failure means "unsupported", reported as the reason
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return False, f"torch._scaled_mm with row-wise scales fails on {device}: {first}"
    if not err < 0.1:
        return False, f"torch._scaled_mm with row-wise scales gives wrong results on {device} (relative error {err:.3g})"
    return True, f"row-wise FP8 _scaled_mm works on {device}"


def fp8_supported(device: torch.device | str | None = None) -> tuple[bool, str]:
    """``(True, why)`` where FP8 linears run on ``device`` (default CPU), else ``(False, reason)``.

    CPU: wherever this torch build's ``_scaled_mm`` takes row-wise scales (emulated, for tests). CUDA: compute
    capability >= 8.9 (Ada, Hopper, Blackwell) and a working row-wise ``_scaled_mm``. The answer comes from one tiny
    probe per device, cached (call it outside CUDA-graph capture)."""
    device = torch.device("cpu" if device is None else device)
    if FP8_DTYPE is None or not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no float8_e4m3fn / torch._scaled_mm"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        index = device.index if device.index is not None else torch.cuda.current_device()
        device = torch.device("cuda", index)
        major, minor = torch.cuda.get_device_capability(index)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(index)
            return False, f"{name} has compute capability {major}.{minor}; FP8 GEMMs need >= 8.9"
    elif device.type != "cpu":
        return False, f"no FP8 GEMM path on device type {device.type!r} (CUDA >= 8.9 or CPU only)"
    key = str(device)
    if key not in _SUPPORT_CACHE:
        _SUPPORT_CACHE[key] = _probe(device)
    return _SUPPORT_CACHE[key]


# ---------------------------------------------------------------------------------------------- conversion
def _normalise_include(include: str | Iterable[str]) -> tuple[str, ...]:
    names = (include,) if isinstance(include, str) else tuple(include)
    unknown = [name for name in names if name not in FP8_INCLUDE_CHOICES]
    if unknown:
        raise ValueError(f"unknown FP8 include name(s) {', '.join(map(repr, unknown))}; choose from {FP8_INCLUDE_CHOICES}.")
    return names


def convert_to_fp8(module: nn.Module, include: str | Iterable[str] = ("attn1", "ffn")) -> int:
    """Replace, in place, the ``nn.Linear`` layers of ``module.blocks[i].<include>`` by :class:`Float8Linear`;
    returns how many were converted (0 on a second call: idempotent).

    ``include``: any of ``"attn1"`` (self-attention Q/K/V/out, fused ``to_qkv`` included), ``"attn2"``
    (cross-attention) and ``"ffn"``. Linears whose dims are not multiples of 16, and LoRA-wrapped (peft) linears,
    stay as they are. Only the blocks are walked: the patch embedding, the time / text embedders and the output head
    are precision-sensitive (their error reaches every block's modulation or the output directly) and never
    converted.
    """
    names = _normalise_include(include)
    blocks = getattr(module, "blocks", None)
    if blocks is None:
        raise ValueError(f"convert_to_fp8 expects a transformer with `.blocks`, got {type(module).__name__}.")
    converted = 0
    for block in blocks:
        for name in names:
            sub = getattr(block, name, None)
            if sub is None:
                continue
            # peft tuner layers (``base_layer`` + ``lora_A`` / ``lora_B``): converting their linears would break the
            # adapter (merge, training); leave everything under them alone.
            wrapped = [prefix for prefix, m in sub.named_modules() if prefix and hasattr(m, "base_layer")]
            targets = [
                (prefix, m) for prefix, m in sub.named_modules()
                if prefix and Float8Linear.supports(m)
                and not any(prefix == w or prefix.startswith(w + ".") for w in wrapped)
            ]
            for prefix, linear in targets:
                parent_name, _, child = prefix.rpartition(".")
                parent = sub.get_submodule(parent_name) if parent_name else sub
                setattr(parent, child, Float8Linear.from_linear(linear))
                converted += 1
    return converted


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    dtype = getattr(model, "dtype", None)
    device = getattr(model, "device", None)
    if not isinstance(dtype, torch.dtype) or not isinstance(device, torch.device):
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype = first.dtype if first is not None else torch.float32
    return device, dtype


def enable_fp8(transformer: nn.Module, device: torch.device | str | None = None, **kwargs) -> bool:
    """Convert ``transformer``'s block linears to FP8 (see :func:`convert_to_fp8`, which ``kwargs`` go to) where
    :func:`fp8_supported` says the ``device`` (default: the model's) can run them; returns whether it did.

    Otherwise it logs one warning line and leaves the model untouched. Call it after the model's device move and
    dtype cast (and before ``compile_streaming`` / CUDA-graph capture)."""
    _normalise_include(kwargs.get("include", ()))  # a wrong name fails on every machine, not only where FP8 runs
    model_device, dtype = _model_device_dtype(transformer)
    ok, reason = fp8_supported(model_device if device is None else device)
    if not ok:
        logger.warning("FP8 linear layers unavailable (%s); running in %s", reason, str(dtype).removeprefix("torch."))
        return False
    converted = convert_to_fp8(transformer, **kwargs)
    logger.info("FP8 linear layers: %d block linears converted (%s)", converted, reason)
    return True
