"""SpQR and LUT layers in one tensor-core launch (compress.kernels.cuda_mma_extras): on CPU, the permutation and
outlier layout (mma_extras_layout) read as the kernel reads it gives the format's reference, the warps' walk over a
block's outlier slices (transcribed from the kernel) visits every slice once, and the kernel names and entry points;
on a GPU, the one launch against the three it replaces and the reference, at batch 1-16, odd
shapes, several launches, both dtypes, determinism, CUDA-graph capture and the dispatcher."""

import pytest
import torch
from conftest import graph_replay, on_device
from test_extras_view import make, make_lut

from compress.formats import lut, spqr
from compress.kernels import (
    cuda_mma,
    cuda_mma_extras,
    dispatch,
    extras_view,
    mma_extras_layout,
    mma_layout,
    mma_lut_layout,
    mma_spqr_layout,
)

CUDA = torch.cuda.is_available() and cuda_mma.available()
BF16 = torch.bfloat16


def _weight(kind: str, rows: int, cols: int, outliers: bool = True, perm: bool = True, seed: int = 0):
    """kind: "spqr" (3-bit, groups of 16, quantized statistics), "lut" (3-bit codes) or "lut4" (4-bit: the wide table)."""
    if kind == "spqr":
        return make(rows, cols, 3, 16, True, outliers, perm, seed=seed), None, spqr.reference_matmul
    bits = 4 if kind == "lut4" else 3
    return make_lut(rows, cols, bits, outliers, perm, seed=seed + 20), bits, lut.reference_matmul


def _decoded_form(packed, dtype):
    """The grid's form one launch runs (compact SpQR, scaled, table) and its weight decoded with the kernel's
    arithmetic."""
    form = cuda_mma_extras.form_of(packed, dtype)
    if form.form == "q":
        return form, mma_spqr_layout.dense(form, dtype)
    return form, (mma_lut_layout.dense if form.table else mma_layout.dense)(form)


@pytest.mark.parametrize("kind", ["spqr", "lut", "lut4"])
@pytest.mark.parametrize(("rows", "cols", "outliers", "perm"), [(37, 256, True, True), (16, 128, True, False), (48, 384, False, True),
                                                               (33, 128, False, False), (64, 256, True, True)])
def test_layout_read_as_the_kernel_reads_it_gives_the_reference(kind, rows, cols, outliers, perm, monkeypatch):
    """The form's decoded grid (SpQR: compact at rows of whole 16-row grids, else scaled) on the activations gathered
    through the layout's permutation, plus the slices' sums, equals the format's reference within the grid's bf16
    rounding and the corrections' float16 rounding."""
    monkeypatch.setattr(mma_lut_layout, "WIDE_TABLES", True)
    packed, bits, reference = _weight(kind, rows, cols, outliers, perm, seed=rows)
    view = extras_view.cached(packed)
    form, weight = _decoded_form(packed, BF16)
    assert form.form == {"lut": "tc", "lut4": "tw"}.get(kind, "q" if rows % 16 == 0 else "s2")
    extras = mma_extras_layout.build(view, form.tiles)
    assert (extras.perm is not None) == perm and extras.outliers == outliers
    for batch in (1, 5):
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch)).to(BF16).float()
        got = mma_extras_layout.stored_activations(x, extras) @ weight.T + mma_extras_layout.corrections(x, extras, rows)
        ref = reference(x, packed)
        scale = (x.abs() @ spqr.unpack(packed).abs().T if kind == "spqr" else x.abs() @ lut.unpack(packed).abs().T).norm()
        assert ((got - ref).norm() / scale).item() < 4e-3, (batch, ((got - ref).norm() / ref.norm()).item())
        # gathered before the launch: no permutation in the layout, the outliers on stored columns; the same sums
        gathered = mma_extras_layout.build(view, form.tiles, gathered=True)
        assert gathered.perm is None and torch.equal(gathered.tile_ptr, extras.tile_ptr) if outliers else gathered.slices is None
        stored = mma_extras_layout.stored_activations(x, extras)
        assert torch.equal(mma_extras_layout.corrections(stored, gathered, rows), mma_extras_layout.corrections(x, extras, rows))


def test_slices_hold_each_tiles_outliers_in_row_order():
    packed = make(70, 256, 3, 16, True, True, True, seed=5)
    view = extras_view.build(packed)
    extras = mma_extras_layout.build(view, mma_layout.padded_tiles(70))
    counts = torch.zeros(mma_layout.padded_tiles(70) * 16, dtype=torch.int64)
    counts[:70] = (view.row_ptr[1:] - view.row_ptr[:-1]).long()
    depth = (extras.tile_ptr[1:] - extras.tile_ptr[:-1]).long()
    assert torch.equal(depth, counts.view(-1, 16).amax(1)) and extras.tile_ptr[0] == 0
    entries = (extras.slices.long() & 0xFFFFFFFF).view(-1, 16)
    assert int((entries != 0).sum()) == view.delta.numel() - int((view.delta.half() == 0).sum())  # padding is 0, nothing else is
    perm = view.perm.long()
    for row in (0, 17, 69):
        tile, r = divmod(row, 16)
        mine = entries[extras.tile_ptr[tile]: extras.tile_ptr[tile + 1], r]
        start, end = view.row_ptr[row], view.row_ptr[row + 1]
        assert torch.equal(mine[: end - start] & 0xFFFF, perm[view.cols[start:end].long()])  # layer columns, in the format's order
        assert torch.equal((mine[: end - start] >> 16).to(torch.int32).to(torch.int16), view.delta[start:end].half().view(torch.int16))
        assert not mine[end - start:].any()


def test_layouts_it_refuses():
    packed = make(20, 128, 3, 16, True, True, False)
    view = extras_view.build(packed)
    huge = extras_view.ExtrasView(view.dense, view.perm, view.rows, view.row_ptr, view.cols, view.delta * 1e6)
    assert mma_extras_layout.shape_ok(view) and not mma_extras_layout.shape_ok(huge)
    with pytest.raises(ValueError, match="float16"):
        mma_extras_layout.build(huge, mma_layout.padded_tiles(20))
    with pytest.raises(ValueError, match="tiles"):
        mma_extras_layout.build(view, 1)
    extras = mma_extras_layout.build(view, mma_layout.padded_tiles(20))
    assert [extras.tag(b) for b in (1, 3, 8, 9, 16)] == ["o1", "o4", "o8", "o16", "o16"]
    with pytest.raises(ValueError, match="1 to 16"):
        extras.tag(17)
    assert mma_extras_layout.MmaExtras(torch.zeros(128, dtype=torch.int16), None, None).tag(16) == "p"
    assert not cuda_mma_extras.supported(torch.randn(1, 128, dtype=BF16), packed)  # CPU activations


class _LaneWalk:
    """One lane's OutlierWalk (cuda_mma_extras_source.py) transcribed: which slices it adds, and to which row tile."""

    def __init__(self, tile_ptr: list[int], tile0: int, row_tiles: int, warp: int, warps: int, units: int, half: int, beside: bool,
                 per_max: int = 2):
        s0, self.bound = tile_ptr[tile0], [tile_ptr[tile0 + r + 1] for r in range(row_tiles)]
        pairs = (self.bound[-1] - s0 + 1) >> 1
        self.count = (pairs - warp + warps - 1) // warps if pairs > warp else 0
        self.per = min(per_max, (self.count + units - 1) // units) if beside and units > 0 else 0
        self.first, self.stride, self.k, self.per_max, self.added = s0 + 2 * warp + half, 2 * warps, 0, per_max, []
        self.fetch()

    def fetch(self) -> None:
        slices = [self.first + self.stride * (self.k + i) for i in range(self.per_max)]
        self.next = [s if i < self.per and self.k + i < self.count and s < self.bound[-1] else None for i, s in enumerate(slices)]

    def take(self) -> None:  # take, then add: the slices and the row tile each is added to
        self.added += [(s, sum(s >= b for b in self.bound[:-1])) for s in self.next if s is not None]
        self.k += self.per

    def run(self, units: int, beside: bool) -> list[tuple[int, int]]:
        for _ in range(units if beside else 0):  # a unit step: issue (take, fetch), the unit's mma, add (after them: none)
            self.take()
            self.fetch()
        self.take()  # finish
        self.per = self.per_max
        while self.k < self.count:
            self.fetch()
            self.take()
        return self.added


def _walk(tile_ptr: list[int], tile0: int, row_tiles: int, units: list[int], beside: bool) -> list[tuple[int, int]]:
    """Every lane's added slices for a block whose warps have `units` units each (`beside`: walked beside the units, as
    up to 8 activation rows are, else after them)."""
    return [added for warp, count in enumerate(units) for half in (0, 1)
            for added in _LaneWalk(tile_ptr, tile0, row_tiles, warp, len(units), count, half, beside).run(count, beside)]


@pytest.mark.parametrize(("depths", "row_tiles"), [([3, 0], 2), ([0, 0], 2), ([7, 5], 2), ([1], 1), ([40], 1), ([13, 29], 2)])
@pytest.mark.parametrize("units", [[2, 2, 2, 2], [1], [0, 3], [5, 4, 4, 4, 4, 4, 4, 4], [0] * 16, [1] * 16])
@pytest.mark.parametrize("beside", [True, False])
def test_the_walk_adds_every_slice_of_the_block_once_to_its_tile(depths, row_tiles, units, beside):
    tile_ptr = [11]  # the block's slices start anywhere
    for depth in depths:
        tile_ptr.append(tile_ptr[-1] + depth)
    seen = _walk(tile_ptr, 0, row_tiles, units, beside)
    assert sorted(s for s, _ in seen) == list(range(tile_ptr[0], tile_ptr[-1]))
    assert all(tile_ptr[t] <= s < tile_ptr[t + 1] for s, t in seen)


@pytest.mark.parametrize(("row_tiles", "n_tiles", "rows"), [(1, 1, 1), (2, 1, 8), (2, 2, 16), (1, 2, 12)])
def test_the_deposit_puts_each_rows_sums_where_the_block_stores_them(row_tiles, n_tiles, rows):
    """OutlierWalk.deposit transcribed: the two half warps' sums of a row added, lanes 0-15 write row (lane) of each
    tile through the warp's shared sums, each lane adds the ones its accumulators hold; the block's store
    (sum_position: lane l's accumulator i of n-tile nb, row tile r is row (l >> 2) + 8 (i >> 1), activation row
    nb * 8 + 2 (l & 3) + (i & 1)) then finds every (row, activation row)'s sum in place."""
    ob = 1 << (rows - 1).bit_length()
    g = torch.Generator().manual_seed(rows)
    halves = torch.randn(2, row_tiles, 16, ob, generator=g)  # [half, tile, row, activation row]: each lane's sums
    part = torch.full((row_tiles * n_tiles * 128,), float("nan"))
    for lane in range(16):  # after the xor-16 shuffle, lanes 0-15 hold both halves' sum of row `lane`
        for r in range(row_tiles):
            for b in range(ob):
                part[(r * 16 + lane) * ob + b] = halves[0, r, lane, b] + halves[1, r, lane, b]
    acc = torch.zeros(32, row_tiles, n_tiles, 4)
    for lane in range(32):
        for r in range(row_tiles):
            for nb in range(n_tiles):
                for i in range(4):
                    row, b = (lane >> 2) + 8 * (i >> 1), nb * 8 + 2 * (lane & 3) + (i & 1)
                    if b < ob:
                        acc[lane, r, nb, i] += part[(r * 16 + row) * ob + b]
    for e in range(row_tiles * n_tiles * 128):  # the block's store: sum_position
        i, lane, nb, r = e & 3, (e >> 2) & 31, (e >> 7) % n_tiles, (e >> 7) // n_tiles
        row, b = r * 16 + (lane >> 2) + 8 * (i >> 1), nb * 8 + 2 * (lane & 3) + (i & 1)
        expected = halves[0, r, row % 16, b] + halves[1, r, row % 16, b] if b < ob else 0.0
        assert acc[lane, r, nb, i] == expected, (e, row, b)


def test_the_batch_1_gather_gives_every_lane_its_32_activations():
    """load_x_perm at batch 1 transcribed: lane (g, t) gathers the activations of stored columns t * 32 + 4g .. + 3 of
    the unit (two words), shuffle k takes word k & 1 of lane (k >> 1) * 4 + t; every lane ends with its 32 stored
    columns' activations in load_x's order (word k: columns 2k, 2k + 1)."""
    cols = 384
    perm, x = torch.randperm(cols, generator=torch.Generator().manual_seed(1)), torch.randn(cols)
    for u in range(cols // 128):
        mine = {}
        for lane in range(32):
            g, t = lane // 4, lane % 4
            index = perm[u * 128 + t * 32 + 4 * g: u * 128 + t * 32 + 4 * g + 4]
            mine[lane] = [x[index[:2]], x[index[2:]]]
        for lane in range(32):
            t = lane % 4
            words = [mine[(k >> 1) * 4 + t][k & 1] for k in range(16)]
            assert torch.equal(torch.cat(words), x[perm[u * 128 + t * 32: u * 128 + t * 32 + 32]])


def test_transposed_activations_hold_a_columns_rows_in_one_run():
    x = torch.randn(11, 96, dtype=BF16)
    xt = mma_extras_layout.transposed(x)
    assert xt.shape == (96, 16) and xt.is_contiguous() and xt.dtype == BF16
    assert torch.equal(xt[:, :11], x.T) and not xt[:, 11:].any()  # rows past the batch zero: the walk reads all 16
    full = torch.randn(16, 96, dtype=BF16)
    assert torch.equal(mma_extras_layout.transposed(full), full.T) and mma_extras_layout.transposed(full).is_contiguous()
    for wrong in (torch.randn(8, 96), torch.randn(17, 96), torch.randn(2, 12, 96)):  # the walk reads it at 9-16 rows only
        with pytest.raises(ValueError, match="9-16 rows"):
            mma_extras_layout.transposed(wrong)


def test_kernel_names_and_entry_points():
    launch = cuda_mma.Launch()
    name = cuda_mma.kernel_name(BF16, 4, 1, launch, "s2", "po1")
    assert name == "gqmmas2po1_bf16_4_n1_r2w4s2a"

    def entry(name: str) -> str:
        return cuda_mma.entry_source(name)[len(cuda_mma.SOURCE):]

    assert "gq_mma_extras<4, true, 1, 2, 4, 2, true, 2, true, 1>" in entry(name) and "const int* tile_ptr" in entry(name)
    assert "gq_mma_extras<4, false, 2, 2, 4, 2, true, 3, true, 0>" in entry("gqmmatp_f16_4_n2_r2w4s2a")
    assert "tile_ptr" not in entry(cuda_mma.kernel_name(BF16, 4, 1, launch, "s2"))
    transposed = entry("gqmmaqo16x_bf16_3_n2_r2w8s2a")  # the walk's activations from a transposed copy (XT after PF)
    assert "gq_mma_extras<3, true, 2, 2, 8, 2, true, 4, false, 16, 0, true>" in transposed and "const unsigned short* xt" in transposed
    assert "const unsigned short* xt" not in entry("gqmmaqo16_bf16_3_n2_r2w8s2a")
    with pytest.raises(ValueError, match="register ring"):
        cuda_mma.entry_source("gqmmas1o1_bf16_4_n1_r2w4s2ak")


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
@pytest.mark.parametrize("kind", ["spqr", "lut", "lut4"])
@pytest.mark.parametrize(("rows", "cols", "outliers", "perm"), [(37, 256, True, True), (208, 1024, True, True), (304, 4096, True, False),
                                                               (64, 512, False, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_one_launch_equals_the_three_and_the_reference(kind, rows, cols, outliers, perm, dtype, monkeypatch):
    """SpQR at 37 rows on the scaled form, at whole 16-row grids on the compact one; 3-bit LUT on the compact table form,
    4-bit on the wide one."""
    monkeypatch.setattr(mma_lut_layout, "WIDE_TABLES", True)
    packed, bits, reference = _weight(kind, rows, cols, outliers, perm, seed=cols)
    packed = on_device(packed, "cuda")
    view = extras_view.cached(packed)
    form, weight = _decoded_form(packed, dtype)
    extras = cuda_mma_extras.extras_of(view, form.tiles)
    generator = torch.Generator(device="cuda").manual_seed(rows)
    for batch in (1, 2, 5, 8, 12, 16):
        x = torch.randn(batch, cols, device="cuda", dtype=dtype, generator=generator)
        ref = (mma_extras_layout.stored_activations(x.double(), extras) @ weight.double().T
               + mma_extras_layout.corrections(x.float(), extras, rows).double())
        scale = (x.double().abs() @ weight.double().abs().T).norm()
        for launch in (None, cuda_mma.Launch(1, 1, 2, True), cuda_mma.Launch(2, 16, 2, True), cuda_mma.Launch(2, 2, 3, False)):
            got = cuda_mma.matmul(x, form, launch, extras)
            assert ((got.double() - ref).norm() / scale).item() < 2e-3, (batch, str(launch))
            assert torch.equal(got, cuda_mma.matmul(x, form, launch, extras))  # deterministic
        one = cuda_mma_extras.matmul(x, packed).double()
        three = extras_view.matmul(x, view, lambda x2, grid: cuda_mma.form_matmul(x2, grid, bits))  # corrections in plain torch
        assert ((one - three.double()).norm() / scale).item() < 4e-3
        for in_kernel in (True, False):  # the permutation in the kernel, or a gather launch before it: the same sums
            assert torch.equal(cuda_mma_extras.matmul(x, packed, gather_in_kernel=in_kernel).double(), one)
        if batch > 8 and outliers:  # the walk's activations from a transposed copy: the same values in the same order
            monkeypatch.setattr(cuda_mma_extras, "TRANSPOSED_WALK", True)
            assert torch.equal(cuda_mma_extras.matmul(x, packed, gather_in_kernel=False).double(), one)
            monkeypatch.setattr(cuda_mma_extras, "TRANSPOSED_WALK", False)
        assert ((one - reference(x.float(), packed).double()).norm() / scale).item() < 4e-3


@pytest.mark.skipif(not CUDA, reason="needs CUDA (compute capability 8.0+) and NVRTC")
def test_cuda_dispatch_and_graph_capture(monkeypatch):
    assert cuda_mma_extras.DISPATCH and cuda_mma_extras.DISPATCH_MAX_ROWS == 16 and cuda_mma_extras.GATHER_IN_KERNEL_MAX_ROWS == 1
    for kind in ("spqr", "lut"):
        packed, bits, reference = _weight(kind, 208, 1024)
        packed = on_device(packed, "cuda")
        x = torch.randn(3, 1024, device="cuda", dtype=BF16)
        assert cuda_mma_extras.preferred(x[:1], packed) and cuda_mma_extras.preferred(x, packed)
        # 1 row: the gather in the kernel; 3 rows: a gather launch before it (both under a CUDA graph)
        for rows in (1, 3):
            eager = dispatch.device_matmul(x[:rows], packed)
            ref = reference(x[:rows].float(), packed).double()
            assert ((eager.double() - ref).norm() / ref.norm()).item() < 1e-2, kind
            assert torch.equal(graph_replay(lambda packed=packed, x=x[:rows]: dispatch.device_matmul(x, packed)), eager)
        wide = torch.randn(20, 1024, device="cuda", dtype=BF16)  # above 16 rows: the three launches (Triton)
        assert not cuda_mma_extras.supported(wide, packed)
