"""Teacher PF-ODE trajectories and the student's ODE-regression initialisation (``docs/training.md``).

The student starts from a regression on the teacher's deterministic sampling paths (CausVid / Self Forcing; the
paper's RAVEN starts from Causal Forcing's checkpoint made this way): the teacher integrates the flow ODE
``dz / dsigma = v(z, sigma)`` from noise with Euler steps on a grid that contains the student's few-step sigmas
``[1, .938, .833, .625]`` as knots; the states at those knots and the endpoint ``x0`` form one training pair per level.
The student learns ``x0`` from the state at ``t_k`` through the interleaved forward of Eq. (5) with the trajectory's
endpoints as its clean history (the same forward as its DMD step, ``training/rollout.py``).

Two teachers (``teacher_trajectory``):

* ``bidirectional``: the whole video is integrated jointly (CausVid, Self Forcing);
* ``autoregressive``: a causal teacher (``train_teacher.py --mode causal``) integrates chunk by chunk with the clean
  history in its KV cache, exactly the streaming structure of the student (Causal Forcing), through
  :class:`~raven_video.sampling.sampler.ChunkSampler` with the Euler kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sampling.flow import DEFAULT_SHIFT, NUM_TRAIN_TIMESTEPS, euler_step, guidance_combine, shift_sigma, unshift_sigma
from ..sampling.sampler import ChunkSampler, TransformerDenoiser
from .rollout import Rollout, student_prediction

__all__ = ["TEACHER_KINDS", "ode_sigmas", "teacher_trajectory", "ode_regression_loss"]

TEACHER_KINDS = ("bidirectional", "autoregressive")


def ode_sigmas(student_timesteps, num_steps: int, shift: float = DEFAULT_SHIFT) -> tuple[torch.Tensor, list[int]]:
    """An Euler grid of about ``num_steps`` steps from sigma 1 to 0 through the student's sigmas (its knots).

    Steps are uniform in the unshifted time ``tau`` (``sigma = shift_sigma(tau, shift)``, Wan's sampling grid: dense
    at high noise), each knot interval getting steps in proportion to its ``tau`` length. ``shift=1``: uniform in
    sigma. Returns ``(sigmas [N + 1] float64, indices of the student's sigmas in it)``.
    """
    knots = [unshift_sigma(float(t) / NUM_TRAIN_TIMESTEPS, shift) for t in student_timesteps] + [0.0]
    if num_steps < len(knots) - 1:
        raise ValueError(f"num_steps={num_steps} must be >= {len(knots) - 1} (one Euler step per student interval).")
    grid, marks = [knots[0]], [0]
    for a, b in zip(knots, knots[1:]):
        n = max(1, round(num_steps * (a - b) / knots[0]))
        grid.extend(a + (b - a) * (i + 1) / n for i in range(n))
        marks.append(len(grid) - 1)
    return shift_sigma(torch.tensor(grid, dtype=torch.float64), shift), marks[:-1]


@torch.no_grad()
def teacher_trajectory(teacher, text: torch.Tensor, noise: torch.Tensor, student_timesteps, num_steps: int = 48,
                       kind: str = "bidirectional", guidance_scale: float = 1.0,
                       negative_text: torch.Tensor | None = None, shift: float = DEFAULT_SHIFT) -> Rollout:
    """The teacher's PF-ODE from ``noise`` ``[B, C, F, H, W]``; returns the states at the student's timesteps and the
    endpoint as a :class:`~raven_video.training.rollout.Rollout` (``trajectory`` ``[K, B, ...]``, ``endpoints``).

    Args:
        teacher: a ``CausalWanTransformer3DModel`` (bidirectional, or causal for ``kind="autoregressive"``).
        text: ``[B, L, D]`` prompt embeddings; ``negative_text`` ``[B, L, D]`` for ``guidance_scale > 1``
            (``neg + w (pos - neg)``).
    """
    if kind not in TEACHER_KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {TEACHER_KINDS}.")
    if guidance_scale > 1.0 and negative_text is None:
        raise ValueError(f"guidance_scale={guidance_scale} > 1 needs negative_text (the empty prompt's embedding).")
    sigmas, marks = ode_sigmas(student_timesteps, num_steps, shift)
    dtype = next(teacher.parameters()).dtype
    guided = guidance_scale > 1.0
    cond = torch.cat([negative_text, text]) if guided else text
    timesteps = (sigmas[:-1] * NUM_TRAIN_TIMESTEPS).tolist()
    sigmas = sigmas.to(torch.float32).to(noise.device)
    states = [[] for _ in marks]

    if kind == "bidirectional":
        z = noise.float()
        for i, t in enumerate(timesteps):
            if i in marks:
                states[marks.index(i)].append(z.clone())
            model_in = torch.cat([z, z]) if guided else z
            t_in = torch.full((model_in.shape[0],), t, dtype=torch.float32, device=z.device)
            v = teacher(model_in.to(dtype), t_in, cond.to(dtype)).sample.float()
            if guided:
                v_neg, v_pos = v.chunk(2)
                v = guidance_combine(v_pos, v_neg, guidance_scale)
            z = euler_step(v, z, sigmas[i], sigmas[i + 1])
        endpoints = z
    else:
        sampler = ChunkSampler(TransformerDenoiser(teacher), timesteps, sigmas, kernel=euler_step)
        batch, _, frames, height, width = noise.shape
        cache = teacher.new_kv_cache(cond.shape[0], height, width, max_frames=frames, device=noise.device)

        def record(chunk, step, z):
            if step in marks:
                states[marks.index(step)].append(z.clone())

        chunks = [c.latents for c in sampler.sample(noise.float(), cond.to(dtype), cache, teacher.chunk_sizes(frames),
                                                   guidance_scale=guidance_scale, observer=record)]
        endpoints = torch.cat(chunks, dim=2)
    trajectory = torch.stack([torch.cat(parts, dim=2) for parts in states]).float()
    return Rollout(trajectory=trajectory, endpoints=endpoints.float(), timesteps=tuple(int(t) for t in student_timesteps))


def ode_regression_loss(student_train, trajectory: Rollout, step_index: torch.Tensor,
                        text: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``mean || x̂0_theta(z_{t_k}) - x0 ||^2``: the student's prediction from the trajectory's state at ``t_k`` (one
    level per video, all chunks; the endpoints as clean history) against the ODE endpoint."""
    x0_pred, _ = student_prediction(student_train, "raven", trajectory, step_index, text)
    loss = F.mse_loss(x0_pred.float(), trajectory.endpoints.float())
    return loss, {"loss": float(loss.detach()), "k_mean": float(step_index.float().mean())}
