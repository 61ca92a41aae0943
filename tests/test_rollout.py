"""Self-rollout == pipeline sampling, and the history modes of paper Table 2 (Eq. 5, Alg. 1)."""

import pytest
import torch

from raven_video.testing import tiny_causal_transformer, tiny_pipeline
from raven_video.training.raven_step import (
    RavenConfig, TrainState, critic_loss, generator_loss, raven_iteration,
)
from raven_video.training.rollout import GeneratorForward, Rollout, generator_prediction, self_rollout, student_prediction

SHAPE = (1, 16, 6, 4, 6)  # B, C, F (3 chunks of 2 latent frames), H, W
BLOCK = dict(num_frames_per_block=2)


def _text(batch=1, seed=0):
    return torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(seed))


def test_rollout_equals_pipeline_sampling():
    pipe = tiny_pipeline(**BLOCK)
    pipe.set_progress_bar_config(disable=True)
    text = _text()
    rollout = self_rollout(pipe.transformer, text, SHAPE, generator=torch.Generator().manual_seed(7))
    assert rollout.trajectory.shape == (4, *SHAPE) and rollout.endpoints.shape == SHAPE
    streamed = list(pipe.stream(prompt_embeds=text, num_frames=21, height=32, width=48, output_type="latent",
                                generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(rollout.endpoints, torch.cat([c.latents for c in streamed], 2), rtol=0, atol=0)
    # the pipeline's sampler, driven with the same noise, steps through exactly the rollout's trajectory
    sampler = pipe.sampler("cpu")
    generator = torch.Generator().manual_seed(7)
    latents = torch.randn(SHAPE, generator=generator)
    recorded = [[] for _ in range(4)]
    chunks = list(sampler.sample(latents, text, sampler.denoiser.kv_cache(1, 4, 6, max_frames=6), [2, 2, 2],
                                 generator, observer=lambda c, k, z: recorded[k].append(z.clone())))
    torch.testing.assert_close(rollout.endpoints, torch.cat([c.latents for c in chunks], 2), rtol=0, atol=0)
    for k in range(4):
        torch.testing.assert_close(rollout.trajectory[k], torch.cat(recorded[k], 2), rtol=0, atol=0)
    whole = pipe(prompt_embeds=text, num_frames=21, height=32, width=48, output_type="latent",
                 generator=torch.Generator().manual_seed(7)).frames
    torch.testing.assert_close(rollout.endpoints, whole, rtol=0, atol=0)


def test_guided_rollout_needs_negative_and_matches_pipeline():
    pipe = tiny_pipeline(**BLOCK)
    pipe.set_progress_bar_config(disable=True)
    text, neg = _text(), _text(seed=1)
    with pytest.raises(ValueError, match="negative_text"):
        self_rollout(pipe.transformer, text, SHAPE, guidance_scale=3.0)
    rollout = self_rollout(pipe.transformer, text, SHAPE, generator=torch.Generator().manual_seed(3),
                           guidance_scale=3.0, negative_text=neg)
    ref = pipe(prompt_embeds=text, negative_prompt_embeds=neg, guidance_scale=3.0, num_frames=21, height=32,
               width=48, output_type="latent", generator=torch.Generator().manual_seed(3)).frames
    torch.testing.assert_close(rollout.endpoints, ref, rtol=0, atol=0)


def _model64():
    return tiny_causal_transformer(dtype=torch.float64, **BLOCK)


def _rollout64(model, text):
    r = self_rollout(model, text, SHAPE, generator=torch.Generator().manual_seed(0))
    return Rollout(r.trajectory.double(), r.endpoints.double(), r.timesteps)


def test_raven_prediction_replays_rollout():
    """Training-time test = inference (DESIGN invariant 2): at the last step x̂0 equals the rollout endpoints."""
    model = _model64()
    text = _text().double()
    rollout = _rollout64(model, text)
    for k in range(4):
        x0, u = generator_prediction(model, "raven", rollout, torch.tensor([k]), text)
        sf, _ = generator_prediction(model, "self_forcing", rollout, torch.tensor([k]), text)
        if k == 3:
            torch.testing.assert_close(x0.double(), rollout.endpoints, rtol=0, atol=1e-5)
        assert float(u) == rollout.timesteps[k]
        assert sf.shape == x0.shape


def _last_chunk_param_grads(model, history, rollout, text):
    model.zero_grad()
    x0, _ = generator_prediction(model, history, rollout, torch.tensor([1]), text)
    x0[:, :, -2:].pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_reach_history_in_raven_not_in_self_forcing():
    model = _model64()
    text = _text().double()
    rollout = _rollout64(model, text)
    # (a) raven: the last chunk's loss reaches the clean history copies (gradient w.r.t. the endpoints).
    endpoints = rollout.endpoints.clone().requires_grad_(True)
    x0, _ = generator_prediction(model, "raven", Rollout(rollout.trajectory, endpoints, rollout.timesteps),
                                 torch.tensor([1]), text)
    x0[:, :, -2:].pow(2).sum().backward()
    assert endpoints.grad[:, :, :4].abs().sum() > 0  # history chunks 1-2 receive gradient
    # (b) self_forcing: the history is a detached cache -> earlier chunks' inputs get no gradient from the last chunk.
    trajectory = rollout.trajectory.clone().requires_grad_(True)
    x0, _ = generator_prediction(model, "self_forcing", Rollout(trajectory, rollout.endpoints, rollout.timesteps),
                                 torch.tensor([1]), text)
    x0[:, :, -2:].pow(2).sum().backward()
    assert trajectory.grad[1, :, :, :4].abs().sum() == 0
    assert trajectory.grad[1, :, :, 4:].abs().sum() > 0
    # (c) parameter level: raven's last-chunk gradient includes the path through the history's K/V, which a
    # forward with a detached history (same values) lacks.
    g_raven = _last_chunk_param_grads(model, "raven", rollout, text)
    g_detached = _detached_history_grads(model, rollout, text)
    diff = sum((g_raven[n] - g_detached[n]).abs().sum() for n in g_raven)
    assert diff > 1e-8


def _detached_history_grads(model, rollout, text):
    """Last-chunk gradient when the history K/V (the rollout endpoints) come from a no-grad cache."""
    model.zero_grad()
    batch, _, frames, h, w = rollout.endpoints.shape
    cache = model.new_kv_cache(batch, h, w, max_frames=frames, dtype=torch.float64)
    zero = torch.zeros(batch, dtype=torch.float64)
    with torch.no_grad():
        for start in (0, 2):
            model(rollout.endpoints[:, :, start:start + 2], zero, text, kv_cache=cache, frame_offset=start,
                  update_cache=True)
    u = torch.tensor([float(rollout.timesteps[1])], dtype=torch.float64)
    z = rollout.trajectory[1][:, :, 4:]
    x0 = z - u.view(-1, 1, 1, 1, 1) / 1000 * model(z, u, text, kv_cache=cache, frame_offset=4).sample
    # same forward values as raven (invariant 2) ...
    ref, _ = generator_prediction(model, "raven", rollout, torch.tensor([1]), text)
    torch.testing.assert_close(x0, ref[:, :, 4:].double(), rtol=0, atol=1e-5)  # Wan blocks compute some parts in fp32
    x0.pow(2).sum().backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_teacher_and_diffusion_forcing_use_data_latents():
    model = _model64()
    text = _text().double()
    rollout = _rollout64(model, text)
    data = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for mode in ("teacher_forcing", "diffusion_forcing"):
        with pytest.raises(ValueError, match="latent_dataset"):
            generator_prediction(model, mode, rollout, torch.tensor([1]), text)
        leaf = data.clone().requires_grad_(True)
        x0, _ = generator_prediction(model, mode, rollout, torch.tensor([1]), text,
                                     generator=torch.Generator().manual_seed(1), data_latents=leaf)
        x0[:, :, -2:].pow(2).sum().backward()
        assert leaf.grad[:, :, :4].abs().sum() > 0, mode  # the history is the data
        # independent of the self-rollout's endpoints
        other = Rollout(rollout.trajectory, rollout.endpoints + 1.0, rollout.timesteps)
        a, _ = generator_prediction(model, mode, rollout, torch.tensor([1]), text,
                                    generator=torch.Generator().manual_seed(1), data_latents=data)
        b, _ = generator_prediction(model, mode, other, torch.tensor([1]), text,
                                    generator=torch.Generator().manual_seed(1), data_latents=data)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # teacher forcing == interleaved forward with clean = data latents
    x0, u = generator_prediction(model, "teacher_forcing", rollout, torch.tensor([0]), text,
                                 generator=torch.Generator().manual_seed(1), data_latents=data)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).double()
    noisy = noise  # u = 1000 -> pure noise
    v = model.forward_interleaved(noisy, data, torch.tensor([1000.0], dtype=torch.float64), text)
    torch.testing.assert_close(x0.double(), noisy - v, rtol=0, atol=1e-6)
    # df_self_rollout builds its sequence from the rollout endpoints
    x0, t = generator_prediction(model, "df_self_rollout", rollout, torch.tensor([1]), text,
                                 generator=torch.Generator().manual_seed(1))
    assert t.shape == (1, 6) and torch.isfinite(x0).all()


def _state(student, critic, teacher, lr=1e-3):
    return TrainState(
        student=GeneratorForward(student), student_train=GeneratorForward(student), critic_train=critic,
        teacher=teacher,
        student_optimizer=torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.0, 0.999)),
        critic_optimizer=torch.optim.AdamW(critic.parameters(), lr=lr, betas=(0.0, 0.999)),
    )


def test_iteration_updates_critic_every_step_and_generator_every_ttur():
    student = tiny_causal_transformer(**BLOCK)
    critic = tiny_causal_transformer(seed=1, **BLOCK)
    teacher = tiny_causal_transformer(seed=2, **BLOCK).requires_grad_(False)
    state = _state(student, critic, teacher)
    text, neg = _text(), _text(seed=1)
    before_s = [p.detach().clone() for p in student.parameters()]
    before_c = [p.detach().clone() for p in critic.parameters()]
    logs = raven_iteration(state, 0, text, neg, SHAPE, RavenConfig(), torch.Generator().manual_seed(0))
    assert "dmd_loss" not in logs and all(torch.equal(a, b) for a, b in zip(before_s, student.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before_c, critic.parameters()))
    logs = raven_iteration(state, 1, text, neg, SHAPE, RavenConfig(), torch.Generator().manual_seed(1))
    assert not all(torch.equal(a, b) for a, b in zip(before_s, student.parameters()))
    for key in ("dmd_loss", "dmd_norm", "critic_loss", "grad_norm_generator", "grad_norm_critic",
                "dmd_loss_chunk_2", "critic_loss_chunk_0", "time_rollout", "time_critic", "time_generator"):
        assert key in logs and torch.isfinite(torch.tensor(logs[key])), key


def test_non_finite_gradient_skips_the_step():
    student = tiny_causal_transformer(**BLOCK)
    critic = tiny_causal_transformer(seed=1, **BLOCK)
    teacher = tiny_causal_transformer(seed=2, **BLOCK).requires_grad_(False)
    with torch.no_grad():
        teacher.proj_out.bias.fill_(float("nan"))
    state = _state(student, critic, teacher)
    before = [p.detach().clone() for p in student.parameters()]
    logs = raven_iteration(state, 1, _text(), _text(seed=1), SHAPE, RavenConfig(), torch.Generator().manual_seed(0))
    assert logs["skipped_generator"] == 1.0 and logs["skipped_critic"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_critic_loss_matches_flow_matching_target():
    critic = tiny_causal_transformer(seed=1, dtype=torch.float64, **BLOCK)
    x = torch.randn(SHAPE, dtype=torch.float64)
    loss, logs = critic_loss(critic, x, _text().double(), torch.Generator().manual_seed(0), [2, 2, 2])
    g = torch.Generator().manual_seed(0)
    from raven_video.training.timesteps import sample_score_timesteps
    t = sample_score_timesteps(1, generator=g)
    eps = torch.randn(SHAPE, generator=g).double()
    sigma = t.double() / 1000
    v = critic((1 - sigma) * x + sigma * eps, t.double(), _text().double()).sample
    torch.testing.assert_close(loss, ((v - (eps - x)) ** 2).mean())
    assert logs["critic_t"] == float(t)


@pytest.mark.parametrize("history", ["raven", "self_forcing", "df_self_rollout"])
def test_gradient_checkpointing_gives_the_same_gradients(history):
    model = _model64()
    text = _text().double()
    rollout = _rollout64(model, text)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.zero_grad()
        x0, _ = generator_prediction(model, history, rollout, torch.tensor([2]), text,
                                     generator=torch.Generator().manual_seed(0))
        x0.pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert "condition_embedder.text_embedder.linear_1.weight" in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("history", ["raven", "self_forcing"])
def test_generator_forward_module_matches_direct_call(history):
    """The module the script prepares with Accelerate (DDP/FSDP2 see one call) computes the same prediction and
    grads as the direct call, and generator_loss goes through it."""
    model = _model64()
    critic = tiny_causal_transformer(seed=1, dtype=torch.float64, **BLOCK)
    teacher = tiny_causal_transformer(seed=2, dtype=torch.float64, **BLOCK)
    text, neg = _text().double(), _text(seed=1).double()
    rollout = _rollout64(model, text)
    results = []
    for call in (lambda: generator_prediction(model, history, rollout, torch.tensor([1]), text),
                 lambda: student_prediction(GeneratorForward(model), history, rollout, torch.tensor([1]), text)):
        model.zero_grad()
        x0, _ = call()
        x0.pow(2).sum().backward()
        results.append((x0.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)
    loss, _ = generator_loss(GeneratorForward(model), critic, teacher, rollout, text, neg, RavenConfig(history=history),
                             torch.Generator().manual_seed(0), [2, 2, 2])
    assert torch.isfinite(loss)
