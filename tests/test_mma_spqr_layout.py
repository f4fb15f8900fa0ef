"""The compact tensor-core form of SpQR weights (compress.kernels.mma_spqr_layout, the kernel's form "q"): on CPU, the
form decoded with the kernel's arithmetic (the fourth k-tile's codes from the spare bits, the statistics from their
second level in fp32) equals the format's weights rounded as the kernel rounds them, bit for bit; its bytes; what it
refuses. On a GPU, the kernel on it against that decoded weight, batches 1-16, several launches, both dtypes."""

import pytest
import torch
from conftest import on_device
from test_extras_view import make

from compress.formats import spqr
from compress.formats.words import read_fields
from compress.kernels import cuda_mma, mma_spqr_layout

CUDA = torch.cuda.is_available() and cuda_mma.available()


def _plain(rows: int, cols: int, seed: int = 0) -> spqr.SpQRWeight:
    """SpQR's layout without outliers or permutation: its weights are scale x (code - zero) alone."""
    return make(rows, cols, 3, 16, True, False, False, seed=seed)


def _expected(packed: spqr.SpQRWeight, dtype: torch.dtype) -> torch.Tensor:
    """round(scale x code + bias) with scale and zero point low + step x code in one fp32 rounding, bias = -scale x
    zero in fp32, both rounded to `dtype` (the scaled form's arithmetic), from the format's own tensors."""
    rows, cols = packed.shape

    def values(codes, step, low, bits):
        code = read_fields(codes, bits, packed.groups).double()
        return (low.double().repeat_interleave(16, 0) + step.double().repeat_interleave(16, 0) * code).float()

    scale = values(packed.scale_codes, packed.scale_step, packed.scale_low, packed.scale_bits)
    zero = values(packed.zero_codes, packed.zero_step, packed.zero_low, packed.zero_bits)
    bias = -scale * zero
    code = read_fields(packed.codes, 3, cols).double()
    s, b = (v.to(dtype).double().repeat_interleave(16, 1) for v in (scale, bias))
    return (s * code + b).to(dtype).float()


@pytest.mark.parametrize(("rows", "cols"), [(16, 128), (48, 256), (80, 384), (64, 1024)])  # 48, 80: a padded tile
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_form_decodes_to_the_weights_the_kernel_should_multiply(rows, cols, dtype):
    packed = _plain(rows, cols, seed=rows + cols)
    view = mma_spqr_layout.pack(packed)
    assert view.form == "q" and view.dtype is None and view.codes.shape == (view.tiles, cols // 128, 224)
    decoded = mma_spqr_layout.dense(view, dtype)
    assert torch.equal(decoded, _expected(packed, dtype))
    # and the rounding is the only difference from the format's own weights
    reference = spqr.unpack(packed)
    assert ((decoded - reference).abs() <= 2 ** -7 * reference.abs().amax(dim=1, keepdim=True) + 1e-6).all()


def test_every_code_reaches_its_weight():
    """Codes in every k-tile of a run (the fourth's moved into the spare bits) and every statistic code: a form with
    one code changed decodes to a weight changed at exactly that place."""
    packed = _plain(32, 256, seed=3)
    base = mma_spqr_layout.dense(mma_spqr_layout.pack(packed), torch.float16)
    codes = read_fields(packed.codes, 3, 256)
    for row, col in ((0, 0), (5, 12), (9, 63), (20, 112), (31, 255), (17, 128 + 60)):
        changed = codes.clone()
        changed[row, col] = (changed[row, col] + 3) % 8
        from compress.formats.words import pack_fields

        other = spqr.SpQRWeight(**{**packed.__dict__, "codes": pack_fields(changed, 3)})
        diff = (mma_spqr_layout.dense(mma_spqr_layout.pack(other), torch.float16) != base).nonzero().tolist()
        assert diff == [[row, col]] or (diff == [] and base[row, col] == 0), (row, col, diff)


def test_form_bytes():
    packed = _plain(64, 1024)
    view = mma_spqr_layout.pack(packed)
    weights = 64 * 1024
    assert view.codes.numel() * 4 / weights == 7 / 16  # 3 bits a weight and 6 bits of statistic codes a group of 16
    assert view.stats.numel() * 4 / weights == 1 / 32  # 4 float16 a 16 x 16 tile


def test_layouts_it_refuses():
    assert mma_spqr_layout.shape_ok(_plain(16, 128))
    refused = [make(16, 128, 4, 16, True, False, False), make(16, 128, 3, 32, True, False, False), make(16, 128, 3, 16, False, False, False),
               make(16, 100, 3, 16, True, False, False), make(16, 128, 3, 16, True, False, False, keep=True)]
    for packed in refused:
        assert not mma_spqr_layout.shape_ok(packed)
        with pytest.raises(ValueError, match="compact"):
            mma_spqr_layout.pack(packed)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
@pytest.mark.parametrize(("rows", "cols"), [(48, 384), (304, 4096), (64, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_compact_form_equals_its_decoded_weight(rows, cols, dtype):
    from test_cuda_mma import _equals_decoded_weight

    packed = on_device(_plain(rows, cols, seed=cols), "cuda")
    view = mma_spqr_layout.pack(packed)
    view.dtype = dtype  # _equals_decoded_weight reads the activations' dtype off the form
    _equals_decoded_weight(view, mma_spqr_layout.dense(view, dtype), dtype)
