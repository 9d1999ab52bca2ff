#!/usr/bin/env bash
# Set up adapterhub and run the end-to-end demo on a tiny, locally built model (no downloads):
# train a few LoRA steps on CPU, commit three revisions, then log, show and checkout.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e '.[torch]'
python3 examples/quickstart/demo.py "$@"
