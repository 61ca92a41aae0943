"""The real-time path (`pipe.enable_realtime()`) gives the eager path's outputs; the sampler equals the scheduler."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchLCMScheduler

from raven_video.sampling.flow import consistency_step, scheduler_sigmas
from raven_video.sampling.sampler import ChunkSampler
from raven_video.testing import tiny_pipeline

SIZE = dict(num_frames=33, height=32, width=48)


def test_consistency_step_equals_flow_match_lcm_scheduler_step():
    """Invariant 5: the sampler's sync-free step is FlowMatchLCMScheduler.step with the same noise, draw for draw."""
    scheduler = FlowMatchLCMScheduler(shift=5.0)
    sigmas = scheduler_sigmas(scheduler, [1000, 938, 833, 625])
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([1.0, 0.938, 0.833, 0.625, 0.0]), rtol=0, atol=1e-6)
    sampler = ChunkSampler(denoiser=None, timesteps=[1000, 938, 833, 625], sigmas=sigmas)
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    z = torch.randn(2, 16, 3, 4, 6)
    noise = sampler.step_noise(z.shape, g_ours, torch.device("cpu"))
    z_ref, z_ours = z.clone(), z.clone()
    for k in range(4):
        v = torch.randn_like(z)
        z_ref = scheduler.step(v, scheduler.timesteps[k], z_ref, generator=g_ref).prev_sample
        z_ours = consistency_step(v, z_ours, sigmas[k], sigmas[k + 1], noise[k])
        assert torch.equal(z_ref, z_ours)


@pytest.fixture(scope="module")
def eager_frames():
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames


def test_enable_realtime_matches_eager_and_does_not_recompile_per_chunk(eager_frames):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    # the transformer's graphs only (the fused VAE kernels' own count is checked in test_vae_fast.py)
    pipe = tiny_pipeline(seed=0).enable_realtime(backend="aot_eager", cudnn_benchmark=False, vae_fuse=False)
    pipe.set_progress_bar_config(disable=True)
    fast = pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames
    torch.testing.assert_close(fast, eager_frames, rtol=0, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    # pre/post-attention, compiled once for all 2 blocks: denoising and cache passes share the shapes,
    # the first call of each specialises once -> a handful of graphs, not one per block x chunk position
    assert 2 <= graphs <= 6, graphs
    again = pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames
    assert counters["stats"]["unique_graphs"] == graphs  # a second stream reuses every graph
    torch.testing.assert_close(again, fast, rtol=0, atol=0)


def test_realtime_stream_equals_realtime_call():
    pipe = tiny_pipeline(seed=0).enable_realtime(backend="aot_eager", cudnn_benchmark=False)
    pipe.set_progress_bar_config(disable=True)
    full = pipe("a dog runs", generator=torch.Generator().manual_seed(1), **SIZE).frames
    chunks = list(pipe.stream("a dog runs", generator=torch.Generator().manual_seed(1), **SIZE))
    assert np.array_equal(np.concatenate([c.frames for c in chunks], axis=1), full)
    assert all(c.seconds > 0 for c in chunks)


def test_self_attention_kernel_choice_keeps_outputs(eager_frames):
    pipe = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False, self_attention_kernel="math")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames
    torch.testing.assert_close(out, eager_frames, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="self-attention kernel 'fa2'"):
        pipe.transformer.set_self_attention_kernel("fa2")


def test_fa4_falls_back_with_one_log_line_where_it_cannot_run(eager_frames, caplog):
    import logging

    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING, logger="raven_video.models.transformer_causal_wan"):
        pipe.enable_realtime(compile=False, cudnn_benchmark=False, self_attention_kernel="fa4")
    lines = [r.getMessage() for r in caplog.records if "fa4" in r.getMessage()]
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], lines
    out = pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames
    torch.testing.assert_close(out, eager_frames, rtol=0, atol=1e-5)


def test_fa4_kernel_is_what_the_streaming_self_attention_calls(eager_frames, monkeypatch):
    """The FA4 seam on CPU: a stand-in kernel (SDPA on FA4's [B, L, H, D] layout) is called for every streaming
    self-attention and gives the eager outputs."""
    from raven_video.models import transformer_causal_wan as tcw

    calls = []

    def kernel(q, k, v):
        calls.append(q.shape)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2), None  # FA4 returns (out, lse)

    monkeypatch.setattr(tcw, "load_fa4", lambda device: (lambda q, k, v: kernel(q, k, v)[0], None))
    pipe = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False, self_attention_kernel="fa4")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames
    torch.testing.assert_close(out, eager_frames, rtol=0, atol=1e-5)
    assert len(calls) >= pipe.transformer.config.num_layers * 3  # every block, every chunk
    pipe.transformer.set_self_attention_kernel(None)
    calls.clear()
    pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE)
    assert not calls


def test_gelu_epilogue_seam_gives_the_eager_outputs_and_keeps_wrapped_linears(eager_frames, monkeypatch):
    """enable_realtime's FFN GELU-epilogue GEMM: off on CPU (there ``torch._addmm_activation`` computes the erf GELU);
    with a stand-in for the cuBLASLt call (tanh GELU of the biased GEMM) it is called once per block and forward and
    gives the eager outputs; a linear wrapped later (e.g. by an adapter) goes back to the module path."""
    from raven_video.models import transformer_causal_wan as tcw

    pipe = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False)
    assert not any(block._gelu_epilogue for block in pipe.transformer.blocks)  # CPU weights: not the CUDA form
    calls = []

    def addmm_gelu(bias, mat1, mat2, use_gelu=False):
        assert use_gelu and mat1.dim() == 2 and mat2.shape == (mat1.shape[1], bias.shape[0])
        calls.append(mat1.shape)
        return torch.nn.functional.gelu(torch.addmm(bias, mat1, mat2), approximate="tanh")

    monkeypatch.setattr(torch, "_addmm_activation", addmm_gelu)
    # the form check without its CUDA condition
    monkeypatch.setattr(tcw, "_gelu_epilogue_fits", lambda block: type(block.ffn.net[0].proj) is torch.nn.Linear)
    pipe = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False)
    pipe.set_progress_bar_config(disable=True)
    assert all(block._gelu_epilogue for block in pipe.transformer.blocks)
    out = pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames
    torch.testing.assert_close(out, eager_frames, rtol=0, atol=1e-5)
    chunks = len(pipe.transformer.chunk_sizes(pipe.latent_frames(SIZE["num_frames"])))
    forwards = chunks * 4 + chunks - 1  # 4 steps per chunk, a cache pass for all but the last
    assert len(calls) == pipe.transformer.config.num_layers * forwards

    class Wrapped(torch.nn.Module):  # what an adapter does to the linear: the epilogue would skip its extra path
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x) * 0.5

    block = pipe.transformer.blocks[0]
    block.ffn.net[0].proj = Wrapped(block.ffn.net[0].proj)
    x = torch.randn(1, 6, block.ffn.net[0].proj.base.in_features)
    calls.clear()
    torch.testing.assert_close(tcw._feed_forward(block, x), block.ffn(x), rtol=0, atol=0)
    assert not calls


def test_cuda_graph_runner_keeps_cache_addresses_and_stays_eager_on_cpu(eager_frames):
    """What CUDA graphs rely on, checked on CPU: one KV cache per stream shape (reset, not reallocated), text K/V
    rewritten in place for a new prompt, RoPE tables cached; on CPU the runner runs eagerly with equal outputs."""
    pipe = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False, cuda_graphs=True)
    pipe.set_progress_bar_config(disable=True)
    graphs = pipe.denoiser  # the sampler's network calls go through the CUDA-graph runner
    cache = graphs.kv_cache(1, 4, 6, max_frames=9, device="cpu")
    cache.keys[0].fill_(1.0)
    cache.slot_frame[0] = 0
    assert graphs.kv_cache(1, 4, 6, max_frames=9, device="cpu") is cache and cache.cached_frames() == []
    assert graphs.kv_cache(1, 4, 8, max_frames=9, device="cpu") is not cache  # another shape: a new cache

    model = pipe.transformer
    text = torch.randn(1, 7, 32)
    cache = model.new_kv_cache(1, 4, 6, max_frames=3)
    with torch.no_grad():
        model(torch.randn(1, 16, 3, 4, 6), torch.zeros(1), text, kv_cache=cache)
        storage = cache.text_keys[0].data_ptr()
        first = cache.text_keys[0].clone()
        cache.reset_text()
        model(torch.randn(1, 16, 3, 4, 6), torch.zeros(1), text + 1, kv_cache=cache)
    assert cache.text_keys[0].data_ptr() == storage and not torch.equal(cache.text_keys[0], first)
    tables = model._rotary([3, 4, 5], 2, 3, "cpu")
    assert model._rotary([3, 4, 5], 2, 3, "cpu") is tables
    torch.testing.assert_close(tables[0], model._rotary_tables_uncached([3, 4, 5], 2, 3, "cpu")[0], rtol=0, atol=0)

    for _ in range(2):  # the second stream reuses the first one's cache
        out = pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames
        torch.testing.assert_close(out, eager_frames, rtol=0, atol=1e-5)
    assert graphs.graphs == {} and graphs.disabled_reason is None  # CPU: nothing captured


def test_cuda_graph_capture_builds_no_rope_table_and_keeps_the_ones_it_reads(monkeypatch):
    """A capture cannot copy from the host, and a long stream (969 frames, window 21) evicts old positions from the
    transformer's RoPE table cache: the runner builds a chunk's tables before capturing and its graph keeps them. CUDA
    is faked here (the capture runs the forward eagerly); what is checked is where tables are built and who holds them."""
    import contextlib

    pipe = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False, cuda_graphs=True)
    graphs, model = pipe.denoiser, pipe.transformer
    capturing = []

    @contextlib.contextmanager
    def fake_capture(graph, pool=None):
        capturing.append(graph)
        try:
            yield
        finally:
            capturing.pop()

    build = model._rotary_tables_uncached

    def build_outside_capture(*args, **kwargs):
        assert not capturing, "a RoPE table was built inside a CUDA-graph capture"
        return build(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(type(model), "_ROTARY_CACHE_SIZE", 2)
    monkeypatch.setattr(model, "_rotary_tables_uncached", build_outside_capture)
    cache = graphs.kv_cache(1, 4, 6, local_attn_size=6, sink_size=0, device="cpu")
    with torch.no_grad():
        model(torch.randn(1, 16, 3, 4, 6), torch.zeros(1), torch.randn(1, 7, 32), kv_cache=cache, update_cache=True)
        cache.commit(0, 3)
        captured = [graphs._capture(("chunk", s), torch.randn(1, 16, 3, 4, 6), torch.full((1,), 500.0), cache, s, False)
                    for s in (3, 6, 9)]  # three positions through a two-entry table cache
    assert graphs.disabled_reason is None and all(g is not None for g in captured)
    first = captured[0].keep
    assert (3, 4, 5) not in {key[0] for key in model._rotary_tables}  # evicted from the cache ...
    torch.testing.assert_close(first[0], build([3, 4, 5], 2, 3, "cpu")[0], rtol=0, atol=0)  # ... still held, intact


def test_text_kv_cached_up_front_so_the_first_forward_can_be_a_graph(eager_frames, monkeypatch):
    """``transformer.cache_text`` fills the cache's text K/V as the first streaming forward would (same K/V, same
    output after it); the CUDA-graph denoiser calls it once per stream, so no streaming forward has to run eagerly."""
    model = tiny_pipeline(seed=0).transformer
    torch.manual_seed(0)
    latents, text = torch.randn(1, 16, 3, 4, 6), torch.randn(1, 7, 32)
    with torch.no_grad():
        first = model.new_kv_cache(1, 4, 6, max_frames=6)
        expected = model(latents, torch.full((1,), 500.0), text, kv_cache=first).sample
        upfront = model.new_kv_cache(1, 4, 6, max_frames=6)
        model.cache_text(text, upfront)
        assert upfront.has_text
        out = model(latents, torch.full((1,), 500.0), None, kv_cache=upfront).sample
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for a, b in zip(first.text_keys + first.text_values, upfront.text_keys + upfront.text_values):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    pipe = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False, cuda_graphs=True)
    pipe.set_progress_bar_config(disable=True)
    calls, texts = [], []
    cache_text = type(pipe.transformer).cache_text
    monkeypatch.setattr(type(pipe.transformer), "cache_text", lambda self, *a: (calls.append(1), cache_text(self, *a)))
    forward = type(pipe.transformer).forward
    monkeypatch.setattr(type(pipe.transformer), "forward",
                        lambda self, *a, **k: (texts.append(a[2] if len(a) > 2 else k.get("encoder_hidden_states")),
                                               forward(self, *a, **k))[1])
    for _ in range(2):
        out = pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames
        torch.testing.assert_close(out, eager_frames, rtol=0, atol=1e-5)
    assert len(calls) == 2 and texts and all(t is None for t in texts)  # once per stream; no forward given text


def test_two_device_split_validates_and_falls_back_with_one_log_line(eager_frames, caplog):
    """``enable_realtime(devices=(dit, vae))``: on this CPU-only machine a missing second GPU is one log line and the
    outputs are the eager ones; malformed device pairs are clear errors."""
    import logging

    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"give \(transformer_device, vae_device\)"):
        pipe.enable_realtime(compile=False, cudnn_benchmark=False, devices=("cpu",))
    with pytest.raises(ValueError, match=r"call pipe.to\('cuda:0'\) first"):
        pipe.enable_realtime(compile=False, cudnn_benchmark=False, devices=("cuda:0", "cpu"))
    with caplog.at_level(logging.WARNING, logger="raven_video.pipelines.pipeline_causal_wan"):
        pipe.enable_realtime(compile=False, cudnn_benchmark=False, devices=("cpu", "cuda:1"))
    lines = [r.getMessage() for r in caplog.records if "devices=" in r.getMessage()]
    assert len(lines) == 1 and "cuda:1 is not available here; decoding on cpu" in lines[0], lines
    assert pipe._decode_device is None
    out = pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames
    torch.testing.assert_close(out, eager_frames, rtol=0, atol=1e-5)
    same = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False, devices=("cpu", "cpu"))
    same.set_progress_bar_config(disable=True)
    out = same("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames
    torch.testing.assert_close(out, eager_frames, rtol=0, atol=1e-5)


def test_decode_on_another_gpu_defers_the_first_chunk_too(eager_frames, monkeypatch):
    """With the decode on a second GPU, ``stream()`` queues chunk 1's transformer work before it waits for chunk 0's
    frames (on one GPU chunk 0 goes out at once); every chunk still comes out once, in order, with the same frames."""
    from raven_video.pipelines import pipeline_causal_wan as module
    from raven_video.sampling.sampler import ChunkSampler

    decoder = module._ChunkDecoder.__new__(module._ChunkDecoder)
    decoder.stream, decoder.device = None, torch.device("cpu")
    assert not decoder.defers(0, "cpu") and not decoder.defers(3, "cpu")  # no side stream: nothing deferred
    decoder.stream = object()  # a side stream
    assert not decoder.defers(0, "cpu") and decoder.defers(1, "cpu")  # same device: the first chunk at once
    assert decoder.defers(0, "meta") and decoder.defers(1, "meta")  # another device: the first chunk deferred too

    events = []
    sample = ChunkSampler.sample

    def spying_sample(self, *args, **kwargs):
        for sampled in sample(self, *args, **kwargs):
            events.append(("sampled", sampled.index))
            yield sampled

    monkeypatch.setattr(ChunkSampler, "sample", spying_sample)
    monkeypatch.setattr(module._ChunkDecoder, "defers", lambda self, index, device: True)  # as with cuda:0 + cuda:1
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    chunks = []
    for chunk in pipe.stream("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE):
        events.append(("yielded", chunk.index))
        chunks.append(chunk)
    count = len(chunks)
    assert count > 2
    expected = [("sampled", 0)] + [e for i in range(1, count) for e in (("sampled", i), ("yielded", i - 1))]
    assert events == expected + [("yielded", count - 1)], events
    torch.testing.assert_close(torch.cat([c.frames for c in chunks], dim=1), eager_frames, rtol=0, atol=1e-5)


def test_fp8_realtime_path_stays_close_to_the_eager_one(eager_frames):
    """``enable_realtime(fp8=True)`` runs the blocks' linears through ``torch._scaled_mm`` (this CPU build has it):
    the frames move by FP8 rounding only."""
    from raven_video.models.fp8 import Float8Linear

    pipe = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False, fp8=True)
    pipe.set_progress_bar_config(disable=True)
    assert any(isinstance(m, Float8Linear) for m in pipe.transformer.modules())
    out = pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames
    diff = (out - eager_frames).abs()
    assert 0 < diff.mean() < 0.02 and diff.max() < 0.2, (diff.mean(), diff.max())  # measured: 0.006, 0.055


def test_preview_decoder_decodes_the_stream_chunk_by_chunk(tmp_path):
    """``enable_realtime(preview_decoder=...)``: the frames are TAEHV's one-shot decode of the same latents (the
    transformer's work is unchanged), from a TAEHVDecoder or a safetensors file; a pickle path is refused."""
    from safetensors.torch import save_file

    from raven_video.pipelines.preview_decoder import TAEHVDecoder

    torch.manual_seed(0)
    preview = TAEHVDecoder()
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a cat walks", generator=torch.Generator().manual_seed(0), output_type="latent", **SIZE).frames
    expected = (preview.decode(latents).permute(0, 2, 1, 3, 4) + 1) / 2  # [B, F, 3, H, W] in [0, 1]
    save_file(preview.state_dict(), str(tmp_path / "taew.safetensors"))
    for source in (preview, str(tmp_path / "taew.safetensors")):
        fast = tiny_pipeline(seed=0).enable_realtime(compile=False, cudnn_benchmark=False, preview_decoder=source)
        fast.set_progress_bar_config(disable=True)
        frames = fast("a cat walks", generator=torch.Generator().manual_seed(0), output_type="pt", **SIZE).frames
        assert frames.shape == expected.shape == (1, 33, 3, 32, 48)
        torch.testing.assert_close(frames, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        tiny_pipeline(seed=0).enable_realtime(compile=False, preview_decoder=str(tmp_path / "taew.pth"))
