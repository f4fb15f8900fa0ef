#!/usr/bin/env bash
# Installs llm-compressor 0.14.0.1 OFFLINE on a GPU machine whose python3 already has torch (a CUDA
# build), transformers, accelerate, numpy, pandas, pyarrow, aiohttp, fsspec, xxhash, pydantic, PyYAML,
# requests, tqdm, safetensors and huggingface_hub: into the virtualenv /tmp/llmc, which sees python3's
# packages (--system-site-packages), from the wheels in .gpu-llmc/ alone (--no-index), so what the
# system has is reused (no torch download) and only what it lacks comes from the wheelhouse:
# llmcompressor, compressed-tensors, datasets (+ dill, multiprocess), auto-round (+ py-cpuinfo),
# loguru, nvidia-ml-py and pillow (benchmarks/peers/README.md, "Speed side by side").
#
#   bash benchmarks/peers/setup_llmcompressor_gpu.sh          # then: /tmp/llmc/bin/python
#
# PYTHON (default python3), LLMC_VENV (default /tmp/llmc) and LLMC_WHEELS (default .gpu-llmc, from the
# repository root) override the three paths. Fails (non-zero exit, a message naming the problem) if a
# wheel is missing, if pip would replace the system's torch, or if llmcompressor does not import.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VENV=${LLMC_VENV:-/tmp/llmc}
WHEELS=${LLMC_WHEELS:-.gpu-llmc}
fail() { echo "setup_llmcompressor_gpu.sh: $*" >&2; exit 1; }

[ -d "$WHEELS" ] && ls "$WHEELS"/llmcompressor-0.14.0.1-*.whl >/dev/null 2>&1 \
  || fail "no llmcompressor wheel in $WHEELS/ (the wheelhouse is built on a machine with internet: see benchmarks/peers/README.md)"
system_torch=$("$PYTHON" -c 'import torch; print(torch.__version__)') || fail "$PYTHON cannot import torch"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV" \
  || fail "$PYTHON -m venv failed (Debian/Ubuntu: apt-get install python3-venv)"
# a python3 that is itself a virtualenv lends the new one its base interpreter's packages, not its
# own: point the new one at python3's site-packages too (a .pth file, after its own)
"$PYTHON" -c 'import site, sys; print("\n".join(site.getsitepackages() if sys.prefix != sys.base_prefix else []))' \
  > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_system_python3.pth"
"$VENV/bin/python" -c 'import torch' || fail "$VENV does not see $PYTHON's torch"

# nothing but the wheelhouse: no index, and no pip configuration or PIP_* variables (find-links,
# constraints) of this machine that could bring in other files
env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_REQUIREMENT PIP_CONFIG_FILE=/dev/null \
  "$VENV/bin/python" -m pip install --no-index --find-links "$WHEELS" --disable-pip-version-check --no-cache-dir \
  llmcompressor==0.14.0.1 \
  || fail "pip could not install llmcompressor from $WHEELS alone: the message above names what is missing"

"$VENV/bin/python" - "$system_torch" "$VENV" <<'EOF' || fail "llmcompressor does not run in $VENV"
import sys

import compressed_tensors
import llmcompressor
import torch
import transformers
from llmcompressor import oneshot  # noqa: F401  (the entry point the peer script uses)
from llmcompressor.modifiers.gptq import GPTQModifier  # noqa: F401
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier  # noqa: F401

if torch.__version__ != sys.argv[1]:
    raise SystemExit(f"torch {torch.__version__} in the venv, {sys.argv[1]} in the system: pip replaced it")
print(f"{sys.argv[2]} ready: llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}, "
      f"torch {torch.__version__} (the system's; CUDA available: {torch.cuda.is_available()}), transformers {transformers.__version__}")
EOF
