"""Hub layout of ``CausalWanPipeline`` folders, and loading them without running code that ships with them.

Two readers, two mechanisms:

* ``DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`` returns our pipeline only when
  ``model_index.json`` names the pipeline as ``["pipeline_causal_wan", "CausalWanPipeline"]`` with a root
  ``pipeline_causal_wan.py``, and the transformer as ``["causal_wan", "CausalWanTransformer3DModel"]`` with
  ``transformer/causal_wan.py`` (any other library name fails diffusers' Hub pre-check). :func:`write_hub_layout`
  writes these one-line shims, which re-export the installed ``raven_video`` package. diffusers imports them, and any
  other module the folder names, only because the user passed ``trust_remote_code=True``.
* ``CausalWanPipeline.from_pretrained(...)`` never imports a file of the folder: :func:`installed_index` maps the
  shim entries onto the installed classes, :func:`foreign_code` lists every other entry that would need code from
  the folder (refused unless the user passed ``trust_remote_code=True``), and :func:`download` fetches a Hub repo's
  files without the ``.py`` files. Weights and configs stay plain diffusers / transformers files.
"""

from __future__ import annotations

import json
import os

from ..utils.atomic import atomic_write_text

PIPELINE_SHIM = "pipeline_causal_wan.py"
TRANSFORMER_SHIM = os.path.join("transformer", "causal_wan.py")

PIPELINE_ENTRY = ["pipeline_causal_wan", "CausalWanPipeline"]
TRANSFORMER_ENTRY = ["causal_wan", "CausalWanTransformer3DModel"]
# what the shim entries stand for: the installed package (full module path, as diffusers' save_pretrained records
# a class defined outside diffusers/transformers; diffusers resolves it from sys.modules, importing nothing)
INSTALLED_TRANSFORMER = ["raven_video.models.transformer_causal_wan", "CausalWanTransformer3DModel"]
# libraries whose classes diffusers itself imports (``LOADABLE_CLASSES``), plus our own installed package
TRUSTED_LIBRARIES = ("diffusers", "transformers")
OWN_PACKAGE = "raven_video"

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
    index["_class_name"] = list(PIPELINE_ENTRY)
    if "transformer" in index:
        index["transformer"] = list(TRANSFORMER_ENTRY)
    atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
    atomic_write_text(os.path.join(folder, PIPELINE_SHIM), _PIPELINE_SHIM_TEXT)
    os.makedirs(os.path.join(folder, "transformer"), exist_ok=True)
    atomic_write_text(os.path.join(folder, TRANSFORMER_SHIM), _TRANSFORMER_SHIM_TEXT)


def _components(index: dict) -> dict:
    """``{name: [library, class]}`` of the components ``model_index.json`` lists (``None`` entries skipped)."""
    return {k: v for k, v in index.items()
            if not k.startswith("_") and isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is not None}


def _is_trusted_library(library: str) -> bool:
    from diffusers import pipelines

    return library in TRUSTED_LIBRARIES or hasattr(pipelines, library) or library == OWN_PACKAGE \
        or library.startswith(OWN_PACKAGE + ".")


def foreign_code(index: dict) -> list[str]:
    """Entries of ``model_index.json`` whose class would come from code that ships with the folder.

    Everything except diffusers / transformers classes, diffusers pipeline modules, ``raven_video`` modules and our
    own shim entries (which :func:`installed_index` maps onto the installed package). Returns readable descriptions
    like ``'scheduler: ["x", "Evil"]'``; empty when the folder loads with library code only.
    """
    found = []
    class_name = index.get("_class_name")
    if isinstance(class_name, (list, tuple)) and list(class_name) != PIPELINE_ENTRY:
        found.append(f"pipeline: {json.dumps(list(class_name))}")
    for name, (library, cls) in _components(index).items():
        if [library, cls] == TRANSFORMER_ENTRY or _is_trusted_library(library):
            continue
        found.append(f"{name}: {json.dumps([library, cls])}")
    return found


def installed_index(index: dict) -> dict:
    """``model_index.json`` with our shim entries replaced by the installed classes they re-export."""
    index = dict(index)
    if list(index.get("_class_name") or []) == PIPELINE_ENTRY:
        index["_class_name"] = PIPELINE_ENTRY[1]
    for name, entry in _components(index).items():
        if list(entry) == TRANSFORMER_ENTRY:
            index[name] = list(INSTALLED_TRANSFORMER)
    return index


def refuse_foreign_code(index: dict, source: str) -> None:
    """Raise a one-line ``ValueError`` naming every entry of :func:`foreign_code` (loading them would run code)."""
    foreign = foreign_code(index)
    if foreign:
        raise ValueError(
            f"{source} names components whose code ships with the model ({'; '.join(foreign)}): loading them would "
            "run that code. CausalWanPipeline loads only diffusers, transformers and raven_video classes; pass "
            "trust_remote_code=True only if you trust this code."
        )


# keyword arguments of `from_pretrained` that describe where Hub files come from
DOWNLOAD_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")


def download(repo_id: str, **kwargs) -> str:
    """Fetch a Hub repo's ``model_index.json``, refuse foreign code, then the component folders without ``.py`` files.

    Honours ``HF_HUB_OFFLINE`` and the local cache (``huggingface_hub``). Returns the local snapshot folder.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    opts = {k: kwargs[k] for k in DOWNLOAD_KWARGS if kwargs.get(k) is not None}
    with open(hf_hub_download(repo_id, "model_index.json", **opts)) as f:
        index = json.load(f)
    refuse_foreign_code(index, f"Hub repo {repo_id!r}")
    allow = ["model_index.json"] + [f"{name}/*" for name in _components(index)]
    return snapshot_download(repo_id, allow_patterns=allow, ignore_patterns=["*.py", "*.pyc"], **opts)
