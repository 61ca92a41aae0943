"""``scripts/export_world_model.py``: the shippable world pipeline folder, and ``generate.py``'s default model."""

import json
import os
import sys

import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors import safe_open

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import export_world_model  # noqa: E402

from raven_video.pipelines.pipeline_causal_wan import CausalWanPipeline  # noqa: E402
from raven_video.pipelines.preview_decoder import TAEHVDecoder  # noqa: E402
from raven_video.testing import tiny_causal_transformer, tiny_vae  # noqa: E402
from raven_video.world.stack import TEXT_DIM, world_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    world_pipeline(tiny_vae(), tiny_causal_transformer(text_dim=TEXT_DIM)).save_pretrained(root / "student")
    tiny_vae(seed=1).save_pretrained(root / "vae")
    (root / "vae" / "metrics.json").write_text(json.dumps({"evaluation": {"psnr_81_frames": 31.0}}))
    TAEHVDecoder(widths=(8, 8, 8, 8), space_strides=(1, 2, 2)).save_pretrained(root / "preview")
    (root / "eval.json").write_text(json.dumps({"student": {"1x": {"world_score": 0.5, "shape_accuracy": 0.25}}}))
    return root


def _export(parts, out, *extra):
    return export_world_model.main(["--student", str(parts / "student"), "--vae", str(parts / "vae"),
                                    "--preview_decoder", str(parts / "preview"),
                                    "--metrics", str(parts / "eval.json"), "--output", str(out), *extra])


def test_export_writes_a_loadable_fp16_pipeline_with_its_preview_and_metrics(parts, tmp_path):
    out = tmp_path / "pipeline"
    _export(parts, out)
    pipe = CausalWanPipeline.from_pretrained(str(out))
    assert (pipe.config.height, pipe.config.width, pipe.config.fps) == (64, 64, 16)
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    original = CausalWanPipeline.from_pretrained(str(parts / "student")).transformer.state_dict()
    for key, value in pipe.transformer.state_dict().items():
        torch.testing.assert_close(value.float(), original[key].half().float())
    preview = TAEHVDecoder.from_pretrained(str(out / "preview_decoder"))
    assert tuple(preview.config.space_strides) == (1, 2, 2)
    assert json.loads((out / "metrics.json").read_text())["student"]["1x"]["world_score"] == 0.5
    assert json.loads((out / "vae" / "metrics.json").read_text())["evaluation"]["psnr_81_frames"] == 31.0
    vae = AutoencoderKLWan.from_pretrained(str(parts / "vae")).state_dict()
    assert all(torch.equal(value, vae[key]) for key, value in pipe.vae.state_dict().items())
    assert "shape 0.250" in (out / "README.md").read_text()
    assert not os.path.exists(str(out) + ".tmp")
    assert pipe.default_guidance_scale == 1.0


def test_export_records_the_default_guidance_and_generate_uses_it(parts, tmp_path, capsys):
    from raven_video.cli import generate

    out = tmp_path / "pipeline"
    _export(parts, out, "--guidance_scale", "2.5")
    assert json.loads((out / "model_index.json").read_text())["guidance_scale"] == 2.5
    assert "guidance 2.5 by default" in (out / "README.md").read_text()
    seen = []
    original = CausalWanPipeline.stream

    def spy(self, *args, **kwargs):
        seen.append(kwargs["guidance_scale"])
        return original(self, *args, **kwargs)

    import unittest.mock
    with unittest.mock.patch.object(CausalWanPipeline, "stream", spy):
        for extra in ([], ["--guidance_scale", "1"]):
            generate.main(["a red circle moves right quickly, on a black background", "--model", str(out),
                           "--num_frames", "9", "--output_dir", str(tmp_path / "videos"), *extra])
    assert seen == [2.5, 1.0]
    with pytest.raises(SystemExit):
        _export(parts, tmp_path / "bad", "--guidance_scale", "0.5")
    assert "--guidance_scale 0.5 must be a finite number >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_export_over_budget_or_with_bad_inputs_fails_early_and_leaves_nothing(parts, tmp_path, capsys):
    out = tmp_path / "pipeline"
    with pytest.raises(SystemExit, match="over --max_mb"):
        _export(parts, out, "--max_mb", "0.01")
    assert not out.exists() and not os.path.exists(str(out) + ".tmp")
    with pytest.raises(SystemExit):
        export_world_model.main(["--student", str(tmp_path), "--output", str(out)])
    assert "neither a CausalWanPipeline folder nor a transformer folder" in capsys.readouterr().err
    assert not out.exists()


def test_generate_defaults_to_the_shipped_world_model_where_present(parts, tmp_path, monkeypatch):
    from raven_video.cli import generate
    from raven_video.world import shipped

    monkeypatch.setattr(shipped, "WEIGHTS_DIR", str(tmp_path / "weights"))
    assert generate.shipped_model() is None  # not shipped: the tiny random pipeline stands in
    _export(parts, tmp_path / "weights" / "pipeline")
    assert generate.shipped_model() == str(tmp_path / "weights" / "pipeline")
    args = generate.parse_args(["a red circle moves right quickly, on a black background", "--num_frames", "9",
                                "--output_dir", str(tmp_path / "videos")])
    index = generate.check_args(args)
    assert args.model == str(tmp_path / "weights" / "pipeline") and index["height"] == 64


def test_generate_names_words_a_world_model_does_not_know(parts, capsys):
    from raven_video.cli import generate

    generate.check_world_prompts(str(parts / "student"), ["a red circle moves right quickly, on a black background"])
    with pytest.raises(generate.UsageError, match=r"'cat', 'grass', 'walks' not in the world model's vocabulary"):
        generate.check_world_prompts(str(parts / "student"), ["a cat walks on the grass"])
    generate.check_world_prompts(None, ["a cat walks on the grass"])  # the tiny random pipeline: anything goes
