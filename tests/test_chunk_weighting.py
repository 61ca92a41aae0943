"""Chunk-wise loss weighting (docs/method.md §3.5): the 7-chunk table, parsing, limits and the global reduction."""

import pytest
import torch

from raven_video.training.chunk_weighting import (
    ChunkWeighting,
    chunk_weighted_count,
    chunk_weighted_loss,
    chunk_weights,
    parse_chunk_weighting,
    per_chunk_means,
)

# docs/method.md §3.5 worked example, 7 equal chunks.
SPEC_TABLE = {
    "-1": [0.3857, 0.4500, 0.5399, 0.6749, 0.8999, 1.3499, 2.6997],
    "-2": [0.5094, 0.5821, 0.6791, 0.8150, 1.0187, 1.3583, 2.0374],
    "-0.5": [0.2754, 0.3255, 0.3978, 0.5115, 0.7161, 1.1934, 3.5803],
    "0": [1, 1, 1, 1, 1, 1, 1],
    "1": [1.75, 1.50, 1.25, 1.00, 0.75, 0.50, 0.25],
    "2": [1.4650, 1.3523, 1.2208, 1.0655, 0.8790, 0.6511, 0.3663],
    "ln_0_1": [0.2561, 1.0022, 1.4493, 1.5849, 1.4493, 1.0022, 0.2561],
    "mode_-0.54": [1.3948, 0.9231, 0.7986, 0.7668, 0.7986, 0.9231, 1.3948],
    "mode_0.81": [0.6110, 0.7960, 1.2162, 1.7536, 1.2162, 0.7960, 0.6110],
}


@pytest.mark.parametrize("spec", sorted(SPEC_TABLE))
@pytest.mark.parametrize("unit", [1, 3, 4680])  # frames, latent frames x 1, tokens per chunk
def test_spec_table(spec, unit):
    w = chunk_weights([unit] * 7, spec)
    assert w.dtype == torch.float64 and w.shape == (7,)
    torch.testing.assert_close(w, torch.tensor(SPEC_TABLE[spec], dtype=torch.float64), atol=1e-4, rtol=0)
    assert float(w.sum()) == pytest.approx(7.0)  # equal chunks: mean weight 1


def test_alpha_minus_one_is_late_emphasis():
    w = chunk_weights([3] * 7, -1)
    assert float(w[-1] / w[0]) == pytest.approx(7.0)
    assert torch.all(w[1:] > w[:-1])


def test_numeric_forms_and_aliases():
    assert chunk_weights([3] * 7, -1.0).tolist() == chunk_weights([3] * 7, "-1").tolist()
    assert chunk_weights([3] * 7, "mode_0_81").tolist() == chunk_weights([3] * 7, "mode_0.81").tolist()
    assert chunk_weights([3] * 7, "uniform").tolist() == [1.0] * 7
    assert chunk_weights([3] * 7, 0).tolist() == [1.0] * 7
    parsed = parse_chunk_weighting("mode_-0.54")
    assert parsed.kind == "mode" and parsed.scale == pytest.approx(-0.54)
    assert parse_chunk_weighting("ln_0_1") == ChunkWeighting("logit_normal", loc=0.0, scale=1.0, spec="ln_0_1")
    assert parse_chunk_weighting(" -2 ").alpha == -2.0
    assert parse_chunk_weighting(parsed) is parsed


@pytest.mark.parametrize(
    "bad", ["", "foo", "ln_0", "ln_0_0", "ln_0_-1", "ln_a_b", "mode", "mode_x", "mode_1_2_3", "mode_2", "nan", "inf", True]
)
def test_bad_specs_raise_with_accepted_forms(bad):
    with pytest.raises(ValueError) as err:
        parse_chunk_weighting(bad)
    assert repr(bad) in str(err.value) and "Accepted forms" in str(err.value)


def test_first_chunk_size_differs():
    # chunk sizes in frames [4, 3, 3]: p = [1, 6/10, 3/10]
    p = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64)
    n = torch.tensor([4.0, 3.0, 3.0], dtype=torch.float64)
    for alpha in (-1.0, -2.0, 2.0):
        if alpha > 0:
            raw = alpha * p / (1 + (alpha - 1) * p)
        else:
            rho, a = p[-1] / p, -alpha
            raw = a * rho / (1 + (a - 1) * rho)
        expected = raw * n.sum() / (raw * n).sum()
        w = chunk_weights([4, 3, 3], alpha)
        torch.testing.assert_close(w, expected)
        assert float((w * n).sum()) == pytest.approx(10.0)
        # elements instead of frames give the same weights
        torch.testing.assert_close(chunk_weights([4 * 1560, 3 * 1560, 3 * 1560], alpha), expected)


def test_limits():
    n = [3] * 7
    # alpha -> 0+: all weight on chunk 1; alpha -> 0-: all weight on the last chunk; |alpha| -> inf: uniform.
    w = chunk_weights(n, 1e-9)
    assert float(w[0]) == pytest.approx(7.0, rel=1e-6) and float(w[1:].abs().max()) < 1e-6
    w = chunk_weights(n, -1e-9)
    assert float(w[-1]) == pytest.approx(7.0, rel=1e-6) and float(w[:-1].abs().max()) < 1e-6
    for big in (1e9, -1e9):
        torch.testing.assert_close(chunk_weights(n, big), torch.ones(7, dtype=torch.float64), atol=1e-6, rtol=0)
    # alpha = 1 is exactly the participation, normalised
    torch.testing.assert_close(
        chunk_weights(n, 1), torch.tensor([7, 6, 5, 4, 3, 2, 1], dtype=torch.float64) / 4.0
    )
    # single chunk: weight 1 for any function
    for spec in SPEC_TABLE:
        assert chunk_weights([5], spec).tolist() == pytest.approx([1.0])


def test_chunk_weights_rejects_bad_sizes():
    for sizes in ([], [3, 0, 3], [-1]):
        with pytest.raises(ValueError, match="chunk_sizes"):
            chunk_weights(sizes, -1)


def test_chunk_frame_sizes():
    from raven_video.models.attention_layout import chunk_sizes as chunk_frame_sizes

    assert chunk_frame_sizes(21, 3) == [3] * 7
    assert chunk_frame_sizes(21, 3, 3) == [3] * 7
    assert chunk_frame_sizes(10, 3, 4) == [4, 3, 3]
    assert chunk_frame_sizes(1, 3, 1) == [1]
    with pytest.raises(ValueError, match="do not fit"):
        chunk_frame_sizes(22, 3)
    with pytest.raises(ValueError, match="do not fit"):
        chunk_frame_sizes(2, 3)


def test_weighted_loss_matches_manual_and_gradient():
    torch.manual_seed(0)
    frames = [4, 3, 3]
    x = torch.randn(2, 2, 10, 3, 5, dtype=torch.float64, requires_grad=True)
    per_element = x**2
    loss = chunk_weighted_loss(per_element, frames, -1)
    w = chunk_weights(frames, -1)
    w_frame = torch.repeat_interleave(w, torch.tensor(frames))
    manual = (per_element.detach() * w_frame.view(1, 1, 10, 1, 1)).sum() / per_element.numel()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), manual)
    loss.backward()
    # d loss / d l_e = w_c / N  =>  d/dx = 2 x w_c / N
    torch.testing.assert_close(x.grad, 2 * x.detach() * w_frame.view(1, 1, 10, 1, 1) / per_element.numel())
    # uniform weighting is the plain mean
    torch.testing.assert_close(chunk_weighted_loss(per_element.detach(), frames, 0), per_element.detach().mean())
    assert float(chunk_weighted_count(per_element, frames, -1)) == pytest.approx(per_element.numel())


def test_global_reduction_equals_single_process():
    """Two ranks with different batch sizes + all-reduced count == one process with both (docs/method.md §3.5)."""
    torch.manual_seed(1)
    frames = [3] * 7
    a = torch.rand(1, 2, 21, 2, 2, dtype=torch.float64)
    b = torch.rand(3, 2, 21, 2, 2, dtype=torch.float64)
    global_count = chunk_weighted_count(a, frames, -1) + chunk_weighted_count(b, frames, -1)
    loss_a = chunk_weighted_loss(a, frames, -1, global_weighted_count=global_count, world_size=2)
    loss_b = chunk_weighted_loss(b, frames, -1, global_weighted_count=global_count, world_size=2)
    single = chunk_weighted_loss(torch.cat([a, b]), frames, -1)
    # DDP averages gradients (and hence the losses) over ranks.
    torch.testing.assert_close((loss_a + loss_b) / 2, single)
    # Without a global count, equal per-rank counts are assumed.
    torch.testing.assert_close(chunk_weighted_loss(a, frames, -1, world_size=4), chunk_weighted_loss(a, frames, -1))


def test_weighted_loss_errors_and_frame_dim():
    x = torch.ones(1, 2, 9, 2, 2)
    with pytest.raises(ValueError, match="sums to 6 but the loss map has 9 frames"):
        chunk_weighted_loss(x, [3, 3], -1)
    with pytest.raises(ValueError, match="world_size"):
        chunk_weighted_loss(x, [3, 3, 3], -1, world_size=0)
    # frame axis elsewhere: [B, F, C, H, W]
    y = torch.rand(2, 9, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(
        chunk_weighted_loss(y, [3, 3, 3], -1, frame_dim=1),
        chunk_weighted_loss(y.transpose(1, 2), [3, 3, 3], -1, frame_dim=2),
    )


def test_per_chunk_means():
    x = torch.arange(9, dtype=torch.float32).view(1, 1, 9, 1, 1).expand(2, 2, 9, 1, 1)
    torch.testing.assert_close(per_chunk_means(x, [3, 3, 3]), torch.tensor([1.0, 4.0, 7.0], dtype=torch.float64))
