"""The ternary_dict format and its Tunstall dictionaries: the dictionary's definition checked against a
brute-force ranking, its invariants (exactly `count` entries, prefix-closed, the 9 singles, the trie and
the kernel table agreeing with the sequences, deterministic, fast), the greedy coder against a longest-
match reference, bit-exact round trips on odd shapes and skewed statistics with both dictionaries, the
QuantizedWeight round trip, tensors and meta, the refusals, the reference matmul and the compression."""

from __future__ import annotations

import json
import time

import pytest
import torch

from compress.formats import registry, ternary_dict, tunstall
from compress.formats.outliers import Outliers
from compress.formats.quantized import QuantizedWeight

PREFIX = "model.layers.0.mlp.experts.3.up_proj"


def _symbols(rows: int, cols: int, zeros: float, seed: int = 0) -> torch.Tensor:
    """Random weight symbols with a fraction `zeros` of zeros, min and max equally likely otherwise."""
    u = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    return torch.where(u < zeros, 0, torch.where(u < (1 + zeros) / 2, 1, 2)).to(torch.int8)


def _minmax(rows: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([-torch.rand(rows, generator=g) - 0.1, torch.rand(rows, generator=g) + 0.1], 1).half()


def _probabilities(zeros: float) -> tuple[float, ...]:
    w = (zeros, (1 - zeros) / 2, (1 - zeros) / 2)
    return tunstall.pair_probabilities([round(1e6 * w[s % 3] * w[s // 3]) for s in range(9)])


DICTIONARIES = {"static": tunstall.static_dictionary(), "adaptive": tunstall.build_dictionary(_probabilities(0.6))}


def _check_dictionary(d: tunstall.Dictionary, count: int) -> None:
    index = _index(d)
    sequences = list(index)
    assert d.count == count and len(index) == count
    assert all((s,) in index for s in range(9))
    assert all(s[:-1] in index for s in sequences if len(s) > 1), "prefix-closed"
    children = d.children.tolist()
    assert d.children.shape == (count + 1, 9) and d.children.dtype == torch.int32
    for c, s in enumerate(sequences):
        parent = index[s[:-1]] if len(s) > 1 else d.root
        assert children[parent][s[-1]] == c
    assert int((d.children >= 0).sum()) == count  # no other edges
    assert d.kernel_table.shape == (count, 3) and d.kernel_table.dtype == torch.int32
    for c in torch.randperm(count, generator=torch.Generator().manual_seed(0))[:2000].tolist():
        weights = [w for s in sequences[c] for w in (s % 3, s // 3)]
        min_mask, max_mask, length = d.kernel_table[c].tolist()
        assert length == len(weights) == 2 * len(sequences[c])
        assert min_mask == sum(1 << t for t, w in enumerate(weights) if w == 1)
        assert max_mask == sum(1 << t for t, w in enumerate(weights) if w == 2)


@pytest.mark.parametrize("kind", ["static", "adaptive"])
def test_dictionary_invariants(kind):
    _check_dictionary(DICTIONARIES[kind], 65536)
    assert int(DICTIONARIES[kind].kernel_table[:, 2].max()) <= 28


@pytest.mark.parametrize("probabilities", [tunstall.static_pair_probabilities(), _probabilities(0.4),
                                           tunstall.pair_probabilities([5, 0, 0, 7, 1, 0, 0, 0, 3])])
@pytest.mark.parametrize("count, max_pairs", [(9, 3), (300, 4), (819, 3), (2000, 4)])
def test_dictionary_is_the_definition(probabilities, count, max_pairs):
    """Every sequence of 1..max_pairs symbols ranked by (-left-to-right product, the tuple): the singles
    plus the first longer ones, codeword = rank."""
    p = probabilities
    ranked, level = [], [((), 1.0)]
    for _ in range(max_pairs):
        level = [(s + (c,), q * p[c]) for s, q in level for c in range(9)]
        ranked += level
    ranked.sort(key=lambda item: (-item[1], item[0]))
    longer = [s for s, _ in ranked if len(s) > 1][: count - 9]
    expected = [s for s, _ in ranked if len(s) == 1 or s in set(longer)]
    d = tunstall.build_dictionary.__wrapped__(p, count, max_pairs)
    assert [d.sequence(c) for c in range(count)] == expected
    _check_dictionary(d, count)


def test_dictionary_deterministic_fast_and_static_order():
    p = _probabilities(0.77)
    start = time.perf_counter()
    first = tunstall.build_dictionary.__wrapped__(p)
    assert time.perf_counter() - start < 1.0
    again = tunstall.build_dictionary.__wrapped__(p)
    for name in ("sequences", "children", "kernel_table", "weight_symbols"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert tunstall.build_dictionary(p) is tunstall.build_dictionary(p)  # cached
    static = DICTIONARIES["static"]
    # P(zero pair) = 0.885^2 = 0.783: runs of 1..12 zero pairs beat every other single (0.0509)
    assert [static.sequence(c) for c in range(12)] == [(0,) * k for k in range(1, 13)]
    assert set(static.sequence(c) for c in range(12, 16)) == {(1,), (3,), (2,), (6,)}
    with pytest.raises(ValueError, match="count"):
        tunstall.build_dictionary(p, 100, 2)


def test_pair_probabilities():
    p = tunstall.pair_probabilities(torch.tensor([10, 0, 0, 0, 0, 0, 0, 0, 1]))
    assert len(p) == 9 and all(v > 0 for v in p) and abs(sum(p) - 1) < 1e-12 and p[0] == 11 / 20
    with pytest.raises(ValueError, match="9 non-negative"):
        tunstall.pair_probabilities([1, 2, 3])


def _index(d: tunstall.Dictionary) -> dict[tuple[int, ...], int]:
    return {tuple(s for s in row if s >= 0): c for c, row in enumerate(d.sequences.tolist())}


def _longest_match(row: list[int], d: tunstall.Dictionary, index: dict[tuple[int, ...], int]) -> list[int]:
    codes, i = [], 0
    while i < len(row):
        k = max(k for k in range(1, d.max_pairs + 1) if tuple(row[i : i + k]) in index)
        codes.append(index[tuple(row[i : i + k])])
        i += k
    return codes


def _cases() -> list[torch.Tensor]:
    cases = [_symbols(1, 1, 0.5), _symbols(3, 7, 0.5, 1), _symbols(17, 130, 0.9, 2), _symbols(17, 130, 0.4, 3),
             _symbols(9, 61, 0.0, 4), _symbols(40, 257, 0.97, 5)]
    cases[2][3] = 0  # a row of all zeros
    cases[2][5] = 2  # a row of all max
    cases[3][0, :57] = 1  # a long run of min
    return cases


@pytest.mark.parametrize("kind", ["static", "adaptive"])
def test_encode_decode_round_trip(kind):
    d = DICTIONARIES[kind]
    index = _index(d)
    for symbols in _cases():
        pairs = tunstall.to_pairs(symbols)
        codes, offsets = tunstall.encode(pairs, d)
        assert codes.dtype == torch.int16 and offsets.dtype == torch.int32 and offsets.shape == (symbols.shape[0] + 1,)
        back = tunstall.decode(codes, offsets, symbols.shape[1], d)
        assert back.dtype == torch.int8 and torch.equal(back, symbols)
        assert set(back.unique().tolist()) <= {0, 1, 2}
        unsigned = (codes.to(torch.int64) & 0xFFFF).tolist()
        for r in range(min(symbols.shape[0], 6)):
            assert unsigned[offsets[r] : offsets[r + 1]] == _longest_match(pairs[r].tolist(), d, index)
    assert (codes < 0).any() or kind == "static"  # codewords >= 32768 are stored as negative int16


def test_encode_refusals(monkeypatch):
    d = DICTIONARIES["static"]
    with pytest.raises(ValueError, match="0..8"):
        tunstall.encode(torch.tensor([[0, 9]]), d)
    with pytest.raises(ValueError, match="rows, pairs"):
        tunstall.encode(torch.zeros(4, dtype=torch.int64), d)
    monkeypatch.setattr(tunstall, "MAX_INT32", 5)
    with pytest.raises(ValueError, match="overflow"):
        tunstall.encode(tunstall.to_pairs(_symbols(4, 40, 0.3)), d)
    codes, offsets = tunstall.encode(tunstall.to_pairs(_symbols(2, 4, 0.0)), d)
    with pytest.raises(ValueError, match="cover"):
        tunstall.decode(codes, offsets, 6, d)


def _ternary_q(rows: int, cols: int, zeros: float, seed: int = 0) -> QuantizedWeight:
    lut = torch.zeros(rows, 4, dtype=torch.float16)
    lut[:, 1:3] = _minmax(rows, seed + 1)
    return QuantizedWeight((rows, cols), 2, cols, _symbols(rows, cols, zeros, seed).to(torch.int64), None, None, lut=lut)


@pytest.mark.parametrize("kind", ["static", "adaptive"])
@pytest.mark.parametrize("rows, cols, zeros", [(1, 1, 0.5), (17, 130, 0.9), (33, 77, 0.4)])
def test_from_quantized_round_trip(kind, rows, cols, zeros):
    q = _ternary_q(rows, cols, zeros)
    packed = ternary_dict.from_quantized(q, kind)
    expected = q.dequantize()
    unpacked = ternary_dict.unpack(packed)
    assert unpacked.dtype == torch.float32 and torch.equal(unpacked, expected)
    assert torch.equal(unpacked.view(torch.int32), expected.view(torch.int32))  # bit for bit, signs of zeros too
    tensors = ternary_dict.to_tensors(packed, PREFIX)
    assert (f"{PREFIX}.symbol_counts" in tensors) == (kind == "adaptive")
    meta = json.loads(json.dumps(packed.meta))
    assert meta["format"] == "ternary_dict" and meta["dictionary"] == kind and meta["codewords"] == 65536 and meta["max_pairs"] == 14
    again = registry.from_tensors(tensors, PREFIX, meta)
    assert torch.equal(registry.unpack(again), expected)
    assert registry.nbytes(packed) == sum(t.numel() * t.element_size() for t in tensors.values())
    specs = registry.tensor_specs(packed)
    assert registry.from_tensors(registry.empty_tensors(PREFIX, specs), PREFIX, meta).shape == (rows, cols)
    for batch in (1, 5):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch)).to(dtype)
            out = ternary_dict.reference_matmul(x, packed)
            assert out.dtype == dtype and out.shape == (batch, rows)
            reference = x.float() @ expected.T
            tolerance = 1e-5 * (x.float().abs() @ expected.abs().T) + 1e-30
            if dtype == torch.bfloat16:
                tolerance = tolerance + 2**-8 * reference.abs()
            assert ((out.float() - reference).abs() <= tolerance).all()
    x = torch.randn(2, 3, cols)
    assert torch.allclose(ternary_dict.reference_matmul(x, packed), x @ expected.T, rtol=1e-5, atol=1e-5)


def test_reference_matmul_many_rows():
    symbols = _symbols(600, 45, 0.7)  # more rows than one decoded chunk
    packed = ternary_dict.from_ternary(symbols, _minmax(600))
    x = torch.randn(3, 45)
    assert torch.allclose(ternary_dict.reference_matmul(x, packed), x @ ternary_dict.unpack(packed).T, rtol=1e-5, atol=1e-5)


def test_refusals():
    q = _ternary_q(5, 12, 0.5)
    for change, message in [(dict(keep=torch.ones(5, 12, dtype=torch.bool)), "keep mask"), (dict(perm=torch.arange(12)), "permutation"),
                            (dict(outliers=Outliers.from_mask(torch.ones(5, 12), torch.eye(5, 12, dtype=torch.bool))), "outliers"),
                            (dict(bits=3), "2-bit"), (dict(lut=torch.zeros(5, 8, dtype=torch.float16)), "must be"),
                            (dict(lut=torch.ones(5, 4, dtype=torch.float16)), "column 0"),
                            (dict(codes=torch.full((5, 12), 3)), "not in")]:
        with pytest.raises(ValueError, match=message):
            ternary_dict.from_quantized(QuantizedWeight(**(vars(q) | change)))
    with pytest.raises(ValueError, match="minmax"):
        ternary_dict.from_ternary(q.codes, torch.zeros(5, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="dictionary"):
        ternary_dict.from_ternary(q.codes, q.lut[:, 1:3], "dynamic")
    packed = ternary_dict.from_quantized(q)
    tensors, meta = ternary_dict.to_tensors(packed, PREFIX), packed.meta
    for key, bad, message in [("codes", packed.codes.to(torch.int32), "codes: dtype"),
                              ("row_offsets", packed.row_offsets[:-1], "row_offsets: shape"),
                              ("minmax", packed.minmax.float(), "minmax: dtype"),
                              ("symbol_counts", packed.symbol_counts[:8], "symbol_counts: shape"),
                              ("row_offsets", packed.row_offsets.flip(0), "rise from 0")]:
        with pytest.raises(ValueError, match=message):
            ternary_dict.from_tensors(tensors | {f"{PREFIX}.{key}": bad}, PREFIX, meta)
    without = {k: v for k, v in tensors.items() if not k.endswith("symbol_counts")}
    with pytest.raises(ValueError, match="symbol_counts: missing"):
        ternary_dict.from_tensors(without, PREFIX, meta)
    with pytest.raises(ValueError, match="static dictionary stores no counts"):
        ternary_dict.from_tensors(tensors, PREFIX, meta | {"dictionary": "static"})


def test_compression():
    sparse = _symbols(256, 1024, 0.88)
    for kind in ("static", "adaptive"):
        bits = ternary_dict.expert_bits(ternary_dict.from_ternary(sparse, _minmax(256), kind))
        print(f"88% zeros, {kind}: {bits}")
        assert bits["codes"] + bits["row_offsets"] + bits["minmax"] < 1.0
        assert bits["total"] == sum(v for k, v in bits.items() if k != "total")
    dense = _symbols(256, 1024, 0.6, seed=3)
    static, adaptive = (ternary_dict.from_ternary(dense, _minmax(256), kind) for kind in ("static", "adaptive"))
    print(f"60% zeros: code bytes static {static.codes.numel() * 2}, adaptive {adaptive.codes.numel() * 2}")
    assert adaptive.codes.numel() < static.codes.numel()
