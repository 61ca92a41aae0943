"""Flow-matching training of a Wan transformer on video latents: the teacher of the recipe (``docs/training.md``).

Two modes of the same ``CausalWanTransformer3DModel``:

* ``bidirectional`` (Wan2.1's own objective): one noise level ``t`` per video, every frame sees every frame;
* ``causal`` (an autoregressive teacher trained with teacher forcing, as Causal Forcing's): the interleaved forward of
  Eq. (5) with the *data* as the clean history and every chunk noised to its own level, so chunk ``c`` learns to denoise
  given the clean chunks before it, exactly the situation of streaming inference.

Objective: ``|| v_theta(x_t, t, c) - (eps - x0) ||^2`` with ``x_t = (1 - sigma) x0 + sigma eps`` (docs/method.md §1),
``t`` from the shifted distribution of ``training.timesteps.sample_score_timesteps``; the text is replaced by the empty
prompt's embedding with probability ``cond_dropout`` so the teacher supports classifier-free guidance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sampling.flow import add_noise, sigma_from_timestep, velocity_target
from .timesteps import sample_score_timesteps

__all__ = ["TEACHER_MODES", "TeacherObjective", "teacher_timesteps"]

TEACHER_MODES = ("bidirectional", "causal")


def teacher_timesteps(batch: int, frames_per_chunk, mode: str, generator, shift: float) -> torch.Tensor:
    """``[B]`` (bidirectional) or per-frame ``[B, F]`` with one level per chunk (causal) training timesteps."""
    if mode == "bidirectional":
        return sample_score_timesteps(batch, generator=generator, shift=shift, t_min=0.001, t_max=1.0).float()
    per_chunk = sample_score_timesteps(batch * len(frames_per_chunk), generator=generator, shift=shift, t_min=0.001,
                                       t_max=1.0).float().view(batch, len(frames_per_chunk))
    return torch.repeat_interleave(per_chunk, torch.tensor(list(frames_per_chunk)), dim=1)


class TeacherObjective(torch.nn.Module):
    """The flow-matching loss of one batch as a module ``forward`` (the unit Accelerate prepares for DDP / FSDP2).

    Args:
        transformer: the ``CausalWanTransformer3DModel`` being trained.
        mode: ``"bidirectional"`` or ``"causal"`` (module docstring).
        shift: timestep shift of the training distribution (Wan: 5).
        cond_dropout: probability of training a video with the empty prompt's embedding (for guidance).
    """

    def __init__(self, transformer, mode: str = "bidirectional", shift: float = 5.0, cond_dropout: float = 0.1):
        super().__init__()
        if mode not in TEACHER_MODES:
            raise ValueError(f"mode={mode!r}; choose one of {TEACHER_MODES}.")
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout={cond_dropout} must be in [0, 1).")
        self.transformer, self.mode, self.shift, self.cond_dropout = transformer, mode, shift, cond_dropout

    def forward(self, latents: torch.Tensor, text: torch.Tensor, empty_text: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """``latents`` ``[B, C, F, H, W]`` (normalised), ``text`` ``[B, L, D]``, ``empty_text`` ``[1, L, D]``."""
        batch, device = latents.shape[0], latents.device
        dtype = next(self.transformer.parameters()).dtype
        sizes = self.transformer.chunk_sizes(latents.shape[2])
        t = teacher_timesteps(batch, sizes, self.mode, generator, self.shift).to(device)
        # the noise is drawn where the latents are, from a seed drawn from ``generator`` (resumes replay it): a CPU
        # draw of [B, 16, 21, 16, 16] floats and its copy cost more than the world transformer's step at batch 128
        noise_generator = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        noise = torch.randn(latents.shape, generator=noise_generator, device=device)
        drop = (torch.rand(batch, generator=generator) < self.cond_dropout).to(device)
        text = torch.where(drop.view(-1, 1, 1), empty_text.to(text.dtype).expand_as(text), text)
        x0 = latents.float()
        x_t = add_noise(x0, noise, sigma_from_timestep(t, x0))
        if self.mode == "bidirectional":
            v = self.transformer(x_t.to(dtype), t, text.to(dtype)).sample
        else:
            v = self.transformer.forward_interleaved(x_t.to(dtype), x0.to(dtype), t, text.to(dtype))
        loss = F.mse_loss(v.float(), velocity_target(noise, x0))
        return loss, {"loss": float(loss.detach()), "t_mean": float(t.float().mean())}
