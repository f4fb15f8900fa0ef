"""The packed format of quantized targets: bit-packed codes, per-group statistics, sparse outliers.

One safetensors file (`packed.safetensors`) holds, per target NAME:
  NAME.codes        uint8, the [out, in] codes packed `bits` to a value, little-endian bit order
  NAME.scale        float16 [out, groups]                   (plain statistics), or, quantized (SpQR):
  NAME.scale.codes  uint8, packed codes of the scales; NAME.scale.step / NAME.scale.low float16
  NAME.zero         likewise: packed integer zero points, or quantized zero points
  NAME.lut          float16 [out, 2^bits], instead of scale and zero, for a per-row lookup table
                    (non-uniform quantization, SqueezeLLM): the code is the index into its row's table;
                    a ternary target (QMoE) is one with lut rows (0, min, max, 0), marked "ternary"
  NAME.outliers.row_counts [out], .col_idx int16 [nnz], .values float16 [nnz] (CSR, SpQR): the
                    row pointers stored as their differences, each row's outlier count, in uint8 when
                    every count fits (else int16 read as unsigned, else int32); 8 bits a row instead of
                    32 matters on narrow layers (0.09 bits/param at 256 inputs)
  NAME.keep         uint8, the sparsity mask packed 1 bit a weight, for pruned targets: then
                    NAME.codes holds the codes of the kept weights only
  NAME.perm         int16 [in] (read as unsigned), when the columns were quantized in another order (SpQR act-order):
                    everything above is in that order, and column k of it is column perm[k] of W
and in the header metadata, per target: shape, bits, group size and how each statistic is stored
(groups = ceil(in / group size): where the group size does not divide the input size, the last
group is shorter; nothing else in the file changes).
Dequantized: w = scale * (code - zero) per group (or lut[row, code]), outliers overwrite their positions, pruned
weights are zero, and the columns go back to their places. The
methods compute the evaluated weights with the same expression, so `read_packed` + `dequantize`
rebuild them bit for bit, and bits/param is this file's size * 8 / the target weights' count.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compress.formats.bits import pack_bits, unpack_bits
from compress.formats.outliers import Outliers
from compress.formats.quantized import QuantizedStatistic, QuantizedWeight

PACKED_FILE = "packed.safetensors"
FORMAT_VERSION = 3  # 2: one metadata entry (format + layout), so the bytes are reproducible; 3: outlier row counts
READABLE_VERSIONS = (2, 3)  # 2 stored int32 row pointers (NAME.outliers.row_ptr)


def _statistic_tensors(prefix: str, statistic: torch.Tensor | QuantizedStatistic, plain_bits: int | None) -> tuple[dict, dict]:
    if isinstance(statistic, QuantizedStatistic):
        tensors = {f"{prefix}.codes": pack_bits(statistic.codes, statistic.bits),
                   f"{prefix}.step": statistic.step.to(torch.float16), f"{prefix}.low": statistic.low.to(torch.float16)}
        return tensors, {"kind": "quantized", "bits": statistic.bits, "group_size": statistic.group_size,
                         "shape": list(statistic.codes.shape)}
    if plain_bits is not None and statistic.dtype != torch.float16:  # integer zero points (GPTQ, RTN)
        return {prefix: pack_bits(statistic.round(), plain_bits)}, {"kind": "integer", "bits": plain_bits, "shape": list(statistic.shape)}
    return {prefix: statistic.to(torch.float16)}, {"kind": "float16", "shape": list(statistic.shape)}


def write_packed(path: Path, weights: dict[str, QuantizedWeight]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for name, q in weights.items():
        codes = q.codes if q.keep is None else q.codes[q.keep]
        tensors[f"{name}.codes"] = pack_bits(codes, q.bits)
        if q.lut is not None:
            tensors[f"{name}.lut"] = q.lut.to(torch.float16)
            statistics = {"lut": True}  # a key only LUT targets have: the others' metadata is as before
            if q.ternary:
                statistics["ternary"] = True
        else:
            scale_tensors, scale_info = _statistic_tensors(f"{name}.scale", q.scale, None)
            zero_tensors, zero_info = _statistic_tensors(f"{name}.zero", q.zero, q.bits)
            tensors.update({**scale_tensors, **zero_tensors})
            statistics = {"scale": scale_info, "zero": zero_info}
        if q.keep is not None:
            tensors[f"{name}.keep"] = pack_bits(q.keep.to(torch.int64), 1)
        if q.perm is not None:
            tensors[f"{name}.perm"] = q.perm.to(torch.int32).to(torch.int16)  # wraps above 32767: read as unsigned
        if q.outliers is not None:
            tensors.update({f"{name}.outliers.row_counts": q.outliers.row_counts(), f"{name}.outliers.col_idx": q.outliers.col_idx,
                            f"{name}.outliers.values": q.outliers.values})
        layout[name] = {"shape": list(q.shape), "bits": q.bits, "group_size": q.group_size, **statistics,
                        "outliers": q.outliers is not None, "keep": q.keep is not None, "perm": q.perm is not None}
    tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    # One metadata entry: safetensors writes its metadata map in no fixed order, and a run resumed
    # from stored steps must write the same bytes as an uninterrupted one.
    header = {"format": f"compress-packed/{FORMAT_VERSION}", "layout": layout}
    save_file(tensors, str(path), metadata={"compress_packed": json.dumps(header)})


def _read_statistic(handle, prefix: str, info: dict) -> torch.Tensor | QuantizedStatistic:
    count = info["shape"][0] * info["shape"][1]
    if info["kind"] == "quantized":
        codes = unpack_bits(handle.get_tensor(f"{prefix}.codes"), info["bits"], count).view(*info["shape"])
        return QuantizedStatistic(codes, info["bits"], info["group_size"], handle.get_tensor(f"{prefix}.step"),
                                  handle.get_tensor(f"{prefix}.low"))
    if info["kind"] == "integer":
        return unpack_bits(handle.get_tensor(prefix), info["bits"], count).view(*info["shape"]).float()
    return handle.get_tensor(prefix)


def read_packed(path: Path, names: list[str] | None = None) -> dict[str, QuantizedWeight]:
    """{target: its packed form} of a packed file, of every target or of `names`."""
    weights = {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        version = _format_version(metadata)
        if version not in READABLE_VERSIONS:
            raise ValueError(f"{path}: not a compress packed file of a version this reader knows "
                             f"(format {json.loads(metadata.get('compress_packed', '{}')).get('format')!r}; readable: {READABLE_VERSIONS})")
        header = json.loads(metadata["compress_packed"])
        for name, info in header["layout"].items():
            if names is not None and name not in names:
                continue
            rows, cols = info["shape"]
            # codes in the narrowest type that holds them: int64 would be 8 bytes a weight (52 GB for a 7B model)
            code_dtype = torch.uint8 if info["bits"] <= 8 else torch.int32
            keep = None
            if info["keep"]:
                keep = unpack_bits(handle.get_tensor(f"{name}.keep"), 1, rows * cols, torch.bool).view(rows, cols)
                codes = torch.zeros(rows, cols, dtype=code_dtype)
                codes[keep] = unpack_bits(handle.get_tensor(f"{name}.codes"), info["bits"], int(keep.sum()), code_dtype)
            else:
                codes = unpack_bits(handle.get_tensor(f"{name}.codes"), info["bits"], rows * cols, code_dtype).view(rows, cols)
            perm = handle.get_tensor(f"{name}.perm").to(torch.int64) & 0xFFFF if info["perm"] else None
            outliers = None
            if info["outliers"]:
                col_idx, values = (handle.get_tensor(f"{name}.outliers.{part}") for part in ("col_idx", "values"))
                if version == 2:
                    outliers = Outliers(handle.get_tensor(f"{name}.outliers.row_ptr"), col_idx, values)
                else:
                    outliers = Outliers.from_row_counts(handle.get_tensor(f"{name}.outliers.row_counts"), col_idx, values)
            lut = handle.get_tensor(f"{name}.lut") if info.get("lut") else None
            scale, zero = (None, None) if lut is not None else (
                _read_statistic(handle, f"{name}.scale", info["scale"]), _read_statistic(handle, f"{name}.zero", info["zero"]))
            weights[name] = QuantizedWeight((rows, cols), info["bits"], info["group_size"], codes, scale, zero,
                                            outliers, keep, perm, lut, bool(info.get("ternary")))
    return weights


# safetensors dtype names -> bytes a value (also sizes checkpoint shards, compress/streaming.py); the
# merged file puts the widest first, as save_file does, so every tensor stays aligned to its own width
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                           "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_COPY_CHUNK = 64 << 20  # bytes copied at a time


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(header JSON, offset of the data section) of a safetensors file, read without its tensors."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return json.loads(handle.read(length)), 8 + length


def _format_version(metadata: dict[str, str]) -> int | None:
    """The packed-format version a safetensors metadata map declares (None: not a packed file)."""
    kind, _, version = str(json.loads(metadata.get("compress_packed", "{}")).get("format")).partition("/")
    return int(version) if kind == "compress-packed" and version.isdigit() else None


def packed_format(path: Path) -> int | None:
    """The format version of a packed file (None: not one), from its header alone."""
    return _format_version(_safetensors_header(path)[0].get("__metadata__", {}))


def merge_packed(parts: list[tuple[Path, list[str]]], path: Path) -> None:
    """Write one packed file holding the targets `names` of each (packed file, names) part, copying
    their bytes a bounded chunk at a time: a 7B model's codes are never all in memory (its stage
    writes one packed file per block and merges them here). Targets are laid out in the parts' order;
    a target named twice is an error."""
    if any(Path(source).resolve() == Path(path).resolve() for source, _ in parts):
        raise ValueError(f"{path}: a packed file cannot be merged into itself (write to another path)")
    layout: dict[str, dict] = {}
    entries = []  # (width, tensor key, header entry, source path, source start, source end)
    for source, names in parts:
        header, data_start = _safetensors_header(source)
        if _format_version(header.get("__metadata__", {})) != FORMAT_VERSION:
            raise ValueError(f"{source}: only packed files of format {FORMAT_VERSION} merge (read older ones with read_packed)")
        info = json.loads(header["__metadata__"]["compress_packed"])
        for name in names:
            if name in layout:
                raise ValueError(f"target {name} is in more than one part")
            layout[name] = info["layout"][name]
        wanted = set(names)
        for key, tensor in header.items():
            if key != "__metadata__" and target_of(key, wanted) is not None:
                start, end = tensor["data_offsets"]
                entries.append((SAFETENSORS_DTYPE_BYTES[tensor["dtype"]], key, tensor, source, data_start + start, data_start + end))
    entries.sort(key=lambda entry: (-entry[0], entry[1]))
    header: dict = {"__metadata__": {"compress_packed": json.dumps({"format": f"compress-packed/{FORMAT_VERSION}", "layout": layout})}}
    offset = 0
    for _, key, tensor, _, start, end in entries:
        header[key] = {"dtype": tensor["dtype"], "shape": tensor["shape"], "data_offsets": [offset, offset + end - start]}
        offset += end - start
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for _, _, _, source, start, end in entries:
            with open(source, "rb") as handle:
                handle.seek(start)
                remaining = end - start
                while remaining:
                    chunk = handle.read(min(remaining, _COPY_CHUNK))
                    out.write(chunk)
                    remaining -= len(chunk)


def target_of(key: str, names: set[str]) -> str | None:
    """The target a tensor key (NAME.codes, NAME.scale.step, NAME.outliers.values, ...) belongs to,
    if it is one of `names`: the longest of them that prefixes the key."""
    head = key
    while "." in head:
        head = head.rpartition(".")[0]
        if head in names:
            return head
    return None
