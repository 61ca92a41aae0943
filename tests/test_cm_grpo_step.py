"""The CM-GRPO step pieces: on-kernel rollouts (consistency and Euler-Maruyama) and the policy-gradient identity of
``policy_loss`` through the network (Eq. 9). Tiny random models, CPU, float64."""

import pytest
import torch

from raven_video.testing import tiny_causal_transformer, tiny_pipeline
from raven_video.training.cm_grpo import gaussian_log_prob
from raven_video.training.euler_maruyama import EulerMaruyamaScheduler, euler_maruyama_step_mean_std
from raven_video.training.cm_grpo_step import (
    CMGRPOConfig, adapters_disabled_reference, group_rollouts, lora_config, policy_loss,
)
from raven_video.training.rollout import GeneratorForward, generator_prediction

SHAPE = (16, 6, 4, 6)  # (C, F, H, W): 2 chunks of 3 latent frames


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    transformer = tiny_causal_transformer(seed=0, dtype=torch.float64)
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(4, 4))
    with torch.no_grad():  # a non-zero adapter, so LoRA gradients flow into both A and B
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    text = torch.randn(1, 16, transformer.config.text_dim, dtype=torch.float64)
    return transformer, text


def _standardised_residuals(transformer, text, rollout, kernel, noise_level=0.7):
    """``(z_{k+1} - mean_k) / std_k`` of every trained transition under ``kernel``, from the training forward."""
    out = []
    for k in range(len(rollout.timesteps) - 1):
        idx = torch.full((rollout.endpoints.shape[0],), k, dtype=torch.long)
        with torch.no_grad():
            x0, _ = generator_prediction(transformer, "raven", rollout, idx, text.expand(len(idx), -1, -1))
        z_t, z_next = rollout.trajectory[k].double(), rollout.trajectory[k + 1].double()
        st, ss = rollout.timesteps[k] / 1000, rollout.timesteps[k + 1] / 1000
        if kernel == "consistency":
            mean, std = (1 - ss) * x0.double(), ss
        else:
            mean, std = euler_maruyama_step_mean_std(z_t, (z_t - x0.double()) / st, st, ss, noise_level)
            std = std[0]
        out.append(((z_next - mean) / std).flatten())
    return torch.cat(out)


@pytest.mark.parametrize("kernel", ["consistency", "euler_maruyama"])
def test_rollouts_sample_the_trained_kernel(model, kernel):
    """Rollout transitions are exact draws from the kernel whose likelihood the loss uses (on-kernel gradient)."""
    transformer, text = model
    config = CMGRPOConfig(policy_kernel=kernel, group_size=3, groups_per_infer=2)
    rollout = group_rollouts(transformer, text, SHAPE, config, torch.Generator().manual_seed(0))
    assert rollout.trajectory.shape == (4, 3, *SHAPE) and rollout.endpoints.shape == (3, *SHAPE)
    own = _standardised_residuals(transformer, text, rollout, kernel)
    assert abs(float(own.mean())) < 0.05 and abs(float(own.std()) - 1) < 0.05, (own.mean(), own.std())
    other = "consistency" if kernel == "euler_maruyama" else "euler_maruyama"
    wrong = _standardised_residuals(transformer, text, rollout, other)
    assert abs(float(wrong.std()) - 1) > 0.1  # the two kernels are distinguishable: the test has power


def test_em_scheduler_last_step_is_deterministic_x0():
    from raven_video.sampling.flow import scheduler_sigmas

    scheduler = EulerMaruyamaScheduler(shift=5.0, noise_level=0.7)
    scheduler_sigmas(scheduler, [1000, 938, 833, 625])
    scheduler.set_begin_index(3)
    z, v = torch.randn(2, 16, 3, 4, 6), torch.randn(2, 16, 3, 4, 6)
    out = scheduler.step(v, scheduler.timesteps[3], z, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(out, z - 0.625 * v)


@pytest.mark.parametrize("kernel", ["consistency", "euler_maruyama"])
def test_policy_loss_gradient_is_minus_A_grad_log_pi_through_the_network(model, kernel):
    """With uniform chunk weighting, d loss / d theta = -scaling * A / N * d log pi(z_s | z_t; theta) / d theta."""
    transformer, text = model
    config = CMGRPOConfig(policy_kernel=kernel, group_size=2, groups_per_infer=2, chunk_weighting="0",
                          policy_loss_scaling=100.0)
    rollout = group_rollouts(transformer, text, SHAPE, config, torch.Generator().manual_seed(1))
    k = torch.tensor([0, 2])
    adv = torch.tensor([1.5, -0.7], dtype=torch.float64)
    texts = text.expand(2, -1, -1)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]

    loss, _ = policy_loss(GeneratorForward(transformer), rollout, k, texts, adv, config,
                          transformer.chunk_sizes(SHAPE[1]))
    grads = torch.autograd.grad(loss, params)

    x0, _ = generator_prediction(transformer, "raven", rollout, k, texts)
    rows = torch.arange(2)
    z_t, z_next = rollout.trajectory[k, rows].double(), rollout.trajectory[k + 1, rows].double()
    st = torch.tensor([rollout.timesteps[i] / 1000 for i in k.tolist()], dtype=torch.float64)
    ss = torch.tensor([rollout.timesteps[i + 1] / 1000 for i in k.tolist()], dtype=torch.float64)
    if kernel == "consistency":
        mean, std = (1 - ss).view(-1, 1, 1, 1, 1) * x0.double(), ss
    else:
        mean, std = euler_maruyama_step_mean_std(z_t, (z_t - x0.double()) / st.view(-1, 1, 1, 1, 1), st, ss, 0.7)
    log_pi = gaussian_log_prob(z_next, mean, std)  # [2]
    n = x0.numel()
    surrogate = -(100.0 * adv * log_pi).sum() / n
    expected = torch.autograd.grad(surrogate, params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-12)
    assert any(g.abs().max() > 0 for g in grads)


def test_reference_is_the_base_model_with_adapters_disabled(model):
    transformer, text = model
    base = tiny_causal_transformer(seed=0, dtype=torch.float64)
    config = CMGRPOConfig(group_size=1, groups_per_infer=1)
    rollout = group_rollouts(transformer, text, SHAPE, config, torch.Generator().manual_seed(2))
    k = torch.tensor([1])
    x0_ref = adapters_disabled_reference(transformer)(rollout, k, text)
    x0_base, _ = generator_prediction(base, "raven", rollout, k, text)
    torch.testing.assert_close(x0_ref, x0_base.detach(), rtol=1e-10, atol=1e-10)
    x0_policy, _ = generator_prediction(transformer, "raven", rollout, k, text)
    assert not torch.allclose(x0_policy, x0_ref)  # adapters are re-enabled afterwards


def test_group_rollouts_equal_pipeline_sampling():
    """The consistency rollout is the pipeline's sampler (same noise -> same endpoints)."""
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    text = torch.randn(1, 16, pipe.transformer.config.text_dim)
    config = CMGRPOConfig(group_size=2, groups_per_infer=2)
    generator = torch.Generator().manual_seed(3)
    rollout = group_rollouts(pipe.transformer, text, SHAPE, config, generator)
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn((2, *SHAPE), generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    latents = pipe(prompt_embeds=text.expand(2, -1, -1), latents=noise, output_type="latent", num_frames=21,
                   height=32, width=48, generator=torch.Generator().manual_seed(seed)).frames
    torch.testing.assert_close(rollout.endpoints, latents)


@pytest.mark.parametrize("kernel", ["consistency", "euler_maruyama"])
def test_lora_updates_raise_a_reward_the_tiny_model_can_move(kernel):
    """The CM-GRPO machinery (group rollouts on the trained kernel, group advantages, the transition-kernel loss
    through the interleaved forward, AdamW on LoRA only) raises the mean reward on held-out seeds.

    The reward is the mean of the first output-latent channel: the tiny random model moves it easily. (The same check
    through decoded videos and the script's entry point is in ``test_train_cm_grpo.py``; it needs
    ``tiny_pass_through_vae``, since a random tiny VAE hides latent changes from pixel rewards.)
    """
    from raven_video.training.cm_grpo import group_advantages
    from raven_video.training.cm_grpo_step import CMGRPOConfig, group_rollouts, lora_config, policy_loss

    model = tiny_causal_transformer(seed=0).requires_grad_(False)
    model.add_adapter(lora_config(rank=4, alpha=4))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    optimizer = torch.optim.AdamW(lora, lr=1e-2, betas=(0.0, 0.999), weight_decay=0.0)
    config = CMGRPOConfig(group_size=8, groups_per_infer=8, slices_per_step=8, policy_kernel=kernel)
    text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0))
    latent_shape = (16, 6, 4, 6)

    def reward(endpoints):
        return endpoints[:, 0].mean(dim=(1, 2, 3))

    def held_out_reward():
        return float(reward(group_rollouts(model, text, latent_shape, config, torch.Generator().manual_seed(99))
                            .endpoints).mean())

    before = held_out_reward()
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        rollout = group_rollouts(model, text, latent_shape, config, generator)
        advantages = group_advantages(reward(rollout.endpoints), torch.zeros(8, dtype=torch.long))
        k = torch.randint(0, 3, (8,), generator=generator)
        loss, _ = policy_loss(GeneratorForward(model), rollout, k, text.expand(8, -1, -1), advantages, config,
                              model.chunk_sizes(6))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = held_out_reward()
    spread = float(reward(group_rollouts(model, text, latent_shape, config, torch.Generator().manual_seed(99))
                          .endpoints).std())
    assert after > before + 2 * spread, (before, after, spread)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)
