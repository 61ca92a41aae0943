"""The token-parallel transformer (``enable_realtime(devices=..., transformer_split=...)``): each device computes a
share of every chunk's tokens, the K/V are exchanged before each self-attention; outputs equal the one-device path."""

import logging

import pytest
import torch

from raven_video.pipelines.token_parallel import TokenParallelDenoiser, token_bounds
from raven_video.testing import tiny_causal_transformer, tiny_pipeline

SIZE = dict(num_frames=33, height=32, width=48)


def test_token_bounds_are_contiguous_aligned_and_refuse_an_empty_share():
    assert token_bounds(4680, (0.5, 0.5)) == [(0, 2368), (2368, 4680)]  # cut at a multiple of 64
    assert token_bounds(4680, (0.7, 0.3)) == [(0, 3264), (3264, 4680)]
    assert token_bounds(4680, (1, 1, 1)) == [(0, 1536), (1536, 3136), (3136, 4680)]
    assert token_bounds(18, (0.5, 0.5)) == [(0, 9), (9, 18)]  # small chunks: no alignment
    with pytest.raises(ValueError, match=r"shares \(0\.99, 0\.01\) leave a device without tokens"):
        token_bounds(18, (0.99, 0.01))


@pytest.fixture(scope="module")
def eager_frames():
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames


@pytest.mark.parametrize("split, unsplit_forwards", [(0.5, 0), (0.3, 0), (0.5, 1), (0.5, 2)])
def test_split_stream_equals_the_eager_stream(eager_frames, split, unsplit_forwards):
    """Two replicas (both on the CPU here) each compute a share of the tokens: two streams in a row (the caches are
    reset, the exchange buffers reused) give the eager frames, and the second replica really did part of the work
    (with ``unsplit_forwards`` fewer forwards: the first device runs the cache passes, then the next chunks' first
    steps, whole)."""
    pipe = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False, devices=("cpu", "cpu"),
                                                 transformer_split=split, unsplit_forwards=unsplit_forwards)
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe._realtime_denoiser
    assert isinstance(denoiser, TokenParallelDenoiser) and denoiser.replicas[1] is not pipe.transformer
    seen = []
    second = denoiser.replicas[1].blocks[0]
    second.register_forward_pre_hook(lambda *a: seen.append("block"))  # the block's own forward is never called
    pre = second._pre_attention
    second._pre_attention = lambda block, hidden, *a: (seen.append(hidden.shape[1]), pre(block, hidden, *a))[1]
    for _ in range(2):
        out = pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames
        torch.testing.assert_close(out, eager_frames, rtol=0, atol=1e-5)
    (bounds,) = [ex.bounds for ex in denoiser._exchanges.values()]
    assert bounds == token_bounds(18, (split, 1 - split))
    assert seen and set(seen) == {bounds[1][1] - bounds[1][0]}  # replica 1 saw only its share, every forward
    chunks, steps = 3, 4  # per stream: 12 denoising forwards and 2 cache passes; whole: 2 x unsplit_forwards
    assert len(seen) == 2 * (chunks * steps + chunks - 1 - (chunks - 1) * unsplit_forwards)


def test_calls_it_does_not_split_run_on_the_first_device():
    """Gradients and per-frame timesteps go to the first replica's ordinary forward, with the same result."""
    transformer = tiny_causal_transformer(seed=0).eval()
    denoiser = TokenParallelDenoiser(transformer, ("cpu", "cpu"), cuda_graphs=False)
    reference = TokenParallelDenoiser(tiny_causal_transformer(seed=0).eval(), ("cpu", "cpu"), cuda_graphs=False)
    text = torch.randn(1, 8, transformer.config.text_dim)
    x = torch.randn(1, 16, 3, 4, 6)
    per_frame = torch.full((1, 3), 500.0)
    out = denoiser(x, per_frame, text, denoiser.kv_cache(1, 4, 6, max_frames=9), frame_offset=0)
    expected = reference.transformer(x, per_frame, text, kv_cache=reference.kv_cache(1, 4, 6, max_frames=9)).sample
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_transformer_split_is_validated_before_any_work(caplog):
    pipe = tiny_pipeline(seed=0)
    with pytest.raises(ValueError, match=r"transformer_split=0\.7 needs devices=\(first, second\)"):
        pipe.enable_realtime(compile=False, transformer_split=0.7)
    with pytest.raises(ValueError, match=r"transformer_split=1\.0 must be in \(0, 1\)"):
        pipe.enable_realtime(compile=False, devices=("cpu", "cpu"), transformer_split=1.0)
    with pytest.raises(ValueError, match=r"devices=\('cpu',\)"):
        TokenParallelDenoiser(pipe.transformer, ("cpu",))
    with pytest.raises(ValueError, match=r"shares=\(1\.0, 0\.0\): give one positive share per device"):
        TokenParallelDenoiser(pipe.transformer, ("cpu", "cpu"), shares=(1, 0))
    with pytest.raises(ValueError, match=r"unsplit_forwards=1 needs transformer_split"):
        pipe.enable_realtime(compile=False, devices=("cpu", "cpu"), unsplit_forwards=1)
    with pytest.raises(ValueError, match=r"unsplit_forwards=-1: give a whole number >= 0"):
        pipe.enable_realtime(compile=False, devices=("cpu", "cpu"), transformer_split=0.5, unsplit_forwards=-1)
    with pytest.raises(ValueError, match=r"unsplit_forwards=1\.5: give a whole number >= 0"):
        TokenParallelDenoiser(pipe.transformer, ("cpu", "cpu"), unsplit_forwards=1.5)
    with caplog.at_level(logging.WARNING, logger="raven_video.pipelines.pipeline_causal_wan"):
        pipe.enable_realtime(compile=False, cudnn_benchmark=False, devices=("cpu", "cuda:1"), transformer_split=0.7)
    lines = [r.getMessage() for r in caplog.records if "devices=" in r.getMessage()]
    assert len(lines) == 1 and "cuda:1 is not available here; decoding and the whole transformer on cpu" in lines[0]
    assert not isinstance(pipe._realtime_denoiser, TokenParallelDenoiser)


def test_one_gpu_named_twice_is_not_split(monkeypatch, caplog):
    """``devices=("cuda:0", "cuda:0")`` with a split would only put a second replica on the same GPU: one log line,
    no split (checked with a pretend two-GPU machine; on CPU a repeated device is how the tests split)."""
    from raven_video.pipelines.pipeline_causal_wan import CausalWanPipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="raven_video.pipelines.pipeline_causal_wan"):
        assert not CausalWanPipeline._split_transformer(("cuda:0", "cuda"))
        assert CausalWanPipeline._split_transformer(("cuda:0", "cuda:1"))
        assert CausalWanPipeline._split_transformer(("cpu", "cpu"))
        assert not CausalWanPipeline._split_transformer(("cuda:0", "cuda:2"))  # not there: _place_decoder says so
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["enable_realtime(transformer_split=...): devices=('cuda:0', 'cuda') name one GPU twice; the "
                     "transformer stays whole"], lines


@pytest.mark.parametrize("unsplit_forwards", [0, 2])
def test_split_stream_with_a_window_and_a_prompt_switch_equals_the_eager_one(unsplit_forwards):
    """The ring-buffer KV window (reads gathered from several ranges, old frames overwritten) and a prompt switch
    (the text K/V dropped and the history re-cached) reach every replica's cache, also when the first device runs
    the cache passes alone and copies their K/V over: the latents equal the eager ones."""
    size = dict(num_frames=57, height=32, width=48, output_type="latent")  # 5 chunks
    options = dict(local_attn_size=6, sink_size=3, prompt_schedule={3: "a red car drives"})
    eager = tiny_pipeline(seed=0)
    split = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False, devices=("cpu", "cpu"),
                                                  transformer_split=0.5, unsplit_forwards=unsplit_forwards)
    for pipe in (eager, split):
        pipe.set_progress_bar_config(disable=True)
    expected = torch.cat([c.latents for c in eager.stream("a cat walks", generator=torch.Generator().manual_seed(0),
                                                         **size, **options)], dim=2)
    out = torch.cat([c.latents for c in split.stream("a cat walks", generator=torch.Generator().manual_seed(0),
                                                     **size, **options)], dim=2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    first, second = split._realtime_denoiser.caches
    assert first.slot_frame == second.slot_frame and first.num_cached_frames < 12  # the window evicted frames
    for a, b in zip(first.keys + first.text_keys, second.keys + second.text_keys):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
