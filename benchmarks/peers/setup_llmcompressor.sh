#!/usr/bin/env bash
# Builds the peer's virtualenv in .peers/llmc-venv (ignored by git): llm-compressor pins its own stack,
# so it does not share our .venv. torch is held at the CPU build with a constraint file, so nothing
# CUDA is pulled (llmcompressor 0.14.0.1 accepts torch>=2.10,<=2.14 and transformers 5.15-5.17).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .peers
[ -x .peers/llmc-venv/bin/python ] || python3 -m venv .peers/llmc-venv
echo "torch==2.13.0" > .peers/constraints.txt
.peers/llmc-venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.peers/llmc-venv/bin/pip install -q --disable-pip-version-check -c .peers/constraints.txt llmcompressor==0.14.0.1
.peers/llmc-venv/bin/pip freeze > .peers/llmc-freeze.txt
