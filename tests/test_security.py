"""Nothing runs without consent: loading a pipeline never imports code shipped with it, checkpoints never unpickle
silently (issue: code-execution holes)."""

import json
import shutil

import huggingface_hub
import pytest
import torch

from raven_video import CausalWanPipeline, CausalWanTransformer3DModel
from raven_video.testing import tiny_pipeline


def _planted(path, marker):
    """Python source that, when imported, writes ``marker`` (what an attacker's module would do)."""
    path.write_text(f"open({str(marker)!r}, 'w').write('pwned')\n"
                    "from diffusers import FlowMatchLCMScheduler as Evil  # noqa: F401\n")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    tiny_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def folder(saved, tmp_path):
    copy = tmp_path / "pipe"
    shutil.copytree(saved, copy)
    return copy


def _plant_component(folder, marker):
    _planted(folder / "scheduler" / "x.py", marker)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["x", "Evil"]
    (folder / "model_index.json").write_text(json.dumps(index))


def test_planted_component_module_is_refused_and_never_runs(folder, tmp_path):
    marker = tmp_path / "pwned"
    _plant_component(folder, marker)
    with pytest.raises(ValueError, match=r'scheduler: \["x", "Evil"\].*trust_remote_code=True'):
        CausalWanPipeline.from_pretrained(folder)
    assert not marker.exists()


def test_trust_remote_code_is_the_consent(folder, tmp_path):
    marker = tmp_path / "pwned"
    _plant_component(folder, marker)
    CausalWanPipeline.from_pretrained(folder, trust_remote_code=True)
    assert marker.exists()  # the user asked for it


def test_tampered_shims_are_never_imported(folder, tmp_path):
    marker = tmp_path / "pwned"
    _planted(folder / "pipeline_causal_wan.py", marker)
    _planted(folder / "transformer" / "causal_wan.py", marker)
    pipe = CausalWanPipeline.from_pretrained(folder)
    assert isinstance(pipe.transformer, CausalWanTransformer3DModel)
    assert type(pipe.transformer).__module__ == "raven_video.models.transformer_causal_wan"
    assert not marker.exists()


def test_foreign_pipeline_class_is_refused(folder, tmp_path):
    marker = tmp_path / "pwned"
    _planted(folder / "evil_pipeline.py", marker)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = ["evil_pipeline", "Evil"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r'pipeline: \["evil_pipeline", "Evil"\]'):
        CausalWanPipeline.from_pretrained(folder)
    assert not marker.exists()


def fill_hub_cache(cache, repo_id, folder, monkeypatch):
    """A Hub cache holding ``folder`` as the ``main`` revision of ``repo_id``; the Hub is set offline."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(folder, root / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_repo_loads_from_the_cache_without_code(folder, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    _planted(folder / "pipeline_causal_wan.py", marker)
    fill_hub_cache(tmp_path / "hub", "org/tiny-raven", folder, monkeypatch)
    pipe = CausalWanPipeline.from_pretrained("org/tiny-raven")
    assert isinstance(pipe.transformer, CausalWanTransformer3DModel)
    assert pipe.config._name_or_path == "org/tiny-raven"
    assert not marker.exists()


def test_hub_repo_with_foreign_code_is_refused(folder, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    _plant_component(folder, marker)
    fill_hub_cache(tmp_path / "hub", "org/evil", folder, monkeypatch)
    with pytest.raises(ValueError, match="Hub repo 'org/evil'.*scheduler"):
        CausalWanPipeline.from_pretrained("org/evil")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- pickled checkpoints
class _Payload:
    """Unpickling this object writes a marker file (what a crafted .pth would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_reward_checkpoints_never_unpickle_without_consent(tmp_path):
    from raven_video.rewards.base import torch_load

    marker = tmp_path / "pwned"
    path = tmp_path / "reward.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "evil": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="allow_pickle"):
        torch_load(path)
    assert not marker.exists()
    with pytest.warns(UserWarning, match="pickle"):
        torch_load(path, allow_pickle=True)
    assert marker.exists()  # the explicit opt-in runs the pickle, as documented


def test_reward_checkpoints_load_tensors_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    from raven_video.rewards.base import torch_load

    torch.save({"w": torch.arange(3.0)}, tmp_path / "plain.pth")
    save_file({"w": torch.arange(3.0)}, str(tmp_path / "weights.safetensors"))
    for name in ("plain.pth", "weights.safetensors"):
        assert torch.equal(torch_load(tmp_path / name)["w"], torch.arange(3.0))
