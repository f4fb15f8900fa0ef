"""Low-bit GEMM peers for benchmarks/gpu_kernels.py that are separate packages: humming-kernels (Marlin-class
int4 / int3 / int2 group kernels for Hopper, JIT-compiled on first use) and bitsandbytes NF4 (blocks of
64; its batch-1 GEMV kernel, a dequantize + matmul above). Each builder returns (op, copies, bytes) where
op(x, copy) runs y = x @ W.T on one weight copy; a peer that is not installed or fails raises, and the benchmark
skips it with the reason. Bytes are counted from the peer's own tensors, not from a formula."""

from __future__ import annotations

import torch

HUMMING_BITS = (4, 3, 2)  # the bits the targets compare at (each width JIT-compiles its own kernels: int8 left out for time)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def humming(w: torch.Tensor, bits: int, copies: int, group: int = 128):
    """humming-kernels uint{bits} g{group}: `HummingLayer(...).load_from_unquantized(W)`, `.transform()`, called
    as the layer (humming.forward.humming_forward with its default tuning)."""
    from humming.layer import HummingLayer

    rows, cols = w.shape
    layers = []
    for _ in range(copies):
        layer = HummingLayer(shape_n=rows, shape_k=cols, weight_config={"dtype": f"uint{bits}", "group_size": group},
                             torch_dtype=torch.bfloat16).cuda()
        layer.load_from_unquantized(w)
        layer.transform()
        layers.append(layer)
    nbytes = _tensor_bytes(list(layers[0].parameters()) + list(layers[0].buffers()))
    return (lambda x, layer: layer(x)), layers, nbytes


def bnb_nf4(w: torch.Tensor, copies: int, block: int = 64):
    """bitsandbytes NF4 (no double quantization): `bitsandbytes.matmul_4bit` on `functional.quantize_4bit`."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    made = [bnbf.quantize_4bit(w, blocksize=block, quant_type="nf4") for _ in range(copies)]
    packed, state = made[0]
    nbytes = _tensor_bytes([packed, state.absmax, state.code])
    return (lambda x, copy: bnb.matmul_4bit(x, copy[0].t(), quant_state=copy[1])), made, nbytes


def build_all(w: torch.Tensor, copies_for) -> dict:
    """{peer name: (op, copies, bytes)} for every peer that builds here; failures printed and skipped."""
    builders = {f"humming_int{bits}_g128": (lambda b=bits: humming_sized(w, b, copies_for)) for bits in HUMMING_BITS}
    builders["bnb_nf4_b64"] = lambda: bnb_sized(w, copies_for)
    made = {}
    for name, build in builders.items():
        try:
            made[name] = build()
        except Exception as error:  # not installed, no compiler, a shape it refuses: skipped, reason printed
            print(f"{name} unavailable: {type(error).__name__}: {str(error)[:300]}", flush=True)
    return made


def humming_sized(w: torch.Tensor, bits: int, copies_for):
    _, _, nbytes = humming(w, bits, 1)
    return humming(w, bits, copies_for(nbytes))


def bnb_sized(w: torch.Tensor, copies_for):
    _, _, nbytes = bnb_nf4(w, 1)
    return bnb_nf4(w, copies_for(nbytes))


def bits_of(name: str) -> int | None:
    """The weight bits a peer stores (None for dense / sparse-only peers)."""
    if name == "torch_int4pack_g128" or name.startswith("bnb_nf4"):
        return 4
    if name.startswith("humming_int"):
        return int(name[len("humming_int"):].split("_")[0])
    return None
