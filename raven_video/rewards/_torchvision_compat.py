"""Make PyPI's torchvision importable on a CPU-only torch.

PyPI ships torchvision only as a CUDA build: its ``_C.so`` links ``libtorch_cuda.so``, so on the CPU torch of the
development/CI machines ``import torchvision`` dies with ``RuntimeError: operator torchvision::nms does not exist``
(``torchvision/_meta_registrations.py`` registers fake kernels for two ops that ``_C`` would have defined). Defining
those two op *schemas* before torchvision is imported makes everything we use (RAFT, transforms, open_clip, timm,
pyiqa, vbench's AMT) import and run; only the compiled ops (nms, roi_align, deform_conv, video decoders) stay
unavailable.

The shim is applied only when it is needed: torch is a CPU build *and* torchvision's ``_C`` library fails to load.
With a working torchvision (any GPU machine) this module does nothing.

This file imports nothing but the standard library at module level so that ``.ci/install_rewards.sh`` can install it
as a ``.pth`` start-up hook (``install_import_hook``): then *every* process in the environment, including code that
imports torchvision indirectly (transformers, diffusers), gets the shim before torchvision's first import.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_APPLIED = False
_IN_PROGRESS = False


def ensure_torchvision_importable() -> bool:
    """Apply the schema shim if (and only if) torchvision's compiled library cannot load.

    Must run before the first ``import torchvision`` in the process. Returns ``True`` when the shim was applied now
    or earlier in this process. Safe to call many times.
    """
    global _APPLIED, _IN_PROGRESS
    if _APPLIED or _IN_PROGRESS:
        return _APPLIED
    if "torchvision" in sys.modules:  # already imported (successfully or not): nothing we can do any more
        return _APPLIED
    _IN_PROGRESS = True
    try:
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            return False
        import torch

        if torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None:
            return False
        try:
            torch.ops.torchvision.nms  # noqa: B018 - already defined (a CPU torchvision build, or shim applied)
            return _APPLIED
        except (AttributeError, RuntimeError):
            pass
        lib_dir = list(spec.submodule_search_locations)[0]
        so_files = [f for f in os.listdir(lib_dir) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
        if so_files:
            try:
                torch.ops.load_library(os.path.join(lib_dir, so_files[0]))
                return False  # the compiled library loads: torchvision works as shipped
            except OSError:
                pass
        lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - must stay alive
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        globals()["_LIBRARY"] = lib
        _APPLIED = True
        return True
    finally:
        _IN_PROGRESS = False


class _TorchvisionShimFinder(importlib.abc.MetaPathFinder):
    """Meta-path hook: runs :func:`ensure_torchvision_importable` right before torchvision's first import."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        if fullname == "torchvision" and not _IN_PROGRESS:
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass
            ensure_torchvision_importable()
        return None  # let the regular finders import it


def install_import_hook() -> None:
    """Register the meta-path hook (idempotent). Used by the ``.pth`` file that ``install_rewards.sh`` writes."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionShimFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionShimFinder())


def import_torchvision():
    """Import and return torchvision, applying the CPU shim first when needed; clear error if it is missing."""
    ensure_torchvision_importable()
    try:
        import torchvision
    except ImportError as e:
        raise ImportError(
            "torchvision is required for this reward (RAFT / transforms). Install it without replacing torch: "
            "`pip install --no-deps 'torchvision>=0.26'` (see .ci/install_rewards.sh)."
        ) from e
    return torchvision
