#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment: torch 2.13.0 (CPU build) first,
# then torch-scatter built against it, then metanet with its dev extra.
# Usage: scripts/setup.sh [VENV_DIR]    (default .venv; METANET_NO_SCATTER=1 skips torch-scatter)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
stamp="$venv/.metanet-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)${METANET_NO_SCATTER:+-noscatter}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install torch==2.13.0
if [ -z "${METANET_NO_SCATTER:-}" ]; then
  if ! "$venv/bin/python" -c "import torch_scatter" 2>/dev/null; then
    echo "building torch-scatter against torch 2.13.0 (about 9 minutes the first time) ..." >&2
    "${pip[@]}" install setuptools wheel
    "${pip[@]}" install --no-build-isolation torch-scatter
  fi
else
  "${pip[@]}" uninstall -y torch-scatter >/dev/null 2>&1 || true
fi
"${pip[@]}" install -e ".[dev]"
echo "$want" > "$stamp"
