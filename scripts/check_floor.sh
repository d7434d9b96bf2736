#!/usr/bin/env bash
# The declared floor, checked: resolve pyproject.toml (with the test extra) to the LOWEST version of every direct
# dependency (uv's lowest-direct resolution), install that into a fresh venv and run tests there.
#   bash scripts/check_floor.sh [VENV_DIR] [pytest args...]     (default: /tmp/ldm-floor, the suite minus slow tests)
# Downloads the floor wheels (torch 2.6 with its CUDA libraries: a few GB) from the package index.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-/tmp/ldm-floor}"
shift || true
python3 -m venv "$venv/tools" && "$venv/tools/bin/pip" install -q uv
uv="$venv/tools/bin/uv"
"$uv" pip compile "$root/pyproject.toml" --extra test --resolution lowest-direct --python-version 3.11 \
    -o "$venv/floor.txt" -q
"$uv" venv -q -p 3.11 "$venv/env"
VIRTUAL_ENV="$venv/env" "$uv" pip sync -q "$venv/floor.txt"
VIRTUAL_ENV="$venv/env" "$uv" pip install -q --no-deps -e "$root"
grep -E "^(torch|lightning|hydra-core|open-clip-torch|webdataset|diffusers|numpy)==" "$venv/floor.txt"
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
cd "$root" && "$venv/env/bin/python" -m pytest -q -p no:cacheprovider "$@"
