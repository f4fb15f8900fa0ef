"""Bit streams: non-negative integers packed `bits` to a value into bytes, little-endian bit order
(bit b of value k is bit k * bits + b of the stream). Codes, masks (1 bit a weight) and integer
statistics are stored this way."""

from __future__ import annotations

import torch

_CHUNK = 1 << 20  # values packed at a time: bounds the int64 bit streams (a 7B mask is 6.5e9 values)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers < 2^bits, flattened, packed `bits` each into uint8 (little-endian: bit b
    of value k is bit k * bits + b of the stream)."""
    flat = values.reshape(-1)
    pieces = []
    for start in range(0, flat.numel(), _CHUNK):  # a multiple of 8 values: every piece ends on a byte
        chunk = flat[start : start + _CHUNK].to(torch.int64)
        if chunk.min() < 0 or chunk.max() >= 2**bits:
            raise ValueError(f"values out of range for {bits} bits")
        pieces.append(_pack_words(chunk, bits) if bits <= 8 else _pack_stream(chunk, bits))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.uint8, device=flat.device)


def _pack_words(chunk: torch.Tensor, bits: int) -> torch.Tensor:
    """8 values at a time make one integer of 8 * bits <= 64 bits, cut into `bits` bytes: the same
    bytes as the bit stream, at a fraction of its work (a 7B model's codes are 6.5e9 values)."""
    count = chunk.numel()
    groups = torch.nn.functional.pad(chunk, (0, (-count) % 8)).view(-1, 8)
    # the shifted values occupy disjoint bits, so their sum is their OR (also into the sign bit)
    words = (groups << (bits * torch.arange(8, device=chunk.device))).sum(1)
    packed = (words.unsqueeze(1) >> (8 * torch.arange(bits, device=chunk.device))) & 0xFF
    return packed.reshape(-1)[: (count * bits + 7) // 8].to(torch.uint8)


def _pack_stream(chunk: torch.Tensor, bits: int) -> torch.Tensor:
    stream = ((chunk.unsqueeze(1) >> torch.arange(bits, device=chunk.device)) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))
    return (stream.view(-1, 8) << torch.arange(8, device=chunk.device)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` values, as `dtype` (wide enough for `bits`)."""
    out = torch.empty(count, dtype=dtype, device=packed.device)
    step = _CHUNK * bits // 8  # bytes holding _CHUNK values
    for index, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        chunk = packed[index * step : index * step + (n * bits + 7) // 8].to(torch.int64)
        out[start : start + n] = _unpack_words(chunk, bits, n) if bits <= 8 else _unpack_stream(chunk, bits, n)
    return out


def _unpack_words(chunk: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    rows = torch.nn.functional.pad(chunk, (0, (-chunk.numel()) % bits)).view(-1, bits)
    words = (rows << (8 * torch.arange(bits, device=chunk.device))).sum(1)
    values = (words.unsqueeze(1) >> (bits * torch.arange(8, device=chunk.device))) & ((1 << bits) - 1)
    return values.reshape(-1)[:count]


def _unpack_stream(chunk: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    stream = ((chunk.unsqueeze(1) >> torch.arange(8, device=chunk.device)) & 1).reshape(-1)[: count * bits].view(count, bits)
    return (stream << torch.arange(bits, device=chunk.device)).sum(1)
