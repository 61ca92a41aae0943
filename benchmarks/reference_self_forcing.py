"""Side-by-side speed + parity against the Self Forcing reference implementation, in ONE process.

The reference (github guandeh17/Self-Forcing) is NOT part of this repository: it is checked out, for benchmarking
only, under ``.ref/Self-Forcing`` (see ``benchmarks/fetch_reference.sh``; ``/.ref/`` is git-ignored). We import its
real inference code (``pipeline.causal_inference.CausalInferencePipeline``: its KV cache, its 4-step denoising with
renoising, its t=0 cache refresh, its Wan VAE decode) and only replace what needs checkpoints on disk:

* ``CausalWanModel.from_pretrained`` -> the 1.3B architecture built directly (then our random weights, strict load);
* ``_video_vae(pretrained_path)`` -> ``WanVAE_`` built directly (random weights, the SAME ones as our
  ``AutoencoderKLWan`` via diffusers' ``convert_wan_vae_to_diffusers``, strict load);
* the UMT5 text encoder -> a stub returning a fixed prompt embedding ``[1, 512, 4096]`` (shared by both sides);
* ``wan.modules.model.flash_attention`` (its cross attention calls flash-attn unconditionally) -> its own SDPA
  fallback ``wan.modules.attention.attention`` when flash-attn is not installed (self attention already falls back).
Its ``wan``/``pipeline``/``utils`` package ``__init__``s are bypassed (they import training/distributed code).
Nothing in ``.ref`` is edited: every change is a runtime monkeypatch from this file.

Timing (batch 1, bf16, 81 frames 480x832 = 21 latent frames in 7 chunks of 3, 4 steps + cache pass per chunk,
prompt already encoded): reference ``inference()`` end to end incl. its VAE decode of the whole video, and our
``CausalWanPipeline.stream`` (eager, streamed VAE decode, output_type "pt") -- warm-up + best of N each.

Parity: one extra reference run records every model call (noisy input, timestep, cache position, predicted x0) and
every renoise draw. Then
  (a) replay: each recorded (input, timestep) goes through OUR streaming model with our KV cache fed by the same
      cache passes (the reference's clean chunk at t=0): per-call velocity/x0 difference, no error accumulation;
  (b) free-running: our model runs the same sampler (reference's exact float timesteps 1000/937.5/833.3/625, x0 =
      z - sigma v, renoise (1-sigma')x0 + sigma' eps with the reference's recorded eps, cache pass at t=0) from the same
      initial noise: difference of the final chunk latents (errors accumulate over 7 chunks x 4 steps);
  (c) VAE: both VAEs decode the reference's final latents: pixel difference.

Prints ONE JSON line (all other output goes to stderr).

    python benchmarks/reference_self_forcing.py            # one H100/H200
    python benchmarks/reference_self_forcing.py --tiny     # CPU smoke test (2 layers, small dims, small latent)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import subprocess
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / ".ref" / "Self-Forcing"
REF_DENOISING_STEP_LIST = [1000, 750, 500, 250]  # configs/self_forcing_dmd.yaml, warped -> 1000, 937.5, 833.3, 625


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------- configuration
def configs(tiny: bool):
    if tiny:
        heads, head_dim, ffn, layers, text_dim, freq_dim = 2, 16, 64, 2, 32, 16
        frames, height, width, vae_dim = 33, 64, 96, 8
    else:
        heads, head_dim, ffn, layers, text_dim, freq_dim = 12, 128, 8960, 30, 4096, 256
        frames, height, width, vae_dim = 81, 480, 832, 96
    ours = dict(num_attention_heads=heads, attention_head_dim=head_dim, ffn_dim=ffn, num_layers=layers,
                text_dim=text_dim, freq_dim=freq_dim, in_channels=16, out_channels=16, num_frames_per_block=3)
    ref = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=heads * head_dim, ffn_dim=ffn,
               freq_dim=freq_dim, text_dim=text_dim, out_dim=16, num_heads=heads, num_layers=layers,
               qk_norm=True, cross_attn_norm=True, eps=1e-6)
    return ours, ref, frames, height, width, vae_dim


# ---------------------------------------------------------------------------------------------------- random weights
@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Overwrite EVERY parameter (zero-init ones included) from a fixed generator, so a key-mapping error shows."""
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in sorted(module.named_parameters()):
        r = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma" or (p.ndim == 1 and leaf == "weight"):  # norm scales
            r = 1.0 + 0.1 * r
        elif p.ndim >= 2:  # linear / conv weights, modulation tables: ~ unit-variance preserving
            r = r / math.sqrt(max(1, p[0].numel()))
        else:  # biases
            r = 0.02 * r
        p.copy_(r.to(p.dtype))


# ---------------------------------------------------------------------------------------------------- reference import
def import_reference(device: str):
    if not (REF / "pipeline" / "causal_inference.py").is_file():
        raise SystemExit(f"{REF} missing: run benchmarks/fetch_reference.sh first (it says how).")
    sys.path.insert(0, str(REF))
    # Bypass package __init__s that pull in training / distributed / i2v code (xfuser, dashscope, ...).
    for name in ("wan", "wan.modules", "pipeline", "utils", "demo_utils"):
        if name in sys.modules and getattr(sys.modules[name], "__file__", "") and str(REF) not in str(
                sys.modules[name].__file__):
            raise SystemExit(f"a module named {name!r} is already imported from elsewhere; cannot import the reference")
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(REF / name.replace(".", "/"))]
        sys.modules[name] = pkg
    if device != "cuda":  # demo_utils.memory calls torch.cuda.current_device() at import time
        mem = types.ModuleType("demo_utils.memory")
        mem.gpu = torch.device("cpu")
        mem.get_cuda_free_memory_gb = lambda *a, **k: 0.0
        mem.DynamicSwapInstaller = None
        mem.move_model_to_device_with_memory_preservation = lambda *a, **k: None
        sys.modules["demo_utils.memory"] = mem
    import wan.modules.attention as ref_attention
    import wan.modules.model as ref_model

    flash = ref_attention.FLASH_ATTN_2_AVAILABLE or ref_attention.FLASH_ATTN_3_AVAILABLE
    if not flash:
        # Its cross attention calls flash_attention() directly (asserts flash-attn); use its own SDPA fallback.
        def sdpa_flash_attention(q, k, v, q_lens=None, k_lens=None, **kw):
            return ref_attention.attention(q, k, v)

        ref_model.flash_attention = sdpa_flash_attention
    # t5.py uses torch.cuda.current_device() as a default argument (evaluated at import): harmless stub on CPU.
    no_cuda = mock.patch.object(torch.cuda, "current_device", return_value=0) if device != "cuda" \
        else contextlib.nullcontext()
    with no_cuda:
        import pipeline.causal_inference as ref_ci
        import utils.wan_wrapper as ref_ww
    from wan.modules.vae import WanVAE_

    attn = ("flash-attn-3" if ref_attention.FLASH_ATTN_3_AVAILABLE else "flash-attn-2") if flash else "sdpa"
    return SimpleNamespace(ci=ref_ci, ww=ref_ww, WanVAE_=WanVAE_, attention=attn)


class FixedTextEncoder(torch.nn.Module):
    """Stands in for the reference's WanTextEncoder: returns the given (already encoded) prompt embedding."""

    def __init__(self, embeds: torch.Tensor):
        super().__init__()
        self.embeds = embeds

    def forward(self, text_prompts):
        return {"prompt_embeds": self.embeds}


def build_reference(ref, ref_cfg, vae_dim, text, device, tiny):
    ww = ref.ww

    def make_model(path, **kw):
        with torch.device(device):
            return ww.CausalWanModel(**ref_cfg, **kw)

    def make_vae(pretrained_path=None, z_dim=16, **kw):
        cfg = dict(dim=vae_dim, z_dim=z_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                   temperal_downsample=[False, True, True], dropout=0.0)
        with torch.device(device):
            return ref.WanVAE_(**cfg)

    with mock.patch.object(ww.CausalWanModel, "from_pretrained", side_effect=make_model), \
            mock.patch.object(ww, "_video_vae", side_effect=make_vae):
        generator = ww.WanDiffusionWrapper(timestep_shift=5.0, is_causal=True)
        vae = ww.WanVAEWrapper()
    args = SimpleNamespace(denoising_step_list=list(REF_DENOISING_STEP_LIST), warp_denoising_step=True,
                           num_frame_per_block=3, independent_first_frame=False, context_noise=0,
                           model_kwargs={"timestep_shift": 5.0})
    with contextlib.redirect_stdout(sys.stderr):
        pipe = ref.ci.CausalInferencePipeline(args, device=device, generator=generator,
                                              text_encoder=FixedTextEncoder(text), vae=vae)
    if tiny:  # the reference hard-codes the 1.3B cache shapes (30 blocks, 1560 tokens/frame, 12 heads x 128)
        layers, heads, hd = ref_cfg["num_layers"], ref_cfg["num_heads"], ref_cfg["dim"] // ref_cfg["num_heads"]
        pipe.num_transformer_blocks = layers

        def init_kv(self, batch_size, dtype, device):
            self.kv_cache1 = [{"k": torch.zeros([batch_size, 32760, heads, hd], dtype=dtype, device=device),
                               "v": torch.zeros([batch_size, 32760, heads, hd], dtype=dtype, device=device),
                               "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
                               "local_end_index": torch.tensor([0], dtype=torch.long, device=device)}
                              for _ in range(layers)]

        def init_cross(self, batch_size, dtype, device):
            self.crossattn_cache = [{"k": torch.zeros([batch_size, 512, heads, hd], dtype=dtype, device=device),
                                     "v": torch.zeros([batch_size, 512, heads, hd], dtype=dtype, device=device),
                                     "is_init": False} for _ in range(layers)]

        pipe._initialize_kv_cache = types.MethodType(init_kv, pipe)
        pipe._initialize_crossattn_cache = types.MethodType(init_cross, pipe)
    return pipe


# ---------------------------------------------------------------------------------------------------- ours
def build_ours(ours_cfg, vae_dim, device, dtype):
    from diffusers import AutoencoderKLWan, FlowMatchLCMScheduler

    from raven_video import CausalWanPipeline, CausalWanTransformer3DModel

    with torch.device(device):
        transformer = CausalWanTransformer3DModel(**ours_cfg)
        vae = AutoencoderKLWan(base_dim=vae_dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                               temperal_downsample=[False, True, True])
    transformer.to(device=device, dtype=dtype).eval()
    vae.to(device=device, dtype=dtype).eval()
    pipe = CausalWanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchLCMScheduler(shift=5.0),
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def share_weights(ours, ref_pipe, device, dtype):
    """Random weights on our side -> reference (DiT); random weights on the reference VAE -> ours. Strict loads."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from raven_video.models.conversion import convert_diffusers_to_original_wan_state_dict

    randomize_(ours.transformer, seed=1234)
    sd = convert_diffusers_to_original_wan_state_dict(ours.transformer.state_dict())
    ref_model = ref_pipe.generator.model
    ref_model.load_state_dict(sd, strict=True)
    ref_model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    # sanity: the transfer is exact (every tensor equal)
    ref_sd = ref_model.state_dict()
    assert all(torch.equal(ref_sd[k], v.to(ref_sd[k].dtype)) for k, v in sd.items())

    ref_vae = ref_pipe.vae.model
    randomize_(ref_vae, seed=4321)
    vsd = convert_wan_vae_to_diffusers(ref_vae.state_dict())
    ours.vae.load_state_dict(vsd, strict=True)
    ref_pipe.vae.to(device=device, dtype=dtype)
    ours.vae.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------- timing
def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_reference(ref_pipe, noise_bfchw, device):
    marks = {}
    vae = ref_pipe.vae
    original = vae.decode_to_pixel

    def timed_decode(*a, **k):
        sync(device)
        marks["vae_start"] = time.perf_counter()
        out = original(*a, **k)
        sync(device)
        marks["vae_end"] = time.perf_counter()
        return out

    vae.decode_to_pixel = timed_decode
    try:
        with contextlib.redirect_stdout(sys.stderr):
            sync(device)
            tic = time.perf_counter()
            video = ref_pipe.inference(noise_bfchw, text_prompts=["<precomputed embedding>"])
            sync(device)
            total = time.perf_counter() - tic
    finally:
        del vae.decode_to_pixel
    return total, marks["vae_start"] - tic, marks["vae_end"] - marks["vae_start"], video


def time_ours(pipe, text, noise_bcfhw, frames, height, width, device, output_type):
    sync(device)
    tic = time.perf_counter()
    marks = []
    for _ in pipe.stream(prompt_embeds=text, latents=noise_bcfhw, num_frames=frames, height=height, width=width,
                         generator=torch.Generator(device="cpu").manual_seed(0), output_type=output_type):
        if output_type == "latent":  # latents may still be in flight; yielded frames are complete (StreamChunk)
            sync(device)
        marks.append(time.perf_counter() - tic)
    return marks[-1], marks[0]


# ---------------------------------------------------------------------------------------------------- parity
def record_reference(ref_pipe, noise_bfchw):
    calls, eps = [], []

    def hook(module, args, kwargs, output):
        calls.append(dict(x=kwargs["noisy_image_or_video"].detach().clone(), t=kwargs["timestep"].detach().clone(),
                          start=int(kwargs["current_start"]), v=output[0].detach().clone(),
                          x0=output[1].detach().clone()))

    sched = ref_pipe.scheduler
    original_add_noise = sched.add_noise

    def add_noise(clean, noise, timestep):
        eps.append(noise.detach().clone())
        return original_add_noise(clean, noise, timestep)

    handle = ref_pipe.generator.register_forward_hook(hook, with_kwargs=True)
    sched.add_noise = add_noise
    try:
        with contextlib.redirect_stdout(sys.stderr):
            video, latents = ref_pipe.inference(noise_bfchw, text_prompts=["<precomputed embedding>"],
                                                return_latents=True)
    finally:
        handle.remove()
        del sched.add_noise
    return calls, eps, video, latents


def _stats(a: torch.Tensor, b: torch.Tensor):
    """(max |a-b|, ||a-b|| / ||b||, max|b|) in float32; b is the reference."""
    a, b = a.float(), b.float()
    d = (a - b).abs()
    return d.max().item(), (d.norm() / b.norm().clamp_min(1e-30)).item(), b.abs().max().item()


@torch.no_grad()
def parity(ours, ref_pipe, calls, eps, ref_latents, text, noise_bfchw, tpf, latent_hw, dtype, timestep_dtype):
    model = ours.transformer
    frames = noise_bfchw.shape[1]
    to_ours = lambda x: x.permute(0, 2, 1, 3, 4)  # [B, F, C, H, W] <-> [B, C, F, H, W]

    # (a) replay every recorded call (teacher-forced: the cache gets the reference's clean chunks)
    cache = model.new_kv_cache(1, *latent_hw, max_frames=frames)
    worst_v = worst_x0 = worst_x0_rel = worst_v_rel = 0.0
    timesteps = []
    for c in calls:
        start = c["start"] // tpf
        t = c["t"].to(timestep_dtype)
        is_cache = bool((c["t"] == 0).all())
        out = model(to_ours(c["x"]).to(dtype), t, None if cache.has_text else text, kv_cache=cache,
                    frame_offset=start, update_cache=is_cache).sample
        if is_cache:
            continue
        timesteps.append(round(float(c["t"].flatten()[0]), 4))
        v = to_ours(out)
        sigma = c["t"].double().flatten()[0] / 1000.0
        x0 = (c["x"].double() - sigma * v.double()).to(c["x0"].dtype)
        dv, rv, _ = _stats(v, c["v"])
        dx, rx, _ = _stats(x0, c["x0"])
        worst_v, worst_v_rel = max(worst_v, dv), max(worst_v_rel, rv)
        worst_x0, worst_x0_rel = max(worst_x0, dx), max(worst_x0_rel, rx)

    # (b) free-running sampler with the reference's timesteps and renoise draws
    steps = sorted(set(timesteps), reverse=True)
    n_steps = len(steps)
    cache = model.new_kv_cache(1, *latent_hw, max_frames=frames)
    out_latents = torch.zeros_like(ref_latents)
    eps_iter = iter(eps)
    chunks = list(range(0, frames, 3))
    for ci, start in enumerate(chunks):
        z = noise_bfchw[:, start:start + 3]  # [B, F, C, H, W] like the reference
        for k, tk in enumerate(steps):
            t = torch.full((1, z.shape[1]), tk, device=z.device, dtype=torch.float32).to(timestep_dtype)
            v = to_ours(model(to_ours(z).to(dtype), t, None if cache.has_text else text, kv_cache=cache,
                              frame_offset=start).sample)
            x0 = (z.double() - (tk / 1000.0) * v.double()).to(z.dtype)
            if k < n_steps - 1:
                s_next = steps[k + 1] / 1000.0
                e = next(eps_iter).unflatten(0, x0.shape[:2])
                z = ((1 - s_next) * x0.float() + s_next * e.float()).to(e.dtype)
        out_latents[:, start:start + 3] = x0
        if ci < len(chunks) - 1:  # the reference also refreshes after the last chunk: it changes no output
            model(to_ours(x0).to(dtype), torch.zeros(1, x0.shape[1], device=x0.device, dtype=timestep_dtype),
                  None if cache.has_text else text, kv_cache=cache, frame_offset=start, update_cache=True)
    per_chunk = [_stats(out_latents[:, s:s + 3], ref_latents[:, s:s + 3])[0] for s in chunks]
    d, rel, ref_max = _stats(out_latents, ref_latents)
    return dict(
        timesteps_used=steps,
        free_max_abs=d, free_rel=rel, ref_latent_absmax=ref_max, free_per_chunk=per_chunk,
        replay_x0_max_abs=worst_x0, replay_x0_rel=worst_x0_rel, replay_v_max_abs=worst_v, replay_v_rel=worst_v_rel,
        replay_calls=len(calls),
    )


@torch.no_grad()
def vae_parity(ours, ref_pipe, ref_latents, ref_video):
    """Both VAEs decode the reference's final latents ([B, F, C, H, W]); reference video is in [0, 1]."""
    vae = ours.vae
    mean = torch.tensor(vae.config.latents_mean, device=ref_latents.device).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=ref_latents.device).view(1, 16, 1, 1, 1)
    z = ref_latents.permute(0, 2, 1, 3, 4).float() * std + mean
    pixels = vae.decode(z.to(vae.dtype)).sample.float().clamp(-1, 1)  # [B, 3, T, H, W]
    ours_video = (pixels * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    return _stats(ours_video, ref_video)


# ---------------------------------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="tiny random models on CPU (checks the script only)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_parity", action="store_true")
    p.add_argument("--skip_realtime", action="store_true", help="do not time our enable_realtime() path")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16
    if args.tiny:
        args.repeats = 1
    ours_cfg, ref_cfg, frames, height, width, vae_dim = configs(args.tiny)
    latent_frames, lh, lw = (frames - 1) // 4 + 1, height // 8, width // 8
    tpf = (lh // 2) * (lw // 2)
    notes = []

    t0 = time.perf_counter()
    ref = import_reference(device)
    torch.manual_seed(0)
    gen = torch.Generator(device="cpu").manual_seed(42)
    text = torch.randn(1, 512, ours_cfg["text_dim"], generator=gen).to(device=device, dtype=dtype)
    noise = torch.randn(1, latent_frames, 16, lh, lw, generator=gen).to(device=device, dtype=dtype)  # ref layout
    noise_ours = noise.permute(0, 2, 1, 3, 4).float()  # our layout [B, C, F, H, W]; stream() casts as it needs

    ours = build_ours(ours_cfg, vae_dim, device, dtype)
    ref_pipe = build_reference(ref, ref_cfg, vae_dim, text, device, args.tiny)
    if args.tiny:
        ref_pipe.frame_seq_length = tpf
    share_weights(ours, ref_pipe, device, dtype)
    ref_pipe.to(dtype=dtype)  # as its inference.py does (generator + VAE in bf16)
    log(f"built both sides in {time.perf_counter() - t0:.1f}s; reference attention: {ref.attention}")

    # ---- timing (interleaved warm-ups, then best of N each)
    time_reference(ref_pipe, noise, device)
    time_ours(ours, text, noise_ours, frames, height, width, device, "pt")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ref_runs = [time_reference(ref_pipe, noise, device)[:3] for _ in range(args.repeats)]
    ours_runs = [time_ours(ours, text, noise_ours, frames, height, width, device, "pt") for _ in range(args.repeats)]
    ours_latent = min(time_ours(ours, text, noise_ours, frames, height, width, device, "latent")[0]
                      for _ in range(args.repeats))
    ref_best = min(ref_runs, key=lambda r: r[0])
    ours_best = min(ours_runs, key=lambda r: r[0])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    log(f"reference runs {ref_runs}; ours runs {ours_runs}; ours latent-only {ours_latent:.3f}s")

    result = {
        "benchmark": "reference_self_forcing",
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "tiny": args.tiny,
        "num_frames": frames,
        "resolution": f"{height}x{width}",
        "repeats": args.repeats,
        "reference_total_s": round(ref_best[0], 4),
        "reference_fps": round(frames / ref_best[0], 2),
        "reference_dit_s": round(ref_best[1], 4),
        "reference_vae_s": round(ref_best[2], 4),
        "ours_total_s": round(ours_best[0], 4),
        "ours_fps": round(frames / ours_best[0], 2),
        "ours_first_chunk_s": round(ours_best[1], 4),
        "ours_dit_only_s": round(ours_latent, 4),
        "ratio_ours_over_reference": round(ref_best[0] / ours_best[0], 3),
        "peak_mem_gb_both_models": round(peak, 2) if peak is not None else None,
        "reference_attention": ref.attention,
    }
    notes.append("ratio_ours_over_reference = ours_fps / reference_fps (>1: ours faster); same process, same GPU, "
                 "bf16 DiT and VAE on both sides, prompt embedding precomputed, best of repeats after a warm-up")
    notes.append("reference: inference() = 7 chunks x (4 steps + 1 t=0 cache refresh, also after the last chunk) "
                 "then one non-streamed VAE decode of all 21 latent frames; ours: stream() = 4 steps per chunk, "
                 "cache pass after every chunk but the last, streamed VAE decode per chunk")
    if ref.attention == "sdpa":
        notes.append("flash-attn not installed: the reference runs its own SDPA fallback (self + cross attention); "
                     "with flash-attn its published speed may be higher")

    if not args.skip_parity:
        calls, eps, ref_video, ref_latents = record_reference(ref_pipe, noise)
        par = parity(ours, ref_pipe, calls, eps, ref_latents, text, noise, tpf, (lh, lw), dtype, torch.float32)
        vae_d, vae_rel, _ = vae_parity(ours, ref_pipe, ref_latents, ref_video)
        result.update({
            "parity_max_abs_diff": round(par["free_max_abs"], 5),
            "parity_rel": round(par["free_rel"], 6),
            "parity_per_chunk_max_abs": [round(x, 5) for x in par["free_per_chunk"]],
            "parity_ref_latent_absmax": round(par["ref_latent_absmax"], 4),
            "parity_replay_x0_max_abs": round(par["replay_x0_max_abs"], 5),
            "parity_replay_x0_rel": round(par["replay_x0_rel"], 6),
            "parity_replay_velocity_max_abs": round(par["replay_v_max_abs"], 5),
            "parity_replay_velocity_rel": round(par["replay_v_rel"], 6),
            "parity_replay_calls": par["replay_calls"],
            "parity_vae_pixels_max_abs": round(vae_d, 5),
            "parity_vae_pixels_rel": round(vae_rel, 6),
            "timesteps_used": par["timesteps_used"],
        })
        notes.append("parity: identical weights (strict loads, random incl. zero-init params), initial noise, prompt "
                     "embedding; parity_max_abs_diff/rel = free-running chunk latents (our model + the reference's "
                     "exact float timesteps and recorded renoise eps; rel = ||ours-ref||/||ref||); replay_* = worst "
                     "per-call difference feeding our model the reference's exact inputs; vae = both VAEs decoding "
                     "the reference latents, pixels in [0,1]")
    if not args.skip_realtime:
        # our real-time path (pipe.enable_realtime()) in the same process, after the eager timing and the parity check
        ours.enable_realtime()
        tic = time.perf_counter()
        for _ in range(2):  # warm-up: compilation, then CUDA-graph capture
            time_ours(ours, text, noise_ours, frames, height, width, device, "pt")
        warmup = time.perf_counter() - tic
        rt_runs = [time_ours(ours, text, noise_ours, frames, height, width, device, "pt") for _ in range(args.repeats)]
        rt_best = min(rt_runs, key=lambda r: r[0])
        result.update({
            "ours_realtime_total_s": round(rt_best[0], 4),
            "ours_realtime_fps": round(frames / rt_best[0], 2),
            "ours_realtime_first_chunk_s": round(rt_best[1], 4),
            "ours_realtime_warmup_s": round(warmup, 2),
            "ratio_ours_realtime_over_reference": round(ref_best[0] / rt_best[0], 3),
        })
        notes.append("ours_realtime = pipe.enable_realtime() defaults: regional torch.compile of the blocks, CUDA "
                     "graphs per chunk position, sync-free sampling, fused channels-last VAE decoder overlapped on a "
                     "second CUDA stream")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
    except OSError:
        commit = ""
    try:
        ref_rev = (REF / "REVISION").read_text().strip()
    except OSError:
        ref_rev = None
    result.update({"commit": commit or None, "reference_revision": ref_rev, "notes": notes})
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
