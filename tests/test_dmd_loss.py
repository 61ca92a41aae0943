"""DMD losses (Alg. 1 l.11-28, docs/method.md §5)."""

import pytest
import torch

from raven_video.training.chunk_weighting import chunk_weighted_loss, chunk_weights
from raven_video.sampling.flow import add_noise, guidance_combine, x0_from_velocity
from raven_video.training.dmd import dmd_normalizer, dmd_per_element_surrogate, flow_matching_critic_loss

SHAPE = (2, 3, 6, 4, 5)  # [B, C, F, H, W]


def _tensors(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(SHAPE, generator=g, dtype=dtype)
    f = torch.randn(SHAPE, generator=g, dtype=dtype)
    r = torch.randn(SHAPE, generator=g, dtype=dtype)
    return x0, f, r


def test_schedule_helpers_roundtrip():
    x0, eps, _ = _tensors()
    sigma = torch.tensor([0.3, 0.9], dtype=torch.float64)
    x_t = add_noise(x0, eps, sigma)
    torch.testing.assert_close(x_t[0], 0.7 * x0[0] + 0.3 * eps[0])
    v = eps - x0  # v_lerp target
    torch.testing.assert_close(x0_from_velocity(x_t, v, sigma), x0)
    torch.testing.assert_close(x0_from_velocity(x_t, v, 0.5), x_t - 0.5 * v)


def test_flow_matching_critic_loss():
    x0, eps, v = _tensors()
    loss = flow_matching_critic_loss(v, eps, x0)
    torch.testing.assert_close(loss, ((v - (eps - x0)) ** 2).mean())
    assert flow_matching_critic_loss(v.half(), eps.half(), x0.half()).dtype == torch.float32
    assert float(flow_matching_critic_loss(eps - x0, eps, x0)) == 0.0
    v.requires_grad_(True)
    flow_matching_critic_loss(v, eps, x0).backward()
    torch.testing.assert_close(v.grad, (2 * (v - (eps - x0)) / v.numel()).detach(), rtol=1e-5, atol=1e-7)


def test_cfg_combine_convention():
    pos, neg = torch.tensor([2.0]), torch.tensor([1.0])
    assert guidance_combine(pos, neg, 3.0).item() == 4.0  # neg + 3 (pos - neg)
    assert torch.equal(guidance_combine(pos, neg, 1.0), pos)
    assert guidance_combine(pos, neg, 0.0).item() == 1.0
    # Self-Forcing's cond + w (cond - uncond) equals RAVEN's scale w + 1.
    assert (pos + 3.0 * (pos - neg)).item() == guidance_combine(pos, neg, 4.0).item()


def test_dmd_normalizer_per_sample_over_whole_video():
    x0, _, r = _tensors()
    norm = dmd_normalizer(x0, r)
    assert norm.dtype == torch.float64 and norm.shape == (2,) and not norm.requires_grad
    torch.testing.assert_close(norm, (x0 - r).abs().flatten(1).mean(1))
    assert dmd_normalizer(r, r).tolist() == [1e-5, 1e-5]  # clamp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dmd_surrogate_gradient_is_f_minus_r_over_norm(dtype):
    x0, f, r = _tensors(dtype=dtype)
    x0.requires_grad_(True)
    ell = dmd_per_element_surrogate(x0, f, r, "dmd")
    assert ell.dtype == torch.float64 and ell.shape == SHAPE
    (grad,) = torch.autograd.grad(ell.sum(), x0)
    norm = (x0.detach().double() - r.double()).abs().flatten(1).mean(1).view(-1, 1, 1, 1, 1)
    expected = ((f.double() - r.double()) / norm).to(dtype)
    if dtype == torch.float64:
        assert torch.equal(grad, expected) or torch.allclose(grad, expected, rtol=1e-15, atol=0)
    else:
        torch.testing.assert_close(grad, expected)
    # Equivalent MSE form of Alg. 1 l.16-25: 0.5 || x0 - sg(x0 - (f - r)/norm) ||^2.
    x0b = x0.detach().double().requires_grad_(True)
    target = (x0b - (f.double() - r.double()) / norm).detach()
    (g2,) = torch.autograd.grad(0.5 * ((x0b - target) ** 2).sum(), x0b)
    torch.testing.assert_close(g2.to(dtype), grad)


def test_sim_and_sid_gradients():
    x0, f, r = _tensors(1)
    x0.requires_grad_(True)
    (g_sim,) = torch.autograd.grad(dmd_per_element_surrogate(x0, f, r, "sim").sum(), x0)
    denom = torch.sqrt(((r - f) ** 2).flatten(1).sum(1) + 1e-6).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(g_sim, (f - r) / denom, rtol=1e-14, atol=0)
    (g_sid,) = torch.autograd.grad(dmd_per_element_surrogate(x0, f, r, "sid").sum(), x0)
    (g_dmd,) = torch.autograd.grad(dmd_per_element_surrogate(x0, f, r, "dmd").sum(), x0)
    torch.testing.assert_close(g_sid, g_dmd, rtol=1e-14, atol=0)
    sid = dmd_per_element_surrogate(x0, f, r, "sid").detach()
    norm = dmd_normalizer(x0, r).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(sid, (r - f) * ((r - x0.detach()) - (r - f)) / norm)


def test_chunk_weighted_dmd_gradient_matches_spec_step5():
    """Per-element gradient = w_c (f - r) / (norm * N_global) (Alg. 1 l.26-28)."""
    x0, f, r = _tensors(2)
    x0.requires_grad_(True)
    frames = [3, 3]
    loss = chunk_weighted_loss(dmd_per_element_surrogate(x0, f, r), frames, -1)
    (grad,) = torch.autograd.grad(loss, x0)
    w = torch.repeat_interleave(chunk_weights(frames, -1), torch.tensor(frames)).view(1, 1, 6, 1, 1)
    norm = dmd_normalizer(x0, r).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(grad, w * (f - r) / (norm * x0.numel()), rtol=1e-13, atol=0)


def test_surrogate_errors():
    x0, f, r = _tensors()
    with pytest.raises(ValueError, match="loss_type"):
        dmd_per_element_surrogate(x0, f, r, "kl")
    with pytest.raises(ValueError, match="shape mismatch"):
        dmd_per_element_surrogate(x0, f[:1], r)
