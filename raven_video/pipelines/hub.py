"""Hub layout for ``CausalWanPipeline`` folders (diffusers_notes §4).

``DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`` returns our pipeline only when
``model_index.json`` names the pipeline as ``["pipeline_causal_wan", "CausalWanPipeline"]`` with a root
``pipeline_causal_wan.py``, and the transformer as ``["causal_wan", "CausalWanTransformer3DModel"]`` with
``transformer/causal_wan.py`` (any other library name fails the Hub pre-check). The shims re-export the installed
``raven_video`` package, so the weights and configs stay plain diffusers / transformers.
"""

from __future__ import annotations

import json
import os

PIPELINE_SHIM = "pipeline_causal_wan.py"
TRANSFORMER_SHIM = os.path.join("transformer", "causal_wan.py")

_PIPELINE_SHIM_TEXT = '''# Loader shim written by raven_video: `pip install raven-video`, then
# DiffusionPipeline.from_pretrained(<this repo>, trust_remote_code=True) returns a CausalWanPipeline.
from raven_video.pipelines.pipeline_causal_wan import CausalWanPipeline  # noqa: F401
'''

_TRANSFORMER_SHIM_TEXT = '''# Loader shim written by raven_video (see ../pipeline_causal_wan.py).
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers resolves the loader by this name)
from raven_video.models.transformer_causal_wan import CausalWanTransformer3DModel  # noqa: F401
'''


def write_hub_layout(folder: str) -> None:
    """Rewrite ``model_index.json`` to the shim form and write the two shim files (atomically per file)."""
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["_class_name"] = [PIPELINE_SHIM[:-3], "CausalWanPipeline"]
    if "transformer" in index:
        index["transformer"] = ["causal_wan", "CausalWanTransformer3DModel"]
    _atomic_write(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
    _atomic_write(os.path.join(folder, PIPELINE_SHIM), _PIPELINE_SHIM_TEXT)
    os.makedirs(os.path.join(folder, "transformer"), exist_ok=True)
    _atomic_write(os.path.join(folder, TRANSFORMER_SHIM), _TRANSFORMER_SHIM_TEXT)


def has_our_shims(name_or_path: str, **kwargs) -> bool:
    """True when the folder (local, or the Hub repo's cached snapshot) holds exactly the shims we write."""
    folder = name_or_path if os.path.isdir(str(name_or_path)) else None
    if folder is None:
        try:
            from huggingface_hub import hf_hub_download

            opts = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
            paths = [hf_hub_download(name_or_path, p.replace(os.sep, "/"), **opts)
                     for p in (PIPELINE_SHIM, TRANSFORMER_SHIM)]
        except Exception:  # offline, private, or not a repo: leave the decision to the user
            return False
    else:
        paths = [os.path.join(folder, PIPELINE_SHIM), os.path.join(folder, TRANSFORMER_SHIM)]
    expected = (_PIPELINE_SHIM_TEXT, _TRANSFORMER_SHIM_TEXT)
    try:
        return all(open(p).read() == text for p, text in zip(paths, expected))
    except OSError:
        return False


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
