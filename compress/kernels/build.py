"""The CPU kernels' build: the C++ sources in kernels/cpu/ compiled on first use with torch's JIT loader
(torch.utils.cpp_extension.load, ninja) into torch's extension cache, then registered as the torch ops
torch.ops.compress_cpu.*; which vector path runs is chosen per call.

Paths, best first: "avx512" (AVX-512 F/BW/VL/DQ; with AVX512_BF16 its bf16-activation x bf16-value
N:M kernel uses vdpbf16ps, whose bf16 products are exact in fp32), "avx2" (AVX2 + FMA + F16C),
"scalar" (plain C++ loops), "torch" (the formats' reference_matmul, no build). VNNI is not used: it
would need int8 activations, and every path here keeps the reference's fp32 numbers. Each ISA's code
is compiled for that ISA alone (a `#pragma GCC target` per file), so one build runs on any x86-64 CPU
and the path is picked at run time from what the CPU reports. COMPRESS_CPU_KERNEL=avx512|avx2|scalar|
torch forces a path (a path the CPU lacks is an error, not a silent downgrade).

When no compiler is found or the build fails, every call uses the reference matmul, after one line
saying so. For tests: COMPRESS_KERNEL_SOURCES points the build at another folder of sources, and CXX
(which torch's loader also reads) at another compiler."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("compress.kernels")

PATHS = ("avx512", "avx2", "scalar", "torch")
ISA_CODE = {"scalar": 0, "avx2": 1, "avx512": 2}
BF16_BIT = 3  # isa_support(): the CPU has AVX512_BF16 (the avx512 path then takes its bf16 N:M kernel)
ENV_PATH = "COMPRESS_CPU_KERNEL"
ENV_SOURCES = "COMPRESS_KERNEL_SOURCES"
SOURCES = Path(__file__).resolve().parents[2] / "kernels" / "cpu"
FLAGS = ["-O3", "-std=c++17", "-fno-math-errno", "-fopenmp"]  # at::parallel_for is OpenMP in torch's CPU builds: without
LDFLAGS = ["-fopenmp"]  # -fopenmp its header-only loop runs on one thread (libgomp resolves to the copy torch loaded)
BUILD_SECONDS = 60  # a 2-core machine took 20-45 s (ninja, two files at a time); said before a build starts

_lock = threading.Lock()
_state: dict[str, object] = {}


def _sources() -> tuple[Path, list[Path]]:
    folder = Path(os.environ.get(ENV_SOURCES) or SOURCES)
    return folder, sorted(folder.glob("*.cpp"))


def _build_name(files: list[Path]) -> str:
    """A name that changes with every byte of the sources (headers included), the flags and torch."""
    digest = hashlib.sha256(f"{torch.__version__} {FLAGS} {LDFLAGS}".encode())
    for path in sorted(files[0].parent.glob("*")) if files else []:
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    return "compress_cpu_" + digest.hexdigest()[:12]


def build_directory(name: str) -> Path:
    """torch's extension cache ($TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/...): it outlives a
    test session's COMPRESS_HOME, so the minute-long build happens once per source version."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root()) / name


def _compile() -> str | None:
    """Build (or load the cached build) and register the ops; None, or why the kernels are unavailable."""
    folder, files = _sources()
    if not files:
        return f"no C++ sources in {folder}"
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found)"
    from torch.utils.cpp_extension import load

    name = _build_name(files)
    directory = build_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    cached = (directory / f"{name}.so").exists()
    if not cached:
        log.warning("building compress CPU kernels (first use, ~%d s)", BUILD_SECONDS)
    started = time.perf_counter()
    try:
        load(name=name, sources=[str(f) for f in files], extra_cflags=FLAGS, extra_ldflags=LDFLAGS, build_directory=str(directory),
             is_python_module=False, verbose=False)
    except Exception as error:  # a compiler error, a missing ninja, a broken toolchain: all mean "use torch"
        lines = [line for line in str(error).splitlines() if "error" in line.lower()] or str(error).splitlines() or [type(error).__name__]
        return f"build failed: {lines[0].strip()[:200]}"
    _state["build_seconds"] = 0.0 if cached else time.perf_counter() - started
    return None


def kernels_available() -> bool:
    """Whether the compiled ops are registered (building them on the first call); after a failure,
    one line says why and every later call answers False at once."""
    with _lock:
        if "error" not in _state:
            try:
                error = _compile()
            except Exception as unexpected:
                error = f"build failed: {type(unexpected).__name__}: {unexpected}"
            _state["error"] = error
            if error is not None:
                log.warning("compress CPU kernels unavailable (%s); using the plain-torch reference matmul", error)
        return _state["error"] is None


def unavailable_reason() -> str | None:
    """Why the compiled kernels are not used (after kernels_available()), or None."""
    return _state.get("error")  # type: ignore[return-value]


def cpu_paths() -> list[str]:
    """The paths this machine can run, best first ("torch" always; the compiled ones when built)."""
    if "paths" not in _state:
        if not kernels_available():
            return ["torch"]
        support = int(torch.ops.compress_cpu.isa_support())
        _state["paths"] = [p for p in PATHS[:-1] if support & (1 << ISA_CODE[p])] + ["torch"]
        _state["bf16"] = bool(support & (1 << BF16_BIT))
    return list(_state["paths"])  # type: ignore[call-overload]


def cpu_features() -> str:
    """What the compiled kernels use here, in words (for logs and benchmarks)."""
    paths = cpu_paths()
    if paths == ["torch"]:
        return f"plain torch ({unavailable_reason()})"
    best = paths[0] + (" + AVX512-BF16 (bf16 activations: N:M, bitmap, 2/4-bit codes)" if paths[0] == "avx512" and _state.get("bf16") else "")
    return f"{best}; available: {', '.join(paths)}"


def resolve_path(path: str | None = None) -> str:
    """The path a call takes: `path`, else $COMPRESS_CPU_KERNEL, else the best this CPU runs. A forced
    compiled path that cannot run here is an error; "torch" never builds anything."""
    wanted = path or os.environ.get(ENV_PATH, "").strip().lower() or None
    if wanted not in (None, *PATHS):
        raise ValueError(f"{ENV_PATH}={wanted!r}: expected one of {', '.join(PATHS)}")
    if wanted == "torch":
        return "torch"
    paths = cpu_paths()
    if wanted is None:
        return paths[0]
    if wanted not in paths:
        why = unavailable_reason() or f"this CPU lacks {wanted.upper()} (it runs {', '.join(paths)})"
        raise RuntimeError(f"CPU kernel path {wanted!r} unavailable: {why}")
    return wanted
