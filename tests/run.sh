#!/usr/bin/env bash
# The test command from the README: installs what the tests need, then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned, so no requirement below can pull a multi-GB CUDA build.
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[test]'
python3 -m pytest -q -n 2 "$@"
