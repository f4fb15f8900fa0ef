"""Quantized targets in an exported ONNX model as onnxruntime's com.microsoft MatMulNBits.

`rewrite_matmul_nbits` replaces each MatMul (or Gemm) whose weight is a quantized target's by one
MatMulNBits node holding the target's packed codes, scales and zero points, and removes the float
initializer. It changes nothing the model computes: a node is rewritten only where its weight equals
the target's `QuantizedWeight.dequantize()` bit for bit, and only with a MatMulNBits whose codes,
scales and zero points give exactly those values (the kernel's float32 arithmetic may round its
products and sums differently, as any other MatMul kernel does).

Matching is by value. Neither of torch's exporters keeps a Linear's parameter name (TorchScript names
the folded, transposed weight `onnx::MatMul_1233`, dynamo `val_91`); TorchScript's node scopes do
name the module, dynamo's do not. So every 2-D float weight feeding a MatMul/Gemm (an [in, out]
initializer, or an [out, in] one through Transpose, as exporters lay out `x @ W.T`) is fingerprinted
and looked up among the targets' dequantized weights. Two targets with bit-identical weights compute
the same thing, so which of them a node gets does not matter. The caller must export the model with the
dequantized weights themselves (not a bfloat16 rounding of them) for anything to match.

What MatMulNBits (onnxruntime 1.32, CPU) can hold, tested: codes of 2, 4 or 8 bits (3 bits are
stored in the 4-bit form, 5-7 in the 8-bit one: the same values, wider codes); blocks of a power of two
from 16 to 256 input columns (2-bit blocks may not exceed 256); zero points packed as unsigned
integers, or float (same type as the input) except with 8 bits. So a target stays a dense MatMul when it has a
lookup table, outliers, 16 bits, a group size no block of 16-256 columns tiles (one per row
always fits: its scale is repeated per block), non-integer zero points with 8-bit codes, or pruned
weights that cannot be coded as exactly 0 (a pruned weight is the code equal to its group's zero
point, so the zero point must be an integer code). A column permutation (act-order) becomes a
Gather of the input columns in front of the node. Second-level quantized statistics (SpQR) are
float32 values, which MatMulNBits' float32 scales and zero points hold exactly.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from compress.formats.quantized import QuantizedWeight

DOMAIN = "com.microsoft"
CONTAINER_BITS = (2, 4, 8)  # what onnxruntime 1.32's CPU MatMulNBits accepts
SMALLEST_BLOCK, LARGEST_BLOCK = 16, 256  # power-of-two block sizes every accepted bit width runs with


@dataclass
class NBitsRewrite:
    """What `rewrite_matmul_nbits` did: targets now MatMulNBits, targets left dense and why."""

    nbits: list[str] = field(default_factory=list)
    dense: dict[str, str] = field(default_factory=dict)  # target -> reason

    def counts(self) -> dict[str, object]:
        return {"onnx_nbits_targets": len(self.nbits), "onnx_dense_targets": len(self.dense),
                "onnx_dense_reasons": dict(Counter(self.dense.values()))}


@dataclass
class _Packed:
    """A target's MatMulNBits inputs and attributes."""

    bits: int
    block_size: int
    codes: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray  # uint8 [N, ceil(k_blocks * bits / 8)] or float32 [N, k_blocks]
    perm: np.ndarray | None  # int64 [K]: the input columns in stored order


def container_bits(bits: int) -> int | None:
    """The smallest MatMulNBits code width that holds `bits`-bit codes, None when none does."""
    return next((width for width in CONTAINER_BITS if bits <= width), None)


def block_size_for(group_size: int, columns: int) -> int | None:
    """A MatMulNBits block size whose blocks each lie inside one group of `group_size` columns (so a
    group's scale is repeated over its blocks), the largest up to LARGEST_BLOCK; None when none is."""
    if group_size >= columns:  # one group per row: any block size tiles it
        return max(SMALLEST_BLOCK, min(LARGEST_BLOCK, 1 << (columns - 1).bit_length()))
    block = min(LARGEST_BLOCK, group_size & -group_size)  # the largest power of two dividing the group
    return block if block >= SMALLEST_BLOCK else None


def _pack_fields(values: np.ndarray, bits: int, width: int) -> np.ndarray:
    """uint8 [rows, ceil(width * bits / 8)]: each row's first `width` values, `bits` each, least
    significant first (MatMulNBits' layout for both codes and zero points)."""
    per_byte = 8 // bits
    columns = -(-width // per_byte) * per_byte
    padded = np.zeros((values.shape[0], columns), dtype=np.uint8)
    padded[:, : values.shape[1]] = values
    fields = padded.reshape(values.shape[0], -1, per_byte).astype(np.uint16)
    shifts = (np.arange(per_byte, dtype=np.uint16) * bits)
    return (fields << shifts).sum(axis=2).astype(np.uint8)


def pack_for_matmul_nbits(quantized: QuantizedWeight) -> _Packed | str:
    """The target's MatMulNBits form, or why it has none."""
    if quantized.lut is not None:
        return "lookup table"
    if quantized.outliers is not None and quantized.outliers.count:
        return "outliers"
    bits = container_bits(quantized.bits)
    if bits is None:
        return f"{quantized.bits} bits"
    rows, columns = quantized.shape
    block = block_size_for(quantized.group_size, columns)
    if block is None:
        return f"group size {quantized.group_size}"
    # every block lies in one group: the statistic of a block is that of its first column
    scales = quantized.group_values(quantized.scale)[:, ::block].contiguous()
    zeros = quantized.group_values(quantized.zero)[:, ::block].contiguous()
    integer_zeros = bool(torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() < 2**bits)
    if not integer_zeros and bits == 8:
        return "float zero points with 8-bit codes"
    codes = quantized.codes.to(torch.int64).clone()
    if quantized.keep is not None:
        pruned = ~quantized.keep
        zero_codes = quantized.group_values(quantized.zero)
        if not bool(torch.equal(zero_codes[pruned], zero_codes[pruned].round())):
            return "pruned weights with non-integer zero points"
        codes[pruned] = zero_codes[pruned].to(torch.int64)  # code == zero point: exactly 0
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        return "codes outside the grid"
    k_blocks = -(-columns // block)
    packed_codes = _pack_fields(codes.numpy().astype(np.uint8).reshape(rows, -1), bits, k_blocks * block)
    zero_points = (_pack_fields(zeros.numpy().astype(np.uint8), bits, k_blocks) if integer_zeros
                   else zeros.numpy().astype(np.float32))
    perm = None if quantized.perm is None else quantized.perm.to(torch.int64).numpy()
    return _Packed(bits, block, packed_codes.reshape(rows, k_blocks, block * bits // 8),
                   scales.numpy().astype(np.float32), zero_points, perm)


def _fingerprint(weight: np.ndarray) -> tuple[tuple[int, ...], str]:
    """Identifies an [out, in] float32 weight by shape and exact bytes."""
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    return weight.shape, hashlib.sha256(weight.tobytes()).hexdigest()


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _weight_of(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto],
               transposes: dict[str, onnx.NodeProto]) -> tuple[str, np.ndarray, str | None] | None:
    """(initializer name, its [out, in] weight, bias name) when `node` computes x @ W.T (+ bias) with
    W a float32 initializer, directly or through a Transpose; None for any other MatMul/Gemm."""
    if len(node.input) < 2:
        return None
    source, transposed = node.input[1], True  # MatMul takes [in, out]: W.T
    if source in transposes:
        transpose = transposes[source]
        if _attributes(transpose).get("perm", [1, 0]) not in ([1, 0], (1, 0)):
            return None
        source, transposed = transpose.input[0], False
    bias = None
    if node.op_type == "Gemm":
        attributes = _attributes(node)
        if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            return None
        if attributes.get("transB", 0):
            transposed = not transposed
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            if bias not in initializers or len(initializers[bias].dims) != 1:
                return None
    tensor = initializers.get(source)
    if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or len(tensor.dims) != 2:
        return None
    matrix = numpy_helper.to_array(tensor)
    return source, (matrix.T if transposed else matrix), bias


def _inputs_used(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node of `graph` or of its subgraphs (If/Loop bodies) reads, and its outputs."""
    used = {output.name for output in graph.output}
    for node in graph.node:
        used.update(node.input)
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                used |= _inputs_used(subgraph)
    return used


def rewrite_matmul_nbits(model_path: Path, quantized: dict[str, QuantizedWeight]) -> tuple[onnx.ModelProto, NBitsRewrite]:
    """The ONNX model at `model_path` with every quantized target MatMulNBits can hold exactly as a
    MatMulNBits node (see the module docstring), and what was done. The file is not changed."""
    model = onnx.load(str(model_path))
    graph = model.graph
    outcome = NBitsRewrite()
    by_value: dict[tuple, list[str]] = defaultdict(list)
    forms: dict[str, _Packed] = {}
    for name, weight in quantized.items():
        form = pack_for_matmul_nbits(weight)
        if isinstance(form, str):
            outcome.dense[name] = form
        else:
            forms[name] = form
            by_value[_fingerprint(weight.dequantize().numpy())].append(name)

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    transposes = {n.output[0]: n for n in graph.node if n.op_type == "Transpose" and n.input[0] in initializers}
    uses: Counter[str] = Counter()  # MatMulNBits nodes made from each target
    replaced: set[str] = set()  # the float initializers rewritten nodes read
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    for node in graph.node:
        found = _weight_of(node, initializers, transposes) if node.op_type in ("MatMul", "Gemm") else None
        names = by_value.get(_fingerprint(found[1])) if found is not None else None
        if not names:
            nodes.append(node)
            continue
        # identical weights compute the same: prefer a target not yet placed, so each is counted once
        name = next((n for n in names if not uses[n]), names[0])
        form, (rows, columns), bias = forms[name], found[1].shape, found[2]
        replaced.add(found[0])
        prefix = f"{name}.nbits" + (f".{uses[name]}" if uses[name] else "")
        uses[name] += 1
        added += [numpy_helper.from_array(form.codes, f"{prefix}.codes"),
                  numpy_helper.from_array(form.scales, f"{prefix}.scales"),
                  numpy_helper.from_array(form.zero_points, f"{prefix}.zero_points")]
        activations = node.input[0]
        if form.perm is not None:  # stored column k is input column perm[k]: gather the input to match
            added.append(numpy_helper.from_array(form.perm, f"{prefix}.perm"))
            activations = f"{prefix}.permuted_input"
            nodes.append(helper.make_node("Gather", [node.input[0], f"{prefix}.perm"], [activations], axis=-1,
                                          name=f"{prefix}.Gather"))
        inputs = [activations, f"{prefix}.codes", f"{prefix}.scales", f"{prefix}.zero_points"]
        if bias is not None:
            inputs += ["", bias]  # no g_idx (deprecated)
        nodes.append(helper.make_node("MatMulNBits", inputs, list(node.output), domain=DOMAIN, name=f"{prefix}.MatMulNBits",
                                      K=columns, N=rows, bits=form.bits, block_size=form.block_size))
    outcome.nbits = [name for name in quantized if uses[name]]
    outcome.dense.update({name: "no MatMul/Gemm in the graph takes its weight" for name in forms if not uses[name]})

    del graph.node[:]
    graph.node.extend(nodes)
    # the float weights (and Transposes of them) nothing reads any more go; everything else stays
    dead_transposes = {output for output, node in transposes.items() if node.input[0] in replaced} - _inputs_used(graph)
    live = [node for node in graph.node if not (node.op_type == "Transpose" and node.output[0] in dead_transposes)]
    del graph.node[:]
    graph.node.extend(live)
    used = _inputs_used(graph)
    kept = [tensor for tensor in graph.initializer if tensor.name in used or tensor.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    if uses and not any(opset.domain == DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model, outcome
