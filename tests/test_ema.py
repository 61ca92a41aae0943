"""EMA of named parameters (docs/method.md §5: constant decay 0.9675 from the first update)."""

import pytest
import torch

from raven_video.training.ema import EMA


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(3, 3)
        self.lora_A = torch.nn.Linear(3, 2, bias=False)
        self.lora_B = torch.nn.Linear(2, 3, bias=False)


def _model(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def test_constant_decay_closed_form():
    model = _model()
    ema = EMA(model, decay=0.9675)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = {n: t.clone() for n, t in theta0.items()}
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        for n, p in model.named_parameters():
            expected[n] = 0.9675 * expected[n] + 0.0325 * p.detach()
    for n in expected:
        torch.testing.assert_close(ema.shadow[n], expected[n])
    assert ema.num_updates == 5
    # first update already uses 0.9675 (no warm-up, no copy)
    m2 = _model()
    e2 = EMA(m2)
    before = m2.base.weight.detach().clone()
    with torch.no_grad():
        m2.base.weight.add_(1.0)
    e2.update(m2)
    torch.testing.assert_close(e2.shadow["base.weight"], before + 0.0325)


def test_subset_of_trainable_params_like_lora():
    model = _model()
    model.base.requires_grad_(False)
    ema = EMA(model)
    assert ema.names == ["lora_A.weight", "lora_B.weight"]
    by_name = EMA(model, names=["lora_B.weight"])
    assert by_name.names == ["lora_B.weight"]
    by_pred = EMA(model, names=lambda n, p: n.startswith("lora_A"))
    assert by_pred.names == ["lora_A.weight"]
    with pytest.raises(KeyError, match="not_a_param"):
        EMA(model, names=["not_a_param"])
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters"):
        EMA(model)


def test_copy_to_and_dtype():
    model = _model()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.lora_A.weight.fill_(2.0)
    ema.update(model)
    target = _model(1).to(torch.float64)
    ema.copy_to(target)
    assert target.lora_A.weight.dtype == torch.float64
    torch.testing.assert_close(target.lora_A.weight, ema.shadow["lora_A.weight"].double())


def test_state_dict_roundtrip(tmp_path):
    model = _model()
    ema = EMA(model)
    with torch.no_grad():
        model.base.bias.add_(3.0)
    ema.update(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    fresh = EMA(_model())
    fresh.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert fresh.num_updates == 1
    for n in ema.shadow:
        assert torch.equal(fresh.shadow[n], ema.shadow[n])
    other = _model()
    other.base.requires_grad_(False)
    with pytest.raises(ValueError, match="different parameters"):
        EMA(other).load_state_dict(ema.state_dict())


def test_accelerate_register_for_checkpointing(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    accelerator = accelerate.Accelerator(cpu=True)
    try:
        _roundtrip_through_accelerator(accelerator, tmp_path)
    finally:  # the Accelerator state is a process-wide singleton: leave none behind for other tests
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _roundtrip_through_accelerator(accelerator, tmp_path):
    model = _model()
    ema = EMA(model)
    accelerator.register_for_checkpointing(ema)
    with torch.no_grad():
        model.base.weight.mul_(2.0)
    ema.update(model)
    saved = {n: t.clone() for n, t in ema.shadow.items()}
    accelerator.save_state(str(tmp_path / "ckpt"))
    ema.update(_model(5))
    assert not torch.equal(ema.shadow["base.weight"], saved["base.weight"])
    accelerator.load_state(str(tmp_path / "ckpt"))
    for n in saved:
        assert torch.equal(ema.shadow[n], saved[n])
    assert ema.num_updates == 1
