"""generate.py: prompts -> mp4 files, streaming, a saved model folder, errors and no partial files."""

import imageio.v3 as iio
import pytest
import torch

from raven_video.cli import generate
from raven_video.testing import tiny_pipeline

SMALL = ["--num_frames", "33", "--height", "32", "--width", "48"]


@pytest.fixture(autouse=True)
def no_shipped_model(monkeypatch):
    """These tests drive the tiny random pipeline, the stand-in where an installation has no shipped world model
    (tests/test_world_shipped.py covers the shipped default)."""
    monkeypatch.setattr(generate, "shipped_model", lambda: None)


def _frames(path):
    return iio.imread(path, plugin="pyav").shape


def test_without_a_shipped_model_the_tiny_pipeline_writes_mp4s(tmp_path):
    out = tmp_path / "out"
    written = generate.main(["a cat walks", "a dog runs", "--output_dir", str(out), *SMALL])
    assert [p.split("/")[-1] for p in written] == ["000_a_cat_walks.mp4", "001_a_dog_runs.mp4"]
    assert _frames(written[0])[:3] == (33, 32, 48)
    assert (out / "000_a_cat_walks.mp4").stat().st_mode & 0o044  # readable by others, like any output


def test_stream_from_saved_folder_and_prompt_file(tmp_path, capsys, caplog):
    folder = tmp_path / "model"
    tiny_pipeline().save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a bird flies\n\n  \nsnow falls\n")
    caplog.set_level("INFO", logger="raven_video.generate")
    written = generate.main(["--prompt_file", str(prompts), "--model", str(folder), "--stream",
                             "--output_dir", str(tmp_path / "o"), *SMALL])
    assert len(written) == 2 and all(_frames(p)[0] == 33 for p in written)
    assert "chunk 2: 12 frames" in caplog.text and "FPS" in caplog.text


def test_stream_and_call_write_the_same_video(tmp_path):
    a = generate.main(["a cat", "--output_dir", str(tmp_path / "a"), *SMALL])[0]
    b = generate.main(["a cat", "--stream", "--output_dir", str(tmp_path / "b"), *SMALL])[0]
    assert (iio.imread(a, plugin="pyav") == iio.imread(b, plugin="pyav")).all()


@pytest.mark.parametrize(
    "argv,match",
    [
        ([], "no prompt given"),
        (["   "], "prompt #0 is empty"),
        (["a cat", "--num_frames", "80"], r"--num_frames 80 is not of the form 4k\+1; use 69 or 81"),
        (["a cat", "--height", "100"], "--height 100 must be a positive multiple of 16"),
        (["a cat", "--model", "/nonexistent/model"], "is not a folder"),
    ],
)
def test_bad_arguments_fail_before_loading(tmp_path, argv, match, monkeypatch):
    monkeypatch.setattr(generate, "load_pipeline", lambda args: pytest.fail("model loaded before validation"))
    with pytest.raises(SystemExit, match=match):
        generate.main([*argv, "--output_dir", str(tmp_path)])


def test_empty_prompt_file_and_chunk_misfit(tmp_path, monkeypatch):
    monkeypatch.setattr(generate, "load_pipeline", lambda args: pytest.fail("model loaded before validation"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(SystemExit, match="holds no prompt"):
        generate.main(["--prompt_file", str(empty)])
    folder = tmp_path / "model"
    tiny_pipeline().save_pretrained(folder)
    with pytest.raises(SystemExit, match=r"--num_frames 29 \(8 latent frames\) does not fit the chunks .*; use 21 or 33"):
        generate.main(["a cat", "--model", str(folder), "--num_frames", "29", "--height", "32", "--width", "48",
                       "--output_dir", str(tmp_path)])


def test_failed_generation_leaves_no_partial_mp4(tmp_path, monkeypatch):
    pipe = tiny_pipeline()
    calls = {"n": 0}
    original = pipe.transformer.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 6:  # fail in the middle of the second chunk, after frames were written
            raise RuntimeError("simulated GPU failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", flaky)
    monkeypatch.setattr(generate, "load_pipeline", lambda args: pipe)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated GPU failure"):
        generate.main(["a cat", "--stream", "--output_dir", str(out), *SMALL])
    assert list(out.iterdir()) == []


def test_device_and_dtype_defaults():
    args = generate.parse_args(["a cat"])
    assert args.num_frames == 81 and (args.height, args.width) == (None, None) and args.model is None
    assert not torch.cuda.is_available() or args.dtype == "auto"


# ------------------------------------------------------------------------------------- bad input, one line, early
def _no_load(monkeypatch):
    monkeypatch.setattr(generate, "load_pipeline", lambda args: pytest.fail("model loaded before validation"))


@pytest.mark.parametrize("frames,hint", [("0", "use 9 or 21"), ("1", "use 9 or 21"), ("5", "use 9 or 21"),
                                         ("13", "use 9 or 21"), ("17", "use 9 or 21")])
def test_frame_counts_that_do_not_fit_the_default_model(tmp_path, monkeypatch, frames, hint):
    load_pipeline = generate.load_pipeline
    _no_load(monkeypatch)
    with pytest.raises(SystemExit, match=hint):
        generate.main(["a cat", "--num_frames", frames, "--output_dir", str(tmp_path)])
    monkeypatch.setattr(generate, "load_pipeline", load_pipeline)  # the hint's values do work
    for good in hint.removeprefix("use ").split(" or "):
        assert generate.main(["a cat", "--num_frames", good, "--output_dir", str(tmp_path / good)])


@pytest.mark.parametrize("argv,match", [
    (["--fps", "-5"], "--fps -5 must be a positive frame rate"),
    (["--fps", "0"], "--fps 0 must be a positive frame rate"),
    (["--guidance_scale", "nan"], "--guidance_scale nan must be a finite number"),
    (["--device", "gpu7"], "--device 'gpu7' is not a device"),
])
def test_bad_values_fail_with_one_line(tmp_path, monkeypatch, argv, match):
    _no_load(monkeypatch)
    with pytest.raises(SystemExit, match=match):
        generate.main(["a cat", *argv, "--output_dir", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch build without CUDA")
def test_cuda_device_on_a_cpu_build(tmp_path, monkeypatch):
    _no_load(monkeypatch)
    with pytest.raises(SystemExit, match="--device cuda: this torch .* sees no CUDA GPU; use --device cpu"):
        generate.main(["a cat", "--device", "cuda", "--output_dir", str(tmp_path)])


def test_output_dir_that_is_a_file(tmp_path, monkeypatch):
    _no_load(monkeypatch)
    path = tmp_path / "taken"
    path.write_text("x")
    with pytest.raises(SystemExit, match="--output_dir .* is a file"):
        generate.main(["a cat", "--output_dir", str(path)])


def test_corrupt_model_config(tmp_path, monkeypatch):
    _no_load(monkeypatch)
    folder = tmp_path / "model"
    tiny_pipeline().save_pretrained(folder)
    (folder / "transformer" / "config.json").write_text("{ not json")
    with pytest.raises(SystemExit, match="transformer config .* cannot be read as JSON"):
        generate.main(["a cat", "--model", str(folder), "--output_dir", str(tmp_path / "o")])


def test_usage_errors_print_one_line_without_traceback(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "raven_video.cli.generate", "a cat", "--fps", "-5", "--output_dir",
                          str(tmp_path)], capture_output=True, text=True)
    assert out.returncode != 0
    assert out.stderr.strip() == "error: --fps -5 must be a positive frame rate, e.g. 16 (or leave it out: the model's)."


def test_hub_id_loads_through_from_pretrained(tmp_path, monkeypatch):
    from test_security import fill_hub_cache

    folder = tmp_path / "model"
    tiny_pipeline().save_pretrained(folder)
    fill_hub_cache(tmp_path / "hub", "org/tiny-raven", folder, monkeypatch)
    written = generate.main(["a cat", "--model", "org/tiny-raven", "--output_dir", str(tmp_path / "o"), *SMALL])
    assert _frames(written[0])[:3] == (33, 32, 48)
    with pytest.raises(SystemExit, match="--model 'org/missing': cannot fetch its config from the Hub"):
        generate.main(["a cat", "--model", "org/missing", "--output_dir", str(tmp_path / "o")])


def test_stale_partial_files_are_cleaned_and_live_ones_kept(tmp_path):
    import os

    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".000_a_cat.tmp-999999999-abc.mp4"  # a pid that cannot exist: its run was killed
    live = out / f".000_a_dog.tmp-{os.getpid()}-abc.mp4"  # a writer that still runs
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    generate.main(["a cat", "--output_dir", str(out), *SMALL])
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("argv,match", [
    (["--fp8"], "--fp8 are real-time options of --stream; add --stream"),
    (["--stream", "--eager", "--self_attention_kernel", "fa4"], "turns off; drop --eager"),
    (["--stream", "--preview"], "--preview: the tiny random stand-in model has no preview_decoder/ folder"),
    (["--stream", "--preview_decoder", "/nonexistent/taew2_1.safetensors"], "does not exist"),
    (["--stream", "--preview", "--preview_decoder", "x.safetensors"], "give one of them"),
    (["--stream", "--vae_device", "gpu:1"], "--vae_device 'gpu:1' is not a device"),
    (["--stream", "--transformer_split", "0.5"], "--transformer_split .* add --vae_device cuda:1"),
    (["--stream", "--vae_device", "cuda:1", "--transformer_split", "1.5"], r"--transformer_split 1\.5 must be in \(0, 1\)"),
])
def test_realtime_levers_fail_before_loading(tmp_path, monkeypatch, argv, match):
    _no_load(monkeypatch)
    with pytest.raises(SystemExit, match=match):
        generate.main(["a cat", *argv, "--output_dir", str(tmp_path)])


def test_pickle_preview_decoder_is_refused(tmp_path, monkeypatch):
    _no_load(monkeypatch)
    pth = tmp_path / "taew2_1.pth"
    pth.write_bytes(b"not loaded")
    with pytest.raises(SystemExit, match="pickle files such as .pth are not loaded"):
        generate.main(["a cat", "--stream", "--preview_decoder", str(pth), "--output_dir", str(tmp_path / "o")])


def test_realtime_levers_on_cpu(tmp_path, caplog):
    """The levers reach enable_realtime from the command line: on this CPU the GPU-only ones fall back with one log
    line each and change nothing; --preview decodes with the model folder's preview decoder (TAEHV), the frames its
    own decode of the same latents."""
    from raven_video.pipelines.preview_decoder import TAEHVDecoder

    folder = tmp_path / "model"
    tiny_pipeline().save_pretrained(folder)
    torch.manual_seed(0)
    TAEHVDecoder().save_pretrained(folder / "preview_decoder")
    plain = generate.main(["a cat", "--model", str(folder), "--stream", "--output_dir", str(tmp_path / "a"), *SMALL])[0]
    caplog.set_level("INFO")
    fallback = generate.main(["a cat", "--model", str(folder), "--stream", "--self_attention_kernel", "fa4",
                              "--vae_device", "cuda:1", "--transformer_split", "0.5", "--output_dir",
                              str(tmp_path / "b"), *SMALL])[0]
    assert "self-attention kernel 'fa4' unavailable" in caplog.text
    assert ("enable_realtime(devices=('cpu', 'cuda:1')): cuda:1 is not available here; decoding and the whole "
            "transformer on cpu") in caplog.text
    assert (iio.imread(plain, plugin="pyav") == iio.imread(fallback, plugin="pyav")).all()
    preview = generate.main(["a cat", "--model", str(folder), "--stream", "--preview", "--output_dir",
                             str(tmp_path / "c"), *SMALL])[0]
    frames = iio.imread(preview, plugin="pyav")
    assert frames.shape[:3] == (33, 32, 48) and not (frames == iio.imread(plain, plugin="pyav")).all()
    pipe = tiny_pipeline().enable_realtime(compile=False, cuda_graphs=False, cudnn_benchmark=False,
                                           preview_decoder=str(folder / "preview_decoder"))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a cat", generator=torch.Generator().manual_seed(0), num_frames=33, height=32, width=48,
                    output_type="np").frames[0]
    expected = (expected * 255).round().astype("uint8")
    assert abs(frames.astype(int) - expected).mean() < 3  # the mp4's lossy coding only
