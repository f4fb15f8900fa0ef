#!/usr/bin/env bash
# Creates .venv and installs compress with pinned dependencies. Safe to run again.
# torch is installed first, pinned to the CPU build (an unpinned torch would pull CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
echo "install: torch 2.13.0, CPU build (1/2)" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
echo "install: compress and its pinned dependencies (2/2; about 1-2 minutes from nothing)" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
echo "install: done; .venv/bin/compress --help" >&2
