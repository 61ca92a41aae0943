#!/usr/bin/env bash
# Prepare the Self Forcing reference (github guandeh17/Self-Forcing) for benchmarks/reference_self_forcing.py.
#
# The reference is used for benchmarking/parity ONLY and is NEVER committed: it lives under .ref/ (git-ignored via
# .git/info/exclude). Usage, from the repository root:
#
#   benchmarks/fetch_reference.sh                 # check; print how to get it if missing
#   benchmarks/fetch_reference.sh <bare-git-dir>  # check out HEAD of a bare mirror (e.g. /work/.mirror/...)
#   benchmarks/fetch_reference.sh --clone         # git clone from GitHub (needs network)
#
# In the agent workplace the mirror comes from the `fetch` tool (github:guandeh17/Self-Forcing), which returns a
# bare git dir such as /work/.mirror/guandeh17+Self-Forcing/repo; pass that path as the argument.
# Tested revision: 33593df3e81fa3ec10239271dd2c100facac6de1 (2025-09-11).
#
# GPU run (the wheels in .whl/ must include diffusers 0.42.1, einops, ftfy, regex, wcwidth; see the report in
# benchmarks/reference_self_forcing.py's docstring):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/reference_self_forcing.py
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
DEST=.ref/Self-Forcing
URL=https://github.com/guandeh17/Self-Forcing

ensure_excluded() {
  grep -qxF '/.ref/' .git/info/exclude 2>/dev/null || echo '/.ref/' >> .git/info/exclude
}

prune() {  # keep the tree small (the GPU tool carries at most 64 MiB): drop media and prompt lists
  rm -rf "$DEST/videos" "$DEST/images" "$DEST/prompts" "$DEST/templates"
}

if [[ $# -ge 1 ]]; then
  ensure_excluded
  rm -rf "$DEST" && mkdir -p "$DEST"
  if [[ "$1" == "--clone" ]]; then
    git clone --depth 1 "$URL" "$DEST.tmp"
    git -C "$DEST.tmp" rev-parse HEAD > "$DEST.tmp/REVISION"
    rm -rf "$DEST.tmp/.git" && rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
  else
    git --git-dir="$1" archive HEAD | tar -x -C "$DEST"
    git --git-dir="$1" rev-parse HEAD > "$DEST/REVISION"
  fi
  prune
fi

if [[ -f "$DEST/pipeline/causal_inference.py" && -f "$DEST/wan/modules/causal_model.py" ]]; then
  ensure_excluded
  echo "reference present: $DEST (revision $(cat "$DEST/REVISION" 2>/dev/null || echo unknown))"
  git check-ignore -q "$DEST/README.md" && echo "ignored by git: ok" || { echo "WARNING: $DEST is not git-ignored"; exit 1; }
  exit 0
fi

cat <<MSG
reference missing: $DEST
Get it one of these ways, then re-run this script:
  * agent workplace: call the fetch tool with github:guandeh17/Self-Forcing, then
      benchmarks/fetch_reference.sh /work/.mirror/guandeh17+Self-Forcing/repo
  * with network access:
      benchmarks/fetch_reference.sh --clone
MSG
exit 1
