"""The tensor-core group-quant kernel (compress.kernels.cuda_mma) and its re-packed layout (mma_layout): on CPU, the
layout decoded with the kernel's own index arithmetic equals the format's reference and the layouts it refuses; on a
GPU, launch layouts (row tiles, warps, ring depth) at batch 1 to 16 against the reference, odd shapes, 2/3/4 bits, both
activation dtypes, CUDA-graph capture, and the dispatcher choosing it."""

import pytest
import torch
from conftest import graph_replay, make_group_quant, on_device

from compress.formats import group_quant
from compress.kernels import cuda_mma, dispatch, mma_layout

CUDA = torch.cuda.is_available() and cuda_mma.available()
# every row-tile and warp count, every ring depth, activations ahead and at use (not every combination: compile time)
LAUNCHES = [cuda_mma.Launch(r, w, s, a) for r, w, s, a in ((1, 1, 2, True), (1, 2, 1, False), (1, 8, 4, False), (2, 4, 2, True),
                                                          (2, 16, 3, False), (2, 8, 2, False), (2, 1, 3, True))]
LAUNCHES += [cuda_mma.Launch(r, w, s, True, async_copy=True) for r, w, s in ((1, 1, 2), (2, 4, 4), (2, 16, 3), (1, 8, 3))]
# the codes prefetched into L2 1-8 units ahead (past a warp's last unit: none)
LAUNCHES += [cuda_mma.Launch(2, 4, 2, True, prefetch=4), cuda_mma.Launch(1, 2, 3, False, prefetch=1), cuda_mma.Launch(2, 16, 2, True, prefetch=8)]
# the columns split over 2-5 blocks (as many as a weight's units allow): both pipelines, slices of uneven unit counts
SPLITS = [cuda_mma.Launch.parse(name) for name in ("r2w2s2ak2", "r1w4s2ak3", "r2w1s2ak5", "r2w2s3ack2")]


@pytest.mark.parametrize(("rows", "cols", "bits", "group"), [(37, 1024, 4, 128), (16, 128, 4, 128), (70, 512, 2, 256),
                                                             (33, 384, 2, 128), (1, 256, 4, 256)])
def test_layout_decodes_to_the_weight(rows, cols, bits, group):
    packed = make_group_quant(rows, cols, bits, group, seed=rows + cols)
    view = mma_layout.pack(packed)
    assert view.tiles % mma_layout.TILE_PAD == 0 and view.tiles * 16 >= rows
    assert torch.equal(mma_layout.dense(view), group_quant.unpack(packed))


SCALED = [(37, 1024, 4, 16, "float16"), (20, 256, 2, 32, "integer"), (33, 384, 4, 64, "float16"), (5, 256, 4, 128, "float16"),
          (9, 512, 3, 16, "integer"), (17, 256, 2, 256, "float16")]


@pytest.mark.parametrize(("rows", "cols", "bits", "group", "zero_kind"), SCALED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scaled_layout_decodes_to_the_rounded_statistics(rows, cols, bits, group, zero_kind, dtype):
    """The scaled form, decoded with the kernel's index arithmetic, is scale x code + bias with both statistics rounded
    to the activations' dtype: exactly that, and within that rounding of the format's weight."""
    from compress.formats.words import read_fields
    from compress.kernels import views

    packed = make_group_quant(rows, cols, bits, group, zero_kind, seed=rows)
    view = mma_layout.pack_scaled(views.widen(packed) if bits == 3 else packed, dtype)
    assert view.lane_groups == (2 if group == 16 else 1) and view.stats.shape == (view.tiles, cols // 128, 32, 2 * view.lane_groups)
    scale, bias = mma_layout.scaled_values(packed, dtype)
    codes = read_fields(packed.codes, bits, cols).float()
    expected = group_quant.expand(scale, group, cols) * codes + group_quant.expand(bias, group, cols)
    assert torch.equal(mma_layout.dense(view), expected)
    weight = group_quant.unpack(packed)
    step = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11  # a relative rounding of scale and of bias
    bound = step * (group_quant.expand(packed.scale.float(), group, cols) * (codes + 2**bits)).abs()
    assert ((expected - weight).abs() <= bound).all()


def test_scaled_form_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="scaled tensor-core kernel"):
        mma_layout.pack_scaled(make_group_quant(4, 256, 4, 8), torch.bfloat16)  # groups of 8: smaller than a k-tile's half
    with pytest.raises(ValueError, match="scaled tensor-core kernel"):
        mma_layout.pack_scaled(make_group_quant(4, 256, 8, 32), torch.bfloat16)
    assert not mma_layout.scaled_shape_ok(make_group_quant(4, 200, 4, 8))
    with pytest.raises(ValueError, match="no tensor-core form"):
        cuda_mma.view_of(make_group_quant(4, 256, 4, 32), torch.float32)
    name = cuda_mma.kernel_name(torch.bfloat16, 4, 1, cuda_mma.Launch(async_copy=True, stages=3), "s2")
    with pytest.raises(ValueError, match="register ring only"):
        cuda_mma.entry_source(name)
    assert "gq_mma<4, true, 1, 2, 4, 2, true, false, 1>" in cuda_mma.entry_source(cuda_mma.kernel_name(torch.bfloat16, 4, 1, cuda_mma.Launch(), "s1"))


def _lut_codes(rows: int, cols: int, bits: int, seed: int = 0):
    """A LUT weight's codes view (views.lut_codes) of random codes and fp16 tables, with the codes and tables."""
    from compress.formats.words import pack_fields
    from compress.kernels import views

    g = torch.Generator().manual_seed(seed)
    table = (torch.randn(rows, 2**bits, generator=g) * 0.05).half()
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g)
    return views.lut_codes(pack_fields(codes, bits), table, (rows, cols), bits), codes, table


@pytest.mark.parametrize(("rows", "cols", "bits"), [(37, 256, 3), (9, 128, 2), (64, 512, 3), (1, 384, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_table_layout_decodes_to_the_rounded_table(rows, cols, bits, dtype):
    """The table form, decoded as the kernel's byte permutes read it, is each code's table entry rounded to the dtype."""
    from compress.kernels import mma_lut_layout

    codes_view, codes, table = _lut_codes(rows, cols, bits, seed=rows)
    view = mma_lut_layout.pack_table(codes_view, bits, dtype)
    assert view.table and view.codes.shape == (view.tiles, cols // 128, 2, 32, 4) and view.stats.shape == (view.tiles, 8, 2, 4)
    assert torch.equal(mma_lut_layout.dense(view), table.to(dtype).float().gather(1, codes))
    with pytest.raises(ValueError, match="table kernel"):
        mma_lut_layout.pack_table(_lut_codes(4, 128, 4)[0], 4, dtype)  # 16 entries: the wide form, off by default
    # compact: 3 bits a code, six words a lane a unit; the moved bits fill the nibbles' top bits, which the kernel masks
    compact = mma_lut_layout.pack_table(codes_view, bits, dtype, compact=True)
    assert compact.form == "tc" and compact.codes.shape == (view.tiles, cols // 128, 192)
    assert torch.equal(mma_lut_layout.dense(compact), table.to(dtype).float().gather(1, codes))
    if bits == 3 and rows > 1:
        assert (compact.codes & 0x8888888).any()  # were they left unmasked, a selector would replicate a sign


@pytest.mark.parametrize(("rows", "cols"), [(37, 256), (16, 128), (1, 384)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wide_table_layout_decodes_to_the_rounded_table(rows, cols, dtype, monkeypatch):
    """4-bit codes (16 entries): the wide table form decoded as its two permutes and byte select read it."""
    from compress.kernels import mma_lut_layout

    monkeypatch.setattr(mma_lut_layout, "WIDE_TABLES", True)
    codes_view, codes, table = _lut_codes(rows, cols, 4, seed=rows)
    view = mma_lut_layout.pack_table(codes_view, 4, dtype)
    assert view.form == "tw" and view.stats.shape == (view.tiles, 8, 2, 8)
    assert torch.equal(mma_lut_layout.dense(view), table.to(dtype).float().gather(1, codes))
    with pytest.raises(ValueError, match="compact"):
        mma_lut_layout.pack_table(codes_view, 4, dtype, compact=True)


def _prmt(a: int, b: int, select: int) -> int:
    """PTX prmt.b32's default mode: byte i of the result is byte (nibble i & 7) of b:a, or its sign bit replicated
    when the nibble's bit 3 is set."""
    source, out = (b << 32) | a, 0
    for i in range(4):
        nibble = (select >> (4 * i)) & 0xF
        byte = (source >> (8 * (nibble & 7))) & 0xFF
        out |= ((0xFF if byte & 0x80 else 0) if nibble & 8 else byte) << (8 * i)
    return out


def test_wide_table_mask_selector_marks_each_codes_top_bit():
    """unit_dot_table_wide's mask transcribed: (word & 0x88888888) + 0x11111111 - ((word >> 3) & 0x11111111) makes a
    nibble 8 (top bit set) or 1, and prmt(0x80, 0, that) gives 0xFF or 0 in the code's byte, for every code in every
    nibble of either row half."""
    g = torch.Generator().manual_seed(0)
    for word in [0, 0xFFFFFFFF, 0x89ABCDEF, 0x76543210] + torch.randint(0, 2**32, (50,), generator=g).tolist():
        top = (word >> 3) & 0x11111111
        mask_select = (word & 0x88888888) + 0x11111111 - top
        for half in (0, 1):
            mask = _prmt(0x80, 0, mask_select >> (16 * half))
            for i in range(4):
                code = (word >> (16 * half + 4 * i)) & 0xF
                assert (mask >> (8 * i)) & 0xFF == (0xFF if code >= 8 else 0), (hex(word), half, i)


def test_layout_of_3_bit_codes_through_the_widened_view():
    from compress.kernels import views

    packed = make_group_quant(20, 256, 3, 128, seed=3)
    assert torch.equal(mma_layout.dense(mma_layout.pack(views.widen(packed))), group_quant.unpack(packed))


@pytest.mark.parametrize(("cols", "bits", "group", "zero_kind", "ok"), [
    (4096, 4, 128, "integer", True), (4096, 3, 128, "integer", True), (4096, 2, 256, "integer", True),
    (4096, 8, 128, "integer", False),      # 8-bit codes: not exact as bf16 magic numbers
    (4096, 4, 128, "float16", False),      # float zero points: (code - zero) is not exact in 16 bits
    (4096, 4, 64, "integer", False),       # a group smaller than the 128-column unit
    (4000, 4, 128, "integer", False)])     # a partial unit
def test_layouts_it_takes(cols, bits, group, zero_kind, ok):
    packed = make_group_quant(3, cols, bits, group, zero_kind)
    assert mma_layout.shape_ok(packed) is ok
    if not ok and bits != 3:
        with pytest.raises(ValueError, match="not a layout"):
            mma_layout.pack(packed)


def test_launch_names_and_checks():
    assert [str(launch) for launch in LAUNCHES[:2]] == ["r1w1s2a", "r1w2s1u"]
    assert str(cuda_mma.Launch(2, 4, 4, True, async_copy=True)) == "r2w4s4ac"
    for launch in LAUNCHES:  # every launch the tests run names a kernel whose entry point says the same launch
        source = cuda_mma.entry_source(cuda_mma.kernel_name(torch.bfloat16, 4, 1, launch))
        assert ("gq_mma_async<" in source) is launch.async_copy and f"_{launch}(" in source
    # a stage: 2 row tiles x (2 chunks x 512 bytes + 256 bytes of statistics) a warp, 4 stages, 4 warps
    assert cuda_mma.Launch(2, 4, 4, True, async_copy=True).shared_bytes(4) == 4 * 4 * 2 * (2 * 512 + 256)
    assert cuda_mma.Launch(2, 4, 4).shared_bytes(4) == 0
    for bad in (cuda_mma.Launch(3, 4), cuda_mma.Launch(2, 3), cuda_mma.Launch(2, 4, 5), cuda_mma.Launch(2, 4, 1, True, True),
                cuda_mma.Launch(2, 4, 3, False, True), cuda_mma.Launch(slices=17), cuda_mma.Launch(slices=0)):
        with pytest.raises(ValueError):
            bad.check(tiles=4)
    with pytest.raises(ValueError, match="at most one a 128-column unit"):
        cuda_mma.Launch(slices=3).check(tiles=4, units=2)
    cuda_mma.Launch(warps=8).check(tiles=4, units=2)  # more warps than units: some idle, allowed
    prefetched = cuda_mma.Launch(prefetch=4)
    assert str(prefetched) == "r2w4s2af4" and cuda_mma.Launch.parse("r2w4s2af4k3") == cuda_mma.Launch(slices=3, prefetch=4)
    assert "gq_mma<4, true, 1, 2, 4, 2, true, false, 0, false, 0, 4>" in cuda_mma.entry_source(cuda_mma.kernel_name(torch.bfloat16, 4, 1, prefetched))
    for bad in (cuda_mma.Launch(prefetch=9), cuda_mma.Launch(2, 4, 2, True, True, prefetch=2)):
        with pytest.raises(ValueError, match="prefetch"):
            bad.check(tiles=4)


def test_split_launches_are_one_kernel_whatever_the_slice_count():
    """The slice count is the grid's y size: r2w2s2ak2 and ...k5 run one compiled entry, which takes the slices' sums and
    the arrival counters; names round-trip through parse."""
    for launch in LAUNCHES + SPLITS:
        assert cuda_mma.Launch.parse(str(launch)) == launch
    two, five = cuda_mma.Launch.parse("r2w2s2ak2"), cuda_mma.Launch.parse("r2w2s2ak5")
    assert cuda_mma.kernel_name(torch.bfloat16, 4, 1, two) == cuda_mma.kernel_name(torch.bfloat16, 4, 1, five) == "gqmma_bf16_4_n1_r2w2s2ak"
    source = cuda_mma.entry_source(cuda_mma.kernel_name(torch.float16, 2, 2, five))
    assert "float* work, unsigned* counters)" in source and "gq_mma<2, false, 2, 2, 2, 2, true, true, 0>" in source
    plain = cuda_mma.entry_source(cuda_mma.kernel_name(torch.bfloat16, 4, 1, cuda_mma.Launch()))
    assert "counters" not in plain.split('extern "C"')[1] and "true, false, 0>(" in plain
    with pytest.raises(ValueError, match="not a launch name"):
        cuda_mma.Launch.parse("r2w2s2k2")


def test_cpu_inputs_are_refused():
    packed = make_group_quant(3, 256, 4, 128)
    assert not cuda_mma.supported(torch.randn(1, 256, dtype=torch.bfloat16), packed)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
@pytest.mark.parametrize(("rows", "cols", "bits", "group"), [(37, 1024, 4, 128), (300, 14336, 4, 128), (70, 512, 2, 256),
                                                             (1, 128, 4, 128), (129, 640, 3, 128), (64, 4096, 2, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_equals_reference(rows, cols, bits, group, dtype):
    packed = on_device(make_group_quant(rows, cols, bits, group, seed=rows + cols), "cuda")
    for batch in (1, 3, 8, 9, 16):
        x = torch.randn(batch, cols, device="cuda", dtype=dtype)
        assert cuda_mma.supported(x, packed)
        ref = group_quant.reference_matmul(x.float(), packed).double()
        for launch in LAUNCHES + [split for split in SPLITS if split.slices <= cols // mma_layout.UNIT]:
            got = cuda_mma.matmul(x, packed, launch).double()
            # fp32 sums in another order, one rounding to the activations' dtype
            assert ((got - ref).norm() / ref.norm()).item() < 4e-3, (batch, str(launch))
    assert not cuda_mma.supported(torch.randn(17, cols, device="cuda", dtype=dtype), packed)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
@pytest.mark.parametrize(("rows", "cols", "bits", "group"), [(37, 1024, 4, 128), (129, 640, 3, 128), (64, 4096, 2, 256)])
def test_cuda_exact_form_at_17_to_64_rows(rows, cols, bits, group, monkeypatch):
    # 4 and 8 n-tiles, the activations loaded a k-tile at a time; the dispatcher takes these rows only with DISPATCH_WIDE
    from compress.kernels import dispatch

    packed = on_device(make_group_quant(rows, cols, bits, group, seed=rows), "cuda")
    for batch in (17, 24, 32, 33, 50, 64):
        x = torch.randn(batch, cols, device="cuda", dtype=torch.bfloat16)
        ref = group_quant.reference_matmul(x.float(), packed).double()
        for launch in (None, cuda_mma.Launch(1, 8), cuda_mma.Launch(1, 4, 3, False), cuda_mma.Launch(1, 2, 2, True, slices=2)):
            got = cuda_mma.matmul(x, packed, launch).double()
            assert ((got - ref).norm() / ref.norm()).item() < 4e-3, (batch, str(launch))
    x = torch.randn(40, cols, device="cuda", dtype=torch.bfloat16)
    assert not cuda_mma.supported(x, packed)
    with pytest.raises(ValueError, match="above 16 rows"):
        cuda_mma.matmul(x, packed, cuda_mma.Launch(2, 16))
    monkeypatch.setattr(cuda_mma, "DISPATCH_WIDE", True)
    assert cuda_mma.supported(x, packed) and torch.equal(dispatch.device_matmul(x, packed), cuda_mma.matmul(x, packed))
    assert torch.equal(graph_replay(lambda: dispatch.device_matmul(x, packed)), cuda_mma.matmul(x, packed))
    assert not cuda_mma.supported(torch.randn(65, cols, device="cuda", dtype=torch.bfloat16), packed)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
@pytest.mark.parametrize(("rows", "cols", "bits", "group", "zero_kind"), SCALED + [(300, 4096, 4, 16, "float16")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_scaled_form_equals_its_decoded_weight(rows, cols, bits, group, zero_kind, dtype):
    """The scaled kernel against x @ (its form's decoded weight).T: the same weights (each rounded once to the dtype by
    the kernel's FMA, within the decode's own rounding), fp32 sums."""
    packed = on_device(make_group_quant(rows, cols, bits, group, zero_kind, seed=rows + cols), "cuda")
    view = cuda_mma.view_of(packed, dtype)
    _equals_decoded_weight(view, mma_layout.dense(view), dtype)


def _equals_decoded_weight(view: mma_layout.MmaWeight, weight: torch.Tensor, dtype: torch.dtype) -> None:
    """The kernel on `view` against x @ weight.T (its form decoded on CPU) at batches 1-16 and several launches, splits
    included: the same weights, fp32 sums in another order, one rounding to the dtype."""
    weight = weight.double()
    generator = torch.Generator(device="cuda").manual_seed(view.shape[0])
    for batch in (1, 3, 9, 16):
        x = torch.randn(batch, view.shape[1], device="cuda", dtype=dtype, generator=generator)
        ref = x.double() @ weight.T
        # against the sums of magnitudes: a few rows' sums can cancel to near zero, where one rounding of the output
        # is a large part of it (a wrong decode is off by sqrt(in) / in of this, above 6% at 256 columns)
        scale = (x.double().abs() @ weight.abs().T).norm()
        for launch in [cuda_mma.Launch(), cuda_mma.Launch(1, 2, 3, False), cuda_mma.Launch(2, 8, 2, True), cuda_mma.Launch(prefetch=3)] + SPLITS[:3]:
            if launch.slices > view.shape[1] // mma_layout.UNIT:
                continue
            got = cuda_mma.matmul(x, view, launch).double()
            assert ((got - ref).norm() / scale).item() < 2e-3, (batch, str(launch), ((got - ref).norm() / ref.norm()).item())


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
@pytest.mark.parametrize(("rows", "cols", "bits"), [(37, 256, 3), (9, 128, 2), (300, 4096, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compact", [False, True])
def test_cuda_table_form_equals_its_decoded_weight(rows, cols, bits, dtype, compact):
    from compress.kernels import mma_lut_layout

    codes_view = on_device(_lut_codes(rows, cols, bits, seed=cols)[0], "cuda")
    view = mma_lut_layout.pack_table(codes_view, bits, dtype, compact) if compact else cuda_mma.table_view_of(codes_view, bits, dtype)
    _equals_decoded_weight(view, mma_lut_layout.dense(view), dtype)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
@pytest.mark.parametrize(("rows", "cols"), [(37, 256), (300, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_wide_table_form_equals_its_decoded_weight(rows, cols, dtype, monkeypatch):
    from compress.kernels import mma_lut_layout

    monkeypatch.setattr(mma_lut_layout, "WIDE_TABLES", True)
    codes_view = on_device(_lut_codes(rows, cols, 4, seed=cols)[0], "cuda")
    view = mma_lut_layout.pack_table(codes_view, 4, dtype)
    _equals_decoded_weight(view, mma_lut_layout.dense(view), dtype)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
def test_strided_and_3d_inputs():
    packed = on_device(make_group_quant(48, 512, 4, 128, seed=5), "cuda")
    x = torch.randn(2, 3, 1024, device="cuda", dtype=torch.bfloat16)[..., ::2]  # not contiguous
    ref = group_quant.reference_matmul(x.float().reshape(6, 512), packed).reshape(2, 3, 48)
    got = cuda_mma.matmul(x, packed)
    assert got.shape == (2, 3, 48) and ((got.double() - ref).norm() / ref.norm()).item() < 4e-3


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
def test_cuda_graph_capture_and_dispatch():
    packed = on_device(make_group_quant(256, 4096, 4, 128, seed=1), "cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    eager = dispatch.device_matmul(x, packed)
    assert torch.equal(eager, cuda_mma.matmul(x, packed))  # batch 1 bf16 int4 g128: the tensor-core kernel
    assert torch.equal(graph_replay(lambda: dispatch.device_matmul(x, packed)), eager)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
def test_split_launch_replays_in_a_cuda_graph():
    """A split launch leaves its arrival counters zero: replayed (and run eagerly after), it gives the same bits every
    time, equal to the reference within fp32 summation order."""
    packed = on_device(make_group_quant(100, 2048, 4, 128, seed=2), "cuda")
    x = torch.randn(5, 2048, device="cuda", dtype=torch.bfloat16)
    launch = cuda_mma.Launch.parse("r2w2s2ak3")
    eager = cuda_mma.matmul(x, packed, launch)
    assert torch.equal(graph_replay(lambda: cuda_mma.matmul(x, packed, launch)), eager)
    assert torch.equal(cuda_mma.matmul(x, packed, launch), eager)
    view = cuda_mma.view_of(packed)
    assert not cuda_mma.counters(view.codes, view.tiles).any()
    ref = group_quant.reference_matmul(x.float(), packed).double()
    assert ((eager.double() - ref).norm() / ref.norm()).item() < 4e-3


def test_other_forms_need_cuda_and_choices_are_checked(monkeypatch):
    """The scaled and table forms never take CPU inputs; a COMPRESS_GPU_KERNEL that is not a choice says which are."""
    packed = make_group_quant(4, 256, 4, 32)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    assert dispatch.kernel_for(x, packed) == "cpu" and not cuda_mma.form_supported(x, packed)
    monkeypatch.setenv(dispatch.ENV, "nonsense")
    with pytest.raises(ValueError, match="auto"):
        dispatch.kernel_for(x.to("meta"), packed)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
def test_modules_dispatch_to_the_scaled_and_table_forms_in_a_graph():
    """A g32 group-quant weight, a SpQR weight (its grid) and a 3-bit LUT weight (its tables) run the scaled and table
    forms, inside a CUDA graph, equal to their references within bf16 rounding."""
    from test_extras_view import make, make_lut

    from compress.formats import lut, spqr

    weights = [(make_group_quant(200, 1024, 4, 32, "float16", seed=3), group_quant.reference_matmul),
               (make(200, 1024, 3, 16, True, True, True), spqr.reference_matmul), (make_lut(200, 1024, 3), lut.reference_matmul)]
    x = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)
    assert cuda_mma.form_supported(x, on_device(weights[0][0], "cuda"))
    for packed, reference in weights:
        packed = on_device(packed, "cuda")
        eager = dispatch.device_matmul(x, packed)
        ref = reference(x.float(), packed).double()
        assert ((eager.double() - ref).norm() / ref.norm()).item() < 1e-2, type(packed).__name__
        assert torch.equal(graph_replay(lambda packed=packed: dispatch.device_matmul(x, packed)), eager)
