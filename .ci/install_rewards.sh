#!/usr/bin/env bash
# Install the rewards / evaluation extras (run after torch and the package itself are installed).
# Nothing here replaces torch: every package that depends on torch goes in with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

# 1. the plain runtime dependencies first (none of them depends on torch): installed before the --no-deps packages
#    below exist, pip has no reason to print dependency-resolver conflicts about their (deliberately unmet) pins
"$PY" -m pip install -r requirements-rewards.txt

# 2. torchvision matching the installed torch (PyPI has only CUDA builds; on a CPU torch the shim of step 4 makes it import)
TV_VERSION="$("$PY" -c 'import torch; major, minor = torch.__version__.split("+")[0].split(".")[:2]; print(f"0.{int(minor) + 15}")')"
"$PY" -m pip install --no-deps "torchvision==${TV_VERSION}.*"

# 3. model libraries, --no-deps (open_clip/timm/pyiqa would pull torch/torchvision; vbench pins numpy<2, transformers==4.33.2)
"$PY" -m pip install --no-deps "open_clip_torch>=3.3,<4" "timm>=1.0.17,<2" "pyiqa==0.1.16" "vbench==0.1.5"

# 4. start-up hook: defines torchvision's two op schemas before torchvision's first import when (and only when) its
#    compiled library cannot load (CPU torch + CUDA torchvision; rewards_eval.md §0). Without it, any process that
#    imports transformers/diffusers code touching torchvision fails on the CPU machines.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp raven_video/rewards/_torchvision_compat.py "$SITE/raven_torchvision_shim.py"
echo "import raven_torchvision_shim; raven_torchvision_shim.install_import_hook()" > "$SITE/raven_torchvision_shim.pth"

# 5. check
"$PY" -c "import torchvision, open_clip, pyiqa.archs.musiq_arch, importlib; importlib.import_module('vbench.third_party.amt.networks.AMT-S'); from diffusers import WanPipeline; print('rewards extras OK, torchvision', torchvision.__version__)"
