"""Timestep schedules and samplers (docs/method.md §1; Alg. 1 l.12, l.17-18; Alg. 2 l.22)."""

import math

import pytest
import torch

from raven_video.sampling.flow import consistency_timesteps, next_timesteps, shift_sigma
from raven_video.training.timesteps import (
    sample_generator_step_index,
    sample_policy_step_index,
    sample_score_timesteps,
)


def test_shift_sigma_values():
    assert shift_sigma(0.0) == 0.0 and shift_sigma(1.0) == 1.0
    assert shift_sigma(0.5) == pytest.approx(2.5 / 3.0)
    assert shift_sigma(0.75) == pytest.approx(0.9375)
    assert shift_sigma(0.3, shift=1.0) == pytest.approx(0.3)
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(t), torch.tensor([0.625, 2.5 / 3.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="shift"):
        shift_sigma(0.5, shift=0.0)


def test_consistency_timesteps_default():
    ts = consistency_timesteps()
    assert ts == [1000, 938, 833, 625]  # 937.5 rounds half-to-even to 938
    assert all(isinstance(t, int) for t in ts)
    assert next_timesteps(ts) == [938, 833, 625, 0]
    assert consistency_timesteps(1) == [1000]
    assert consistency_timesteps(2) == [1000, round(1000 * 2.5 / 3)]
    assert consistency_timesteps(4, shift=1.0) == [1000, 750, 500, 250]


def test_next_timesteps_rejects_bad_lists():
    with pytest.raises(ValueError):
        next_timesteps([])
    with pytest.raises(ValueError):
        next_timesteps([625, 833])
    with pytest.raises(ValueError):
        consistency_timesteps(0)


def test_score_timesteps_formula_and_range():
    gen = torch.Generator().manual_seed(123)
    ts = sample_score_timesteps(4096, generator=gen)
    assert ts.dtype == torch.long and ts.shape == (4096,)
    assert int(ts.min()) >= 20 and int(ts.max()) <= 980
    # Exactly the Alg. 1 l.11-15 recipe from the same uniform draws.
    tau = torch.rand(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(123))
    expected = torch.round(1000 * (0.02 + 0.96 * 5 * tau / (1 + 4 * tau))).long()
    assert torch.equal(ts, expected)
    # Median maps through the shift: 1000 * (0.02 + 0.96 * g(0.5)) = 820.
    assert abs(float(ts.double().median()) - 820.0) < 10.0
    # Deterministic for a seed, differs across seeds.
    a = sample_score_timesteps(16, generator=torch.Generator().manual_seed(1))
    b = sample_score_timesteps(16, generator=torch.Generator().manual_seed(1))
    c = sample_score_timesteps(16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_score_timesteps_extremes():
    # tau in {0, 1} map to the interval ends 20 and 980.
    assert round(1000 * (0.02 + 0.96 * shift_sigma(0.0))) == 20
    assert round(1000 * (0.02 + 0.96 * shift_sigma(1.0))) == 980
    with pytest.raises(ValueError):
        sample_score_timesteps(2, t_min=0.9, t_max=0.1)


def test_generator_step_index_uniform_over_all_steps():
    idx = sample_generator_step_index(8000, 4, generator=torch.Generator().manual_seed(0))
    assert idx.dtype == torch.long
    counts = torch.bincount(idx, minlength=4)
    assert counts.numel() == 4 and int(counts.min()) > 1800  # ~2000 each


def test_policy_step_index_skips_last_transition():
    idx = sample_policy_step_index(6000, 4, generator=torch.Generator().manual_seed(0), skip_timesteps=1)
    assert set(idx.tolist()) == {0, 1, 2}
    counts = torch.bincount(idx, minlength=3)
    assert int(counts.min()) > 1800
    idx2 = sample_policy_step_index(100, 4, generator=torch.Generator().manual_seed(0), skip_timesteps=2)
    assert set(idx2.tolist()) <= {0, 1}


def test_policy_step_index_rejects_skip_zero():
    with pytest.raises(ValueError, match="degenerate"):
        sample_policy_step_index(4, 4, skip_timesteps=0)
    with pytest.raises(ValueError, match="skip_timesteps"):
        sample_policy_step_index(4, 4, skip_timesteps=4)


def test_sigmas_of_schedule_match_spec_constants():
    # Eq. 9: per-step constants (1 - sigma_s) / (2 sigma_s^2) = 0.0352, 0.1203, 0.480.
    sig = [t / 1000 for t in next_timesteps(consistency_timesteps())][:3]
    consts = [(1 - s) / (2 * s * s) for s in sig]
    assert [round(c, 4) for c in consts] == [0.0352, 0.1203, 0.48]
    assert not math.isnan(sum(consts))
