"""generate.py: prompts -> mp4 files, streaming, a saved model folder, errors and no partial files."""

import imageio.v3 as iio
import pytest
import torch

from raven_video.cli import generate
from raven_video.testing import tiny_pipeline

SMALL = ["--num_frames", "33", "--height", "32", "--width", "48"]


def _frames(path):
    return iio.imread(path, plugin="pyav").shape


def test_default_tiny_pipeline_writes_mp4s(tmp_path):
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
        (["a cat", "--num_frames", "80"], r"--num_frames 80 is not 4k\+1; use 77 or 81"),
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
    with pytest.raises(SystemExit, match="8 latent frames do not fit the chunking"):
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
    assert args.num_frames == 81 and (args.height, args.width) == (480, 832) and args.model is None
    assert not torch.cuda.is_available() or args.dtype == "auto"
