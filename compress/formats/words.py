"""The row-aligned word layout every kernel format shares: fields of `bits` bits packed into 32-bit
words, every row starting at a word boundary, no field straddling two words (10 fields of 3 bits a
word, the top 2 bits zero), least significant first; words stored as int32, read as unsigned. And
the checks the formats' readers share (dtype and shape of a stored tensor, exact casts)."""

from __future__ import annotations

import torch


def codes_per_word(bits: int) -> int:
    """Fields of `bits` bits in one 32-bit word, none straddling two words (10 for 3 bits)."""
    return 32 // bits


def words_for(count: int, bits: int) -> int:
    return -(-count // codes_per_word(bits))


def pack_fields(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, count] integers in [0, 2^bits) -> int32 [rows, words_for(count, bits)]: field k of a row
    in word k // per_word at bit (k % per_word) * bits, little-endian; padding bits are zero."""
    per = codes_per_word(bits)
    rows, count = values.shape
    wide = values.to(torch.int64)
    if wide.numel() and (int(wide.min()) < 0 or int(wide.max()) >= 1 << bits):
        raise ValueError(f"values out of range for {bits} bits: [{int(wide.min())}, {int(wide.max())}]")
    words = words_for(count, bits)
    wide = torch.nn.functional.pad(wide, (0, words * per - count)).view(rows, words, per)
    # the shifted fields occupy disjoint bits: their sum is their OR
    packed = (wide << (bits * torch.arange(per, device=wide.device))).sum(-1)
    return to_int32(packed)


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words held in int64 -> the same bits as int32."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def read_fields(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_fields`: int64 [rows, count], field k = (word[k // per] >> (k % per) * bits) & mask."""
    per = codes_per_word(bits)
    k = torch.arange(count, device=words.device)
    word = words[:, k // per].to(torch.int64) & 0xFFFFFFFF
    return (word >> ((k % per) * bits)) & ((1 << bits) - 1)


def check_tensor(tensors: dict[str, torch.Tensor], key: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...] | None) -> torch.Tensor:
    """tensors[key], checked for its dtype and (unless None) its shape."""
    if key not in tensors:
        raise ValueError(f"{key}: missing")
    tensor = tensors[key]
    if tensor.dtype not in dtypes:
        raise ValueError(f"{key}: dtype {tensor.dtype}, expected {' or '.join(map(str, dtypes))}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor


def exact_cast(values: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """`values` in `dtype`, refusing any value the cast would change (stored formats are bit exact)."""
    cast = values.to(dtype)
    if not torch.equal(cast.float(), values.float()):
        wrong = (cast.float() != values.float()).nonzero()[0].tolist()
        raise ValueError(f"{what} at {wrong} is not exactly representable in {dtype} (round it first)")
    return cast


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
