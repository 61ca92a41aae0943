"""FP8 linear layers (raven_video.models.fp8): the real ``torch._scaled_mm`` path, run on CPU.

Error bound: e4m3 keeps 3 mantissa bits, so rounding one value costs at most 2^-4 = 6.25 % relative (about 2.5 % RMS
over a binade); both GEMM operands are rounded and the errors of a dot product's terms are independent, so the
output's relative Frobenius error is about sqrt(2) * 2.5 % ~ 3.5 % (measured: 3.5 %). Bound: 8 %. Floor: 1 % -- a bf16
output alone (8 mantissa bits) costs ~0.2 %, so an error above 1 % shows the operands really went through FP8.
"""

import copy
import logging

import pytest
import torch
from torch import nn

from raven_video.models import fp8 as fp8_module
from raven_video.models.fp8 import (
    Float8Linear,
    convert_to_fp8,
    enable_fp8,
    fp8_supported,
    quantize_rowwise,
)
from raven_video.testing import tiny_causal_transformer

pytestmark = pytest.mark.skipif(not fp8_supported("cpu")[0], reason=fp8_supported("cpu")[1])

FP8_MAX_REL_ERR = 0.08
FP8_MIN_REL_ERR = 0.01


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _linear(in_features, out_features, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    with torch.no_grad():
        if bias:
            linear.bias.normal_()
    return linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float8_linear_matches_linear_within_e4m3_error(dtype):
    linear = _linear(128, 96, dtype=dtype)
    layer = Float8Linear.from_linear(linear)
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (1, 96)
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == dtype
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        out, ref = layer(x), linear(x)
    assert out.dtype == dtype and out.shape == ref.shape
    err = _rel(out, ref)
    assert FP8_MIN_REL_ERR < err < FP8_MAX_REL_ERR, err


def test_weight_quantised_once_per_output_channel():
    linear = _linear(64, 32, bias=False)
    with torch.no_grad():
        linear.weight[3] *= 1000.0  # one loud channel keeps its own scale
        linear.weight[5] = 0.0  # an all-zero channel: finite scale, zeros
    layer = Float8Linear.from_linear(linear)
    amax = linear.weight.detach().abs().amax(dim=1)
    torch.testing.assert_close(layer.weight_scale[0, 3], amax[3] / 448.0)
    assert torch.isfinite(layer.weight_scale).all() and layer.weight_scale.min() > 0
    assert torch.equal(layer.weight_fp8[5].float(), torch.zeros(64))
    dequant = layer.weight_fp8.float() * layer.weight_scale.t()
    rows = [i for i in range(32) if i != 5]
    assert _rel(dequant[rows], linear.weight.detach()[rows]) < 0.04
    x = torch.zeros(4, 64)  # an all-zero activation row: no NaN
    assert torch.equal(layer(x), torch.zeros(4, 32))


def test_rowwise_activation_scaling_protects_small_rows():
    """One token 1e5x louder than the others: per-row scales keep the small rows at the usual ~3.5 % error.

    e4m3 spans 2^-9 .. 448 (subnormals included), so a tensor-wise scale already survives a 1000x outlier (measured
    3.6 % on the small rows); at 1e5x the small rows fall into the subnormals / zero and a tensor-wise scheme fails.
    """
    linear = _linear(64, 96, bias=False)
    layer = Float8Linear.from_linear(linear)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    x[0] *= 1e5
    with torch.no_grad():
        ref = linear(x)
        out = layer(x)
    small = slice(1, None)
    assert _rel(out[small], ref[small]) < FP8_MAX_REL_ERR
    assert _rel(out[:1], ref[:1]) < FP8_MAX_REL_ERR
    # The same GEMM with ONE activation scale for the whole tensor (the weights as in `layer`).
    scale = x.abs().amax() / 448.0
    x_tensorwise = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    w = layer.weight_fp8.float() * layer.weight_scale.t()
    tensorwise = x_tensorwise @ w.t()
    assert _rel(tensorwise[small], ref[small]) > 0.2


def test_leading_dims_bias_and_noncontiguous_input():
    linear = _linear(32, 48, dtype=torch.bfloat16)
    layer = Float8Linear.from_linear(linear)
    x = torch.randn(2, 3, 5, 32).to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        assert out.shape == (2, 3, 5, 48)
        assert _rel(out, linear(x)) < FP8_MAX_REL_ERR
        # the bias is really added (fused into _scaled_mm for bf16): zero input -> exactly the bias
        torch.testing.assert_close(layer(torch.zeros(7, 32, dtype=torch.bfloat16)), linear.bias.expand(7, 48))
        # a transposed (column-major) activation gives the same result as its contiguous copy
        xt = torch.randn(32, 10).to(torch.bfloat16).t()
        assert not xt.is_contiguous()
        assert torch.equal(layer(xt), layer(xt.contiguous()))
        # fp32 model: bias kept in fp32 and added after the bf16 GEMM output is cast back
        linear32 = _linear(32, 48)
        layer32 = Float8Linear.from_linear(linear32)
        assert layer32.bias.dtype == torch.float32
        torch.testing.assert_close(layer32(torch.zeros(3, 32)), linear32.bias.detach().expand(3, 48))
        assert layer(torch.zeros(0, 32, dtype=torch.bfloat16)).shape == (0, 48)


def test_dtype_cast_keeps_fp8_state():
    layer = Float8Linear.from_linear(_linear(32, 32))
    weight, scale = layer.weight_fp8.clone(), layer.weight_scale.clone()
    layer.to(torch.bfloat16)
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and torch.equal(layer.weight_fp8.float(), weight.float())
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert layer.bias.dtype == torch.bfloat16
    layer.weight_scale.data = layer.weight_scale.data.bfloat16()  # what a `.data` cast would do
    with pytest.raises(RuntimeError, match="cast the model first"):
        layer(torch.randn(2, 32, dtype=torch.bfloat16))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = nn.ModuleDict({"to_q": nn.Linear(32, 32), "to_k": nn.Linear(32, 24)})
        self.ffn = nn.Sequential(nn.Linear(32, 40), nn.GELU(), nn.Linear(40, 32))


def test_non_multiple_of_16_linears_left_untouched():
    model = nn.Module()
    model.blocks = nn.ModuleList([_Block()])
    assert not Float8Linear.supports(model.blocks[0].attn1["to_k"])
    assert convert_to_fp8(model) == 1  # only attn1.to_q is 32 -> 32
    block = model.blocks[0]
    assert isinstance(block.attn1["to_q"], Float8Linear)
    assert type(block.attn1["to_k"]) is nn.Linear and type(block.ffn[0]) is nn.Linear and type(block.ffn[2]) is nn.Linear


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 6, 4, 6, generator=g).to(dtype)
    text = torch.randn(2, 7, 32, generator=g).to(dtype)
    return x, torch.tensor([938.0, 625.0]), text


def test_convert_tiny_transformer_count_idempotent_and_close():
    """Tiny Wan (2 blocks, dim 32, FFN 64): 4 self-attention + 2 FFN linears per block; cross-attention on request.

    Measured (block-causal forward, seeds 0-2): fp32 model 1.7-2.9 % relative Frobenius error with self-attention + FFN
    in FP8, 2.0-3.2 % with the cross-attention too; a bf16 model with FP8 2.0-3.1 % from the fp32 reference (bf16
    alone: 0.8 %). Tolerance: 6 %.
    """
    reference = tiny_causal_transformer()
    model = copy.deepcopy(reference)
    x, u, text = _inputs()
    untouched = {
        name: tensor.clone()
        for name, tensor in model.state_dict().items()
        if not (name.startswith("blocks.") and (".attn1." in name or ".ffn." in name)) or "norm_" in name
    }
    assert convert_to_fp8(model) == 2 * (4 + 2)
    assert convert_to_fp8(model) == 0  # idempotent
    for block in model.blocks:
        for layer in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v, block.attn1.to_out[0],
                      block.ffn.net[0].proj, block.ffn.net[2]):
            assert isinstance(layer, Float8Linear)
        assert type(block.attn2.to_q) is nn.Linear  # cross-attention stays by default
    # precision-sensitive layers are never converted, though their shapes would allow it
    for name in ("condition_embedder.time_embedder.linear_1", "condition_embedder.time_proj",
                 "condition_embedder.text_embedder.linear_1", "proj_out"):
        assert type(model.get_submodule(name)) is nn.Linear
    state = model.state_dict()
    for name, tensor in untouched.items():
        assert torch.equal(state[name], tensor), name
    with torch.no_grad():
        ref = reference(x, u, text, causal=True).sample
        out = model(x, u, text, causal=True).sample
    assert out.dtype == ref.dtype and torch.isfinite(out).all()
    assert FP8_MIN_REL_ERR / 2 < _rel(out, ref) < 0.06

    assert convert_to_fp8(model, include=("attn1", "attn2", "ffn")) == 2 * 4  # the cross-attention on top
    with torch.no_grad():
        assert _rel(model(x, u, text, causal=True).sample, ref) < 0.06


def test_bf16_transformer_with_fp8_close_to_fp32_and_streams():
    reference = tiny_causal_transformer()
    model = tiny_causal_transformer(dtype=torch.bfloat16)
    assert convert_to_fp8(model, include="ffn") == 2 * 2  # a single name is accepted as a string
    assert convert_to_fp8(model) == 2 * 4
    x, u, text = _inputs()
    with torch.no_grad():
        ref = reference(x, u, text, causal=True).sample
        out = model(x.bfloat16(), u, text.bfloat16(), causal=True).sample
        assert out.dtype == torch.bfloat16 and _rel(out, ref) < 0.06
        # the KV-cached streaming path runs through the same converted layers
        cache = model.new_kv_cache(2, 4, 6, max_frames=6)
        chunk = model(x[:, :, :3].bfloat16(), u, text.bfloat16(), kv_cache=cache).sample
        assert chunk.shape == (2, 16, 3, 4, 6) and torch.isfinite(chunk.float()).all()


def test_lora_wrapped_linears_left_alone():
    peft = pytest.importorskip("peft")
    model = tiny_causal_transformer()
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=16, target_modules=["attn1.to_q"]), model)
    assert convert_to_fp8(model) == 2 * (4 + 2 - 1)
    assert type(model.blocks[0].attn1.to_q.base_layer) is nn.Linear


def test_enable_fp8_converts_where_supported(caplog):
    model = tiny_causal_transformer()
    with caplog.at_level(logging.WARNING, logger=fp8_module.__name__):
        assert enable_fp8(model) is True
    assert not caplog.records
    assert isinstance(model.blocks[0].ffn.net[2], Float8Linear)


def test_enable_fp8_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(fp8_module, "fp8_supported", lambda device=None: (False, "no FP8 here"))
    model = tiny_causal_transformer(dtype=torch.bfloat16)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger=fp8_module.__name__):
        assert enable_fp8(model, include=("attn1", "attn2", "ffn")) is False
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == ["FP8 linear layers unavailable (no FP8 here); running in bfloat16"]
    assert not any(isinstance(m, Float8Linear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_unknown_include_name_raises():
    model = tiny_causal_transformer()
    with pytest.raises(ValueError, match="'attn3'"):
        convert_to_fp8(model, include=("attn1", "attn3"))
    with pytest.raises(ValueError, match="'mlp'"):
        enable_fp8(model, include=("mlp",))
    assert not any(isinstance(m, Float8Linear) for m in model.modules())


def test_fp8_supported_reasons():
    ok, why = fp8_supported("cpu")
    assert ok and "cpu" in why
    assert fp8_supported(torch.device("cpu")) is fp8_supported("cpu")  # probed once, cached
    ok, why = fp8_supported("meta")
    assert not ok and "meta" in why
    if not torch.cuda.is_available():
        assert fp8_supported("cuda") == (False, "CUDA is not available")


def test_quantize_rowwise_layout():
    x = torch.randn(10, 32).t()  # non-contiguous [32, 10]
    x_fp8, scale = quantize_rowwise(x)
    assert x_fp8.is_contiguous() and x_fp8.dtype == torch.float8_e4m3fn and scale.shape == (32, 1)
    assert (x_fp8.float().abs().amax(dim=1) == 448).all()  # each row uses the full e4m3 range
