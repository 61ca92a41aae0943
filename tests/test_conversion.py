"""Checkpoint conversion: original Wan / Self Forcing layout <-> diffusers layout, loading, CLI and error cases."""

import os

import pytest
import torch
from safetensors.torch import save_file

from diffusers import WanTransformer3DModel
from raven_video.cli.convert import main
from raven_video.models.checkpoints import convert_checkpoint, load_original_checkpoint
from raven_video.models.conversion import (
    convert_diffusers_to_original_wan_state_dict,
    convert_original_wan_state_dict,
    detect_state_dict_layout,
    infer_wan_config_from_state_dict,
)
from raven_video.testing import tiny_wan_transformer, tiny_wan_transformer_config


HEAD_DIM = tiny_wan_transformer_config()["attention_head_dim"]


@pytest.fixture(scope="module")
def model():
    return tiny_wan_transformer(seed=0)


@pytest.fixture(scope="module")
def original_state_dict(model):
    return convert_diffusers_to_original_wan_state_dict(model.state_dict())


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 2, 4, 4, generator=generator),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 7, 32, generator=generator),
        return_dict=False,
    )


def _self_forcing_checkpoint(original, perturb_generator=False):
    """The Self Forcing / Causal Forcing layout: {"generator": ..., "generator_ema": ...} with a `model.` prefix."""
    ema = {f"model.{k}": v.clone() for k, v in original.items()}
    raw = {f"model.{k}": (v + 1.0 if perturb_generator else v).clone() for k, v in original.items()}
    return {"generator": raw, "generator_ema": ema, "step": torch.tensor(1000)}


def test_original_key_names(original_state_dict):
    expected = {
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "text_embedding.2.bias",
        "time_embedding.0.weight",
        "time_embedding.2.weight",
        "time_projection.1.weight",
        "head.head.weight",
        "head.modulation",
        "blocks.1.modulation",
        "blocks.1.self_attn.q.weight",
        "blocks.1.self_attn.o.bias",
        "blocks.1.self_attn.norm_q.weight",
        "blocks.1.self_attn.norm_k.weight",
        "blocks.1.cross_attn.k.weight",
        "blocks.1.cross_attn.norm_k.weight",
        "blocks.1.norm3.weight",
        "blocks.1.norm3.bias",
        "blocks.1.ffn.0.weight",
        "blocks.1.ffn.2.bias",
    }
    assert expected <= set(original_state_dict)
    assert not any(".norm2." in k or "attn1" in k or "condition_embedder" in k for k in original_state_dict)
    assert detect_state_dict_layout(original_state_dict) == "original"


def test_mapping_round_trips_on_real_key_sets(model):
    sd = model.state_dict()
    back = convert_original_wan_state_dict(convert_diffusers_to_original_wan_state_dict(sd))
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)

    # image-to-video variant: CLIP projection, k_img / v_img, emb_pos
    i2v = WanTransformer3DModel(**tiny_wan_transformer_config(image_dim=20, added_kv_proj_dim=32, pos_embed_seq_len=6))
    i2v_sd = i2v.state_dict()
    original = convert_diffusers_to_original_wan_state_dict(i2v_sd)
    assert {"img_emb.proj.1.weight", "img_emb.emb_pos", "blocks.0.cross_attn.k_img.weight"} <= set(original)
    assert set(convert_original_wan_state_dict(original)) == set(i2v_sd)
    config = infer_wan_config_from_state_dict(original, attention_head_dim=HEAD_DIM)
    assert (config["image_dim"], config["added_kv_proj_dim"], config["pos_embed_seq_len"]) == (20, 32, 6)


def test_infer_config(original_state_dict, model):
    config = infer_wan_config_from_state_dict(original_state_dict, attention_head_dim=HEAD_DIM)
    for name, value in tiny_wan_transformer_config().items():
        if name != "rope_max_seq_len":
            assert config[name] == value, name
    # the diffusers layout is accepted too; the head count follows from num_attention_heads as well
    assert infer_wan_config_from_state_dict(model.state_dict(), num_attention_heads=2) == config
    with pytest.raises(ValueError, match="attention_head_dim"):
        infer_wan_config_from_state_dict(original_state_dict)  # width 32 is not a multiple of the default 128


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_convert_round_trip(tmp_path, model, original_state_dict, suffix):
    path = tmp_path / f"checkpoint{suffix}"
    if suffix == ".pt":
        torch.save(_self_forcing_checkpoint(original_state_dict, perturb_generator=True), path)
    else:  # flat file: one model under a container prefix
        save_file({f"generator_ema.model.{k}": v.contiguous() for k, v in original_state_dict.items()}, str(path))

    out = tmp_path / "converted"
    convert_checkpoint(
        path, out, config_overrides={"attention_head_dim": HEAD_DIM}, model_cls=WanTransformer3DModel
    )
    assert (out / "config.json").exists() and (out / "diffusion_pytorch_model.safetensors").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left

    reloaded = WanTransformer3DModel.from_pretrained(out).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    # from_pretrained memory-maps the safetensors file; its tensors are not 64-byte aligned and CPU BLAS then picks
    # kernels that round differently (~1e-6). Re-allocate so the output comparison can be bit-exact.
    with torch.no_grad():
        for param in reloaded.parameters():
            param.data = param.data.clone()
    with torch.no_grad():
        expected = model(**_inputs())[0]
        actual = reloaded(**_inputs())[0]
    assert torch.equal(actual, expected)


def test_key_selects_container_and_dtype(tmp_path, original_state_dict):
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": _self_forcing_checkpoint(original_state_dict, perturb_generator=True)}, path)

    ema = load_original_checkpoint(path)
    raw = load_original_checkpoint(path, key="state_dict")  # descends, then auto-picks generator_ema
    assert set(ema) == set(original_state_dict) and torch.equal(ema["head.head.weight"], raw["head.head.weight"])
    with pytest.raises(KeyError, match=r"available containers: \['state_dict'\]"):
        load_original_checkpoint(path, key="generator")

    torch.save(_self_forcing_checkpoint(original_state_dict, perturb_generator=True), path)
    generator = load_original_checkpoint(path, key="generator")
    torch.testing.assert_close(generator["head.head.weight"], original_state_dict["head.head.weight"] + 1.0)
    with pytest.raises(KeyError, match="available containers"):
        load_original_checkpoint(path, key="critic")

    model = convert_checkpoint(
        path, tmp_path / "bf16", key="generator", dtype="bf16",
        config_overrides={"attention_head_dim": HEAD_DIM}, model_cls=WanTransformer3DModel,
    ).model
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].scale_shift_table.dtype == torch.float32  # _keep_in_fp32_modules stay fp32
    torch.testing.assert_close(
        model.proj_out.weight.float(), (original_state_dict["head.head.weight"] + 1.0).bfloat16().float()
    )


def test_wrapper_prefixes_and_diffusers_layout(tmp_path, model, original_state_dict):
    fsdp = {
        f"module._orig_mod.{k.replace('blocks.0.', 'blocks.0._fsdp_wrapped_module.')}": v
        for k, v in original_state_dict.items()
    }
    torch.save(fsdp, tmp_path / "fsdp.pt")
    assert set(load_original_checkpoint(tmp_path / "fsdp.pt")) == set(original_state_dict)

    # an already-diffusers-layout file converts as is
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "diffusers.safetensors"))
    out = tmp_path / "from_diffusers"
    converted = convert_checkpoint(
        tmp_path / "diffusers.safetensors", out, config_overrides={"attention_head_dim": HEAD_DIM},
        model_cls=WanTransformer3DModel,
    )
    assert converted.source_layout == "diffusers"
    assert torch.equal(converted.model.proj_out.weight, model.proj_out.weight)


def test_error_cases(tmp_path, original_state_dict):
    kwargs = dict(config_overrides={"attention_head_dim": HEAD_DIM}, model_cls=WanTransformer3DModel)

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        convert_checkpoint(tmp_path / "missing.pt", tmp_path / "out", **kwargs)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="garbage.pt.*re-download"):
        convert_checkpoint(garbage, tmp_path / "out", **kwargs)
    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_original_checkpoint(bad_st)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_original_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="Unsupported checkpoint file type"):
        load_original_checkpoint(tmp_path / "weights.npz")

    not_sd = tmp_path / "not_sd.pt"
    torch.save({"optimizer": {"lr": 1.0}, "step": 3}, not_sd)
    with pytest.raises(ValueError, match="not a transformer state dict.*'optimizer'"):
        load_original_checkpoint(not_sd)
    pickled = tmp_path / "pickled.pt"
    torch.save({"generator_ema": {"w": torch.zeros(1)}, "args": torch.nn.Linear(1, 1)}, pickled)
    with pytest.raises(ValueError, match="weights_only"):
        load_original_checkpoint(pickled)

    # wrong size: a 2-layer checkpoint loaded as 3 layers, and a checkpoint missing a block's weights
    path = tmp_path / "ok.pt"
    torch.save({"generator_ema": original_state_dict}, path)
    with pytest.raises(ValueError, match=r"missing key\(s\) \[blocks\.2\..*num_layers=3"):
        convert_checkpoint(path, tmp_path / "out", config_overrides={"attention_head_dim": HEAD_DIM, "num_layers": 3},
                           model_cls=WanTransformer3DModel)
    truncated = {k: v for k, v in original_state_dict.items() if not k.startswith("blocks.1.ffn")}
    truncated["extra_head.weight"] = torch.zeros(1)
    torch.save(truncated, tmp_path / "truncated.pt")
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.net\.0\.proj\.weight.*unexpected key\(s\) \[extra_head"):
        convert_checkpoint(tmp_path / "truncated.pt", tmp_path / "out", **kwargs)
    with pytest.raises(ValueError, match="shape"):
        convert_checkpoint(path, tmp_path / "out", config_overrides={"attention_head_dim": HEAD_DIM, "ffn_dim": 8},
                           model_cls=WanTransformer3DModel)
    with pytest.raises(ValueError, match="not arguments of WanTransformer3DModel"):
        convert_checkpoint(path, tmp_path / "out", config_overrides={"num_frames_per_block": 3},
                           model_cls=WanTransformer3DModel)

    # nothing half-written, and an existing output folder is never clobbered silently
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_checkpoint(path, tmp_path / "out", **kwargs)


def test_failed_save_leaves_nothing(tmp_path, original_state_dict, monkeypatch):
    path = tmp_path / "ok.pt"
    torch.save(original_state_dict, path)

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(WanTransformer3DModel, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(path, tmp_path / "out", config_overrides={"attention_head_dim": HEAD_DIM},
                           model_cls=WanTransformer3DModel)
    assert sorted(os.listdir(tmp_path)) == ["ok.pt"]


def test_cli(tmp_path, original_state_dict, capsys):
    path = tmp_path / "sf.pt"
    torch.save(_self_forcing_checkpoint(original_state_dict), path)
    out = tmp_path / "cli_out"
    code = main(["--checkpoint", str(path), "--output_dir", str(out), "--model_class", "wan",
                 "--attention_head_dim", str(HEAD_DIM), "--dtype", "fp32"])
    assert code == 0, capsys.readouterr().err
    assert "parameters" in capsys.readouterr().out
    assert WanTransformer3DModel.from_pretrained(out).config.num_layers == 2

    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--output_dir", str(tmp_path / "x"),
                 "--model_class", "wan"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_default_model_class_is_causal(tmp_path, original_state_dict):
    from raven_video.models.transformer_causal_wan import CausalWanTransformer3DModel as cls

    path = tmp_path / "sf.pt"
    torch.save(_self_forcing_checkpoint(original_state_dict), path)
    model = convert_checkpoint(
        path, tmp_path / "causal", config_overrides={"attention_head_dim": HEAD_DIM, "num_frames_per_block": 3}
    ).model
    assert type(model).__name__ == "CausalWanTransformer3DModel"
    reloaded = cls.from_pretrained(tmp_path / "causal")
    assert reloaded.config.num_frames_per_block == 3
    assert torch.equal(reloaded.proj_out.weight, original_state_dict["head.head.weight"])


@pytest.mark.parametrize(
    "size, config",
    [
        ("1.3B", dict(num_attention_heads=12, ffn_dim=8960, num_layers=30)),
        ("14B", dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)),
    ],
)
def test_full_size_key_sets_and_config_inference(size, config):
    """Real Wan2.1 T2V shapes on the meta device: the table covers every key and the default head size 128 works."""
    from accelerate import init_empty_weights

    full = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, **config)
    with init_empty_weights():
        model = WanTransformer3DModel(**full)
    diffusers_sd = {k: v for k, v in model.state_dict().items()}
    original = convert_diffusers_to_original_wan_state_dict(diffusers_sd)
    assert len(original) == len(diffusers_sd) == (30 if size == "1.3B" else 40) * 27 + 15
    diffusers_only = ("condition_embedder", "proj_out", "scale_shift_table")
    assert not any(k.startswith(diffusers_only) or ".attn" in k for k in original)
    inferred = infer_wan_config_from_state_dict(original)
    assert {k: inferred[k] for k in full} == full
    assert set(convert_original_wan_state_dict(original)) == set(diffusers_sd)
