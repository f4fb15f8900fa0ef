"""The spqr and lut kernel formats: exact round trips (unpack == QuantizedWeight.dequantize bit for bit)
from real method outputs (SpQR with act-order and second-level statistics, GPTQ, SqueezeLLM) and from
hand-built weights with the edge cases (an outlier in the last column, rows without outliers, a row
with every weight pruned, a partial last group, odd shapes), the tensors and meta round trip, the
refusals naming the tensor, and the reference matmul against the unpacked weight."""

from __future__ import annotations

import json

import pytest
import torch

from compress.formats import lut, row_extras, spqr
from compress.formats.outliers import Outliers
from compress.formats.quantized import QuantizedStatistic, QuantizedWeight
from compress.methods.gptq import gptq_quantize
from compress.methods.spqr import SpQRParams, spqr_quantize
from compress.methods.squeezellm import SqueezeLLMParams, squeezellm_quantize

PREFIX = "model.layers.0.mlp.up_proj"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with a few large entries and the X^T X of correlated, unevenly scaled inputs."""
    weight = torch.randn(rows, cols, generator=_gen(seed))
    weight[torch.rand(rows, cols, generator=_gen(seed + 1)) < 0.02] *= 8
    inputs = torch.randn(4 * cols, cols, generator=_gen(seed + 2)) * (torch.rand(cols, generator=_gen(seed + 3)) * 3 + 0.1)
    return weight, inputs.T @ inputs


def _keep(rows: int, cols: int, density: float = 0.6, seed: int = 5) -> torch.Tensor:
    keep = torch.rand(rows, cols, generator=_gen(seed)) < density
    keep[1] = False  # a row with every weight pruned
    return keep


def _set_outliers(q: QuantizedWeight, seed: int = 7) -> QuantizedWeight:
    """Outliers at ~3% of the positions, one in the last column of row 0, none in the last row."""
    rows, cols = q.shape
    mask = torch.rand(rows, cols, generator=_gen(seed)) < 0.03
    mask[0, -1] = True
    mask[-1] = False
    if q.keep is not None:
        mask &= q.keep
    values = torch.randn(rows, cols, generator=_gen(seed + 1)) * 4
    q.outliers = Outliers.from_mask(values, mask)
    return q


def _check(module, packed, q: QuantizedWeight) -> None:
    """Exact round trip, tensors + meta round trip, nbytes as stored, the reference matmul."""
    expected = q.dequantize()
    unpacked = module.unpack(packed)
    assert unpacked.dtype == torch.float32 and torch.equal(unpacked, expected)
    tensors = module.to_tensors(packed, PREFIX)
    assert all(key.startswith(PREFIX + ".") for key in tensors)
    assert all(t.dtype != torch.int64 or key.endswith("offsets") for key, t in tensors.items())
    again = module.from_tensors(tensors, PREFIX, json.loads(json.dumps(packed.meta)))
    assert torch.equal(module.unpack(again), expected)
    assert module.nbytes(packed) == sum(t.numel() * t.element_size() for t in tensors.values())
    for batch in (1, 5):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(batch, q.shape[1], generator=_gen(batch)).to(dtype)
            out = module.reference_matmul(x, packed)
            assert out.dtype == dtype and out.shape == (batch, q.shape[0])
            reference = x.float() @ expected.T
            tolerance = 1e-5 * (x.float().abs() @ expected.abs().T) + 1e-30
            if dtype == torch.bfloat16:
                tolerance = tolerance + 2**-8 * reference.abs()
            assert ((out.float() - reference).abs() <= tolerance).all()
            assert torch.allclose(out.float(), reference, rtol=1e-2, atol=1e-2)


# -- spqr -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols, qq_group", [(7, 45, 7), (33, 130, 11), (64, 128, 16)])
@pytest.mark.parametrize("pruned", [False, True])
def test_spqr_from_the_method(rows, cols, qq_group, pruned):
    weight, hessian = _layer(rows, cols)
    keep = _keep(rows, cols) if pruned else None
    params = SpQRParams(bits=3, group_size=16, qq_groupsize=qq_group, outlier_threshold=0.1)
    _, q = spqr_quantize(weight, hessian, params, keep)
    assert isinstance(q.scale, QuantizedStatistic) and q.perm is not None and q.outliers.count
    packed = spqr.from_quantized(q)
    assert packed.scale_kind == packed.zero_kind == "quantized" and packed.perm.dtype == torch.int16
    assert (packed.bitmask is not None) == pruned
    _check(spqr, packed, q)
    _check(spqr, spqr.from_quantized(_set_outliers(q)), q)  # an outlier in the last column, none in the last row


@pytest.mark.parametrize("scale_bits, zero_bits", [(None, None), (None, 4), (2, None)])
def test_spqr_mixed_statistics(scale_bits, zero_bits):
    weight, hessian = _layer(33, 130, seed=3)
    params = SpQRParams(bits=4, group_size=32, qq_scale_bits=scale_bits, qq_zero_bits=zero_bits, qq_groupsize=3,
                        permutation_order="identity")
    _, q = spqr_quantize(weight, hessian, params)
    packed = spqr.from_quantized(q)
    assert packed.scale_kind == ("float16" if scale_bits is None else "quantized")
    assert packed.zero_kind == ("float16" if zero_bits is None else "quantized")
    assert packed.perm is None
    _check(spqr, packed, q)


@pytest.mark.parametrize("bits, act_order", [(2, True), (4, False), (8, True)])
def test_spqr_from_gptq(bits, act_order):
    weight, hessian = _layer(17, 100, seed=4)
    _, q = gptq_quantize(weight, hessian, bits, 32, act_order=act_order, keep=_keep(17, 100))
    packed = spqr.from_quantized(q)
    assert packed.zero_kind == "integer" and packed.outlier_values is None
    _check(spqr, packed, q)
    _check(spqr, spqr.from_quantized(_set_outliers(q), tile_rows=5), q)


@pytest.mark.parametrize("bits", [5, 6, 7])
def test_spqr_odd_widths_float_zero(bits):
    rows, cols, group = 9, 45, 16
    groups = -(-cols // group)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=_gen(bits))
    scale = (torch.rand(rows, groups, generator=_gen(1)) * 0.1 + 1e-3).half()
    zero = (torch.rand(rows, groups, generator=_gen(2)) * 2**bits).half()
    q = QuantizedWeight((rows, cols), bits, group, codes, scale, zero, perm=torch.randperm(cols, generator=_gen(3)))
    packed = spqr.from_quantized(_set_outliers(q))
    assert packed.zero_kind == "float16"
    _check(spqr, packed, q)


def test_spqr_code_layout():
    """3-bit codes 10 to a word, the top 2 bits zero, each row starting a new word."""
    codes = torch.arange(22).remainder(8).view(2, 11)
    q = QuantizedWeight((2, 11), 3, 11, codes, torch.ones(2, 1).half(), torch.zeros(2, 1))
    packed = spqr.from_quantized(q)
    first = sum(int(c) << (3 * k) for k, c in enumerate(codes[0, :10]))
    assert packed.codes.shape == (2, 2) and int(packed.codes[0, 0]) & 0xFFFFFFFF == first and int(packed.codes[0, 1]) == int(codes[0, 10])


def test_spqr_refusals():
    weight, hessian = _layer(16, 64)
    _, q = spqr_quantize(weight, hessian, SpQRParams(bits=3, group_size=16, outlier_threshold=0.1), _keep(16, 64))
    packed = spqr.from_quantized(q)
    tensors, meta = spqr.to_tensors(packed, "p"), packed.meta
    for key, change in [("p.codes", lambda t: t.to(torch.int64)), ("p.scale_step", lambda t: t.float()), ("p.outlier_cols", lambda t: t.int()),
                        ("p.perm", lambda t: t[:-1]), ("p.zero_codes", lambda t: t[:, :0]), ("p.bitmask", lambda t: t[1:]),
                        ("p.outlier_row_ptr", lambda t: t[:-1]), ("p.code_offsets", lambda t: t.half())]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            spqr.from_tensors({**tensors, key: change(tensors[key])}, "p", meta)
    with pytest.raises(ValueError, match="p.scale_low: missing"):
        spqr.from_tensors({k: v for k, v in tensors.items() if k != "p.scale_low"}, "p", meta)
    with pytest.raises(ValueError, match="lut"):
        spqr.from_quantized(QuantizedWeight((2, 4), 2, 4, torch.zeros(2, 4), None, None, lut=torch.zeros(2, 4).half()))
    with pytest.raises(ValueError, match="format"):
        spqr.from_tensors(tensors, "p", {**meta, "format": "lut"})


# -- lut ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols", [(7, 45), (33, 130)])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("pruned", [False, True])
def test_lut_from_squeezellm(rows, cols, bits, pruned):
    weight, _ = _layer(rows, cols, seed=bits)
    fisher = torch.rand(rows, cols, generator=_gen(9))
    params = SqueezeLLMParams(bits=bits, outlier_fraction=0.02, sensitive_fraction=0.01, kmeans_iterations=10)
    _, q = squeezellm_quantize(weight, fisher, params, _keep(rows, cols) if pruned else None)
    assert q.outliers.count
    packed = lut.from_quantized(q)
    assert packed.lut.shape == (rows, 2**bits) and packed.outlier_cols.dtype == torch.int16
    _check(lut, packed, q)
    q.perm = torch.randperm(cols, generator=_gen(10))  # a permuted table format, as a reorder would give
    _check(lut, lut.from_quantized(_set_outliers(q), tile_rows=3), q)


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_lut_other_widths_without_outliers(bits):
    rows, cols = 5, 33
    table = torch.randn(rows, 2**bits, generator=_gen(bits)).half()
    q = QuantizedWeight((rows, cols), bits, cols, torch.randint(0, 2**bits, (rows, cols), generator=_gen(1)), None, None, lut=table)
    packed = lut.from_quantized(q)
    assert packed.outlier_values is None and packed.meta["outliers"] == 0 and set(lut.to_tensors(packed, "p")) == {"p.codes", "p.lut"}
    _check(lut, packed, q)


def test_lut_refusals_and_dropped_outliers():
    rows, cols = 6, 40
    keep = _keep(rows, cols)
    table = torch.randn(rows, 8, generator=_gen(0)).half()
    q = QuantizedWeight((rows, cols), 3, cols, torch.randint(0, 8, (rows, cols), generator=_gen(1)), None, None, keep=keep, lut=table)
    q.outliers = Outliers.from_mask(torch.ones(rows, cols), torch.ones(rows, cols, dtype=torch.bool))  # pruned ones are dropped
    packed = lut.from_quantized(q)
    assert packed.outlier_values.numel() == int(keep.sum())
    _check(lut, packed, q)
    tensors, meta = lut.to_tensors(packed, "p"), packed.meta
    for key, change in [("p.lut", lambda t: t.float()), ("p.lut", lambda t: t[:, :4]), ("p.outlier_values", lambda t: t.bfloat16()),
                        ("p.codes", lambda t: t[1:])]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            lut.from_tensors({**tensors, key: change(tensors[key])}, "p", meta)
    with pytest.raises(ValueError, match="lookup table"):
        lut.from_quantized(QuantizedWeight((2, 4), 2, 4, torch.zeros(2, 4), torch.ones(2, 1).half(), torch.zeros(2, 1)))
    with pytest.raises(ValueError, match="not exactly representable"):
        lut.from_quantized(QuantizedWeight((2, 4), 2, 4, torch.zeros(2, 4), None, None, lut=torch.full((2, 4), 0.1)))


def test_shared_pieces_are_the_sparse_quant_layout():
    """The masked code stream is sparse_quant's unstructured layout word for word."""
    from compress.formats import sparse_quant

    rows, cols = 9, 70
    keep = _keep(rows, cols)
    codes = torch.randint(0, 8, (rows, cols), generator=_gen(2))
    scale = (torch.rand(rows, 5, generator=_gen(3)) + 0.1).half()
    zero = torch.randint(0, 8, (rows, 5), generator=_gen(4)).float()
    reference = sparse_quant.pack(keep, codes, scale, zero, 3, 16, tile_rows=4)
    packed = spqr.from_quantized(QuantizedWeight((rows, cols), 3, 16, codes, scale, zero, keep=keep), tile_rows=4)
    assert torch.equal(packed.codes, reference.codes) and torch.equal(packed.bitmask, reference.bitmask)
    assert torch.equal(packed.code_offsets, reference.code_offsets) and torch.equal(packed.zero, reference.zero)
    assert row_extras.FIELDS[0] == "codes"
