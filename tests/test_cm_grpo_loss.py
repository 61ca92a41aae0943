"""CM-GRPO advantages and kernel losses (Eq. 6-10, Alg. 2 l.14-20; the Flow-GRPO Euler-Maruyama kernel, Eq. 2-4)."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raven_video.training.cm_grpo import (
    consistency_kernel_loss,
    consistency_kernel_mean,
    gather_group_advantages,
    gaussian_log_prob,
    group_advantages,
    kl_to_reference_loss,
    prompt_group_id,
)
from raven_video.training.euler_maruyama import euler_maruyama_kernel_loss, euler_maruyama_step_mean_std

SHAPE = (3, 2, 6, 3, 4)


def _randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ advantages


def test_group_advantages_zscore_population_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0])
    ids = torch.tensor([7, 7, 7, 7, -3, -3])
    adv = group_advantages(rewards, ids, clip=None)
    g1 = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    expected1 = (g1 - g1.mean()) / (g1.std(unbiased=False) + 1e-5)
    torch.testing.assert_close(adv[:4], expected1.float())
    torch.testing.assert_close(adv[4:], torch.tensor([-1.0, 1.0]) * 5.0 / (5.0 + 1e-5))
    assert adv.dtype == torch.float32
    # order within the batch does not matter
    perm = torch.tensor([5, 0, 3, 1, 4, 2])
    torch.testing.assert_close(group_advantages(rewards[perm], ids[perm], clip=None), adv[perm])


def test_group_advantages_clip_and_std_floor():
    rewards = torch.tensor([0.0] * 99 + [1.0], dtype=torch.float64)
    ids = torch.zeros(100, dtype=torch.long)
    raw = group_advantages(rewards, ids, clip=None)
    assert float(raw[-1]) == pytest.approx(0.99 / (math.sqrt(0.0099) + 1e-5))  # ~9.95
    clipped = group_advantages(rewards, ids, clip=5.0)
    assert float(clipped[-1]) == 5.0 and float(clipped[0]) == pytest.approx(float(raw[0]))
    # std below the floor: divides by 1e-4 + 1e-5
    tiny = group_advantages(torch.tensor([0.0, 2e-6], dtype=torch.float64), torch.tensor([1, 1]), clip=None)
    torch.testing.assert_close(tiny, torch.tensor([-1e-6, 1e-6], dtype=torch.float64) / (1e-4 + 1e-5))


def test_identical_rewards_and_singletons_give_zero_not_nan():
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5, 3.0])
    ids = torch.tensor([1, 1, 1, 1, 2])
    adv = group_advantages(rewards, ids)
    assert torch.isfinite(adv).all() and adv.tolist() == [0.0] * 5


def test_group_advantages_validation():
    with pytest.raises(ValueError, match="integers"):
        group_advantages(torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="same length"):
        group_advantages(torch.ones(2), torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.zeros(2, dtype=torch.long))


def test_prompt_group_id_is_stable():
    a = prompt_group_id("a cat surfing a wave")
    assert a == prompt_group_id("a cat surfing a wave") != prompt_group_id("a dog surfing a wave")
    assert 0 <= a < 2**63
    torch.tensor([a], dtype=torch.int64)  # fits
    # pinned value: sha256-based, identical across processes and Python runs (no hash salt)
    assert prompt_group_id("") == int("e3b0c44298fc1c14", 16) >> 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_worker(rank, world_size, port, rewards, ids, splits, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        start = sum(splits[:rank])
        local = slice(start, start + splits[rank])
        adv = gather_group_advantages(rewards[local], ids[local], clip=5.0)
        torch.save(adv, f"{out_dir}/adv{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_group_advantages_two_processes_equal_one(tmp_path):
    torch.manual_seed(0)
    prompts = ["p0", "p1", "p2"]
    # group spans both ranks (sync group), uneven local counts (5 and 3)
    names = ["p0", "p1", "p0", "p2", "p0", "p1", "p0", "p2"]
    ids = torch.tensor([prompt_group_id(p) for p in names], dtype=torch.int64)
    rewards = torch.randn(8)
    splits = [5, 3]
    expected = group_advantages(rewards, ids, clip=5.0)
    assert len(set(prompts)) == 3
    mp.spawn(_gather_worker, args=(2, _free_port(), rewards, ids, splits, str(tmp_path)), nprocs=2, join=True)
    got = torch.cat([torch.load(tmp_path / "adv0.pt"), torch.load(tmp_path / "adv1.pt")])
    torch.testing.assert_close(got, expected)
    # without torch.distributed it is plain group_advantages
    torch.testing.assert_close(gather_group_advantages(rewards, ids), expected)


# ------------------------------------------------------------------------------------------- kernel losses


def test_gaussian_log_prob_exact():
    z, mean = _randn(0), _randn(1)
    std = torch.tensor([0.3, 0.9, 0.5], dtype=torch.float64)
    lp = gaussian_log_prob(z, mean, std)
    ref = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1, 1)).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(lp, ref)
    assert lp.shape == (3,)
    torch.testing.assert_close(gaussian_log_prob(z, mean, 0.5), torch.distributions.Normal(mean, 0.5).log_prob(z).flatten(1).sum(1))
    with pytest.raises(ValueError):
        gaussian_log_prob(z, mean, torch.tensor([0.3, 0.0, 0.5]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_consistency_loss_gradient_is_minus_A_grad_log_pi(dtype):
    sigma = torch.tensor([0.938, 0.833, 0.625], dtype=torch.float64)
    adv = torch.tensor([1.7, -0.4, 5.0], dtype=torch.float64)
    x0 = _randn(0).to(dtype).requires_grad_(True)
    z_next = (1 - sigma.view(-1, 1, 1, 1, 1)) * _randn(2) + sigma.view(-1, 1, 1, 1, 1) * _randn(3)
    loss_map = consistency_kernel_loss(x0, z_next.to(dtype), sigma, adv)
    assert loss_map.dtype == torch.float64 and loss_map.shape == SHAPE
    (grad,) = torch.autograd.grad(loss_map.sum(), x0)

    # autograd of log N(z_s; (1 - sigma) x0, sigma^2 I)
    x0b = x0.detach().double().requires_grad_(True)
    logp = gaussian_log_prob(z_next.to(dtype), consistency_kernel_mean(x0b, sigma), sigma)
    (grad_logp,) = torch.autograd.grad(logp.sum(), x0b)
    expected = -adv.view(-1, 1, 1, 1, 1) * grad_logp
    # analytic form as well
    s = sigma.view(-1, 1, 1, 1, 1)
    analytic = -adv.view(-1, 1, 1, 1, 1) * (1 - s) * (z_next.to(dtype).double() - (1 - s) * x0b.detach()) / s**2
    torch.testing.assert_close(expected, analytic, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected.to(dtype), rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-12 if dtype == torch.float64 else 1e-6)


def test_consistency_loss_zero_advantage_and_floats():
    x0 = _randn(0).requires_grad_(True)
    loss = consistency_kernel_loss(x0, _randn(1), 0.625, 0.0)
    assert float(loss.detach().abs().max()) == 0.0
    (grad,) = torch.autograd.grad(loss.sum(), x0)
    assert float(grad.abs().max()) == 0.0


def test_consistency_loss_rejects_sigma_zero():
    x0 = _randn(0)
    with pytest.raises(ValueError, match="degenerate"):
        consistency_kernel_loss(x0, x0, torch.tensor([0.5, 0.0, 0.5]), torch.ones(3))
    with pytest.raises(ValueError, match="degenerate"):
        kl_to_reference_loss(x0, x0, 0.0)


def test_kl_loss_gradient_is_grad_of_gaussian_kl():
    sigma = torch.tensor([0.938, 0.833, 0.625], dtype=torch.float64)
    x0 = _randn(0).requires_grad_(True)
    x0_ref = _randn(1)
    (grad,) = torch.autograd.grad(kl_to_reference_loss(x0, x0_ref, sigma).sum(), x0)
    s = sigma.view(-1, 1, 1, 1, 1)
    x0b = x0.detach().clone().requires_grad_(True)
    kl = (((1 - s) * x0b - (1 - s) * x0_ref) ** 2 / (2 * s**2)).sum()  # KL(N(mu, s^2) || N(mu_ref, s^2))
    (expected,) = torch.autograd.grad(kl, x0b)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------- EM kernel


def test_em_kernel_noise_level_zero_is_euler_step():
    z_t, v = _randn(0), _randn(1)
    sigma_t = torch.tensor([1.0, 0.833, 0.625], dtype=torch.float64)
    sigma_s = torch.tensor([0.938, 0.625, 0.0], dtype=torch.float64)
    mean, std = euler_maruyama_step_mean_std(z_t, v, sigma_t, sigma_s, noise_level=0.0)
    dt = (sigma_s - sigma_t).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(mean, z_t + v * dt, rtol=1e-14, atol=1e-14)
    assert std.tolist() == [0.0, 0.0, 0.0]


def test_em_kernel_matches_flow_grpo_formula():
    z_t, v = _randn(0), _randn(1)
    st, ss, a = 0.833, 0.625, 0.7
    mean, std = euler_maruyama_step_mean_std(z_t, v, st, ss, noise_level=a)
    g = a * math.sqrt(st / (1 - st))
    dt = ss - st
    torch.testing.assert_close(mean, z_t * (1 + g**2 / (2 * st) * dt) + v * (1 + g**2 * (1 - st) / (2 * st)) * dt)
    torch.testing.assert_close(std, torch.full((3,), g * math.sqrt(-dt), dtype=torch.float64))
    # equivalent form: z + dt * (v + a^2/(2(1 - sigma)) * (z + (1 - sigma) v))  (RAVEN's EulerMaruyamaSampler)
    torch.testing.assert_close(mean, z_t + dt * (v + a**2 / (2 * (1 - st)) * (z_t + (1 - st) * v)))
    # sigma_t = 1: 1 - sigma in the denominator uses the next sigma (Flow-GRPO's sigmas[1])
    mean1, std1 = euler_maruyama_step_mean_std(z_t, v, 1.0, 0.938, noise_level=a)
    g1 = a * math.sqrt(1.0 / (1 - 0.938))
    torch.testing.assert_close(mean1, z_t * (1 + g1**2 / 2 * (0.938 - 1.0)) + v * (0.938 - 1.0))
    assert torch.isfinite(std1).all()
    with pytest.raises(ValueError):
        euler_maruyama_step_mean_std(z_t, v, 0.5, 0.6)


def test_em_kernel_loss_gradient_is_minus_A_grad_log_pi():
    sigma_t = torch.tensor([1.0, 0.938, 0.833], dtype=torch.float64)
    sigma_s = torch.tensor([0.938, 0.833, 0.625], dtype=torch.float64)
    adv = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    z_t = _randn(0)
    x0 = _randn(1).requires_grad_(True)
    v = (z_t - x0.detach()) / sigma_t.view(-1, 1, 1, 1, 1)
    mean, std = euler_maruyama_step_mean_std(z_t, v, sigma_t, sigma_s, 0.7)
    z_next = mean + std.view(-1, 1, 1, 1, 1) * _randn(2)
    (grad,) = torch.autograd.grad(
        euler_maruyama_kernel_loss(x0, z_t, z_next, sigma_t, sigma_s, adv, 0.7).sum(), x0
    )
    x0b = x0.detach().clone().requires_grad_(True)
    vb = (z_t - x0b) / sigma_t.view(-1, 1, 1, 1, 1)
    mean_b, std_b = euler_maruyama_step_mean_std(z_t, vb, sigma_t, sigma_s, 0.7)
    (grad_logp,) = torch.autograd.grad(gaussian_log_prob(z_next, mean_b, std_b).sum(), x0b)
    torch.testing.assert_close(grad, -adv.view(-1, 1, 1, 1, 1) * grad_logp, rtol=1e-10, atol=1e-10)
