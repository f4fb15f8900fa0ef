"""What the Triton kernels (triton_kernels.py, triton_gemv.py) are launched with, in plain Python (importable
without Triton): each format's constants and tensors, the kernel (FMA GEMV or tensor-core dot), the tile
sizes, the split of K and how a Config turns into launch parameters. The defaults below were set from
`python benchmarks/gpu_kernels.py --sweep` (a grid of candidates timed on the GPU, the best per format,
shape and batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.formats import group_quant, nm, sparse_quant
from compress.formats.words import codes_per_word
from compress.kernels.views import LUTCodes

FMA_MAX_BATCH = 1  # batches up to this take the FMA (CUDA-core GEMV) kernel by default, larger ones the dot kernel
FMT_GROUP_QUANT, FMT_NM, FMT_SPARSE_QUANT = 0, 1, 2
SUPPORTED = (group_quant.GroupQuantWeight, nm.NMWeight, sparse_quant.SparseQuantWeight, LUTCodes)
KERNELS = ("auto", "fma", "dot", "splitk")


@dataclass(frozen=True)
class Config:
    """block_m: activation rows a program (FMA: 1, 2 or 4; dot: the tl.dot's N, padded); block_n: output rows a
    program; block_k: a K step, in dense columns (the FMA kernel of an N:M format: kept values; the dot
    kernel snaps it to the quantization group); split_k: programs along K (> 1: fp32 atomics and a final
    cast); kernel: "fma", "dot" or "auto" (fma for batches up to FMA_MAX_BATCH where the format has one)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    kernel: str = "auto"


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_split(programs: int, k_tiles: int, device: torch.device) -> int:
    """Programs along K only where the output tiles alone fill less than half the multiprocessors (each split keeps
    >= 4 K steps): split-K costs a zeroed fp32 buffer and a cast, two more launches."""
    sms = sm_count(device)
    if 2 * programs >= sms:
        return 1
    return max(1, min(-(-2 * sms // programs), k_tiles // 4 or 1))


def default_config(batch: int, packed, device: torch.device) -> Config:
    """The tiles packed_matmul uses for this weight and batch when it is given no Config. Set from the H200 sweeps
    (`benchmarks/gpu_kernels.py --sweep`, 2026-12-02; docs/kernels-gpu.md has the numbers):
    - batch 1, group_quant int2/4/8 with >= 64 rows a multiprocessor (14336x4096): the dot kernel with one
      activation row (tl.dot pads it for the tensor cores), 16 rows a 1-warp program, 512-column steps: 26-32 us against 49-69 us
      for the FMA GEMV. Fewer rows (4096x14336: too few such programs; the FMA GEMV was the best there, 36 us)
      and int3 / N:M: the FMA GEMV, 8 rows a program, 1 warp (int3, 10 codes a word: 4 rows, 4 stages, 79 us
      against 121).
    - batch 2-4, int2/4/8: the dot kernel with the batch unpadded (BLOCK_M 2 or 4), 16 rows, 1 warp, 512-column
      steps (28.8 us against 34.5 for the padded 16-row tile); int3, N:M and batch-1 formats without an FMA
      kernel: 64 rows, 4 warps, 256-column steps (int3: 116 us against 212 for the narrow tile).
    - batch 5-16: 16 activation rows (padded), 64 rows a 4-warp program, 256-column steps (the best on
      14336x4096 and, with split-K, on 4096x14336); larger batches 32 or 64 activation rows.
    3 pipeline stages but for that int3 tile (within 2% of 4, up to 20% better on int8); split-K where the output
    tiles alone fill less than half the multiprocessors (default_split). Measured on 14336x4096 (and, for the
    4096-row choices, the 4096x14336 runs of the earlier sweep); the other shapes follow the same rules unmeasured."""
    rows, cols = packed.shape
    args = format_args(packed, cols)
    if args.get("LUT"):  # tables: the split-K GEMV at every batch; 4 rows x 1, 2 x 2 or 1 x 4 activation rows a program
        block_m = min(4, pow2(batch))  # (more of either spills registers: compiled for sm_90, 2026-12-03)
        return Config(block_m, 4 // block_m, 64 * 4 * args["PER"], 1, 2, 1, "splitk")
    # the split-K GEMVs: 4 rows, 2 warps, plain loads (gpu_gemv_probe, 2026-12-03); 2:4 + int4's one is not yet timed on
    # a GPU, so it runs only when a Config asks for it
    if batch == 1 and splitk_ok(args) and args["FMT"] != FMT_SPARSE_QUANT:
        return Config(1, 4, 2048 if args["FMT"] != FMT_GROUP_QUANT else 64 * 4 * args["PER"], 1, 2, 1, "splitk")
    narrow = args["FMT"] == FMT_GROUP_QUANT and args["PER"] & (args["PER"] - 1) == 0  # int2/4/8: the 16-row dot tile
    if batch <= FMA_MAX_BATCH and fma_ok(args) and not (narrow and rows >= 64 * sm_count(device)):
        # one warp a program, lanes along K (32 lanes x 4 words / 1 index word a step)
        block_k = 128 * args["PER"] if args["FMT"] == FMT_GROUP_QUANT else 32 * args["IPER"]
        k_tiles = -(-cols // block_k) if args["FMT"] == FMT_GROUP_QUANT else -(-args["KC"] // block_k)
        block_n = 4 if args["FMT"] == FMT_GROUP_QUANT and not narrow else 8
        return Config(pow2(batch), block_n, block_k, default_split(-(-rows // block_n), k_tiles, device), 1, 4 if block_n == 4 else 3, "fma")
    if batch <= 4:
        block_m, (block_n, step, warps) = pow2(batch), (16, 512, 1) if narrow else (64, 256, 4)
    else:
        block_m, block_n, step, warps = (16 if batch <= 16 else 32 if batch <= 32 else 64), 64, 256, 4
    split = default_split(-(-rows // block_n) * -(-batch // block_m), -(-cols // step), device)
    return Config(block_m, block_n, step, split, warps, 3, "dot")


def default_config_for(batch: int, packed, device: torch.device) -> Config:
    """The configuration packed_matmul picks for this weight and batch (the benchmark reports it)."""
    return default_config(batch, packed, device)


def format_args(packed, cols: int) -> dict:
    """The kernel's constants and pointers for one packed weight."""
    if isinstance(packed, group_quant.GroupQuantWeight):
        bits = packed.bits
        return dict(FMT=FMT_GROUP_QUANT, a=packed.codes, b=packed.codes, scale=packed.scale, zero=packed.zero, BITS=bits,
                    PER=codes_per_word(bits), IBITS=1, IPER=32, NN=1, MM=1, GROUP=packed.group_size,
                    ZERO_INT=packed.zero_kind == "integer", KC=cols, WPR=packed.codes.shape[1], IWPR=1,
                    GROUPS=packed.groups, ZWPR=packed.zero.shape[1] if packed.zero_kind == "integer" else 1)
    if isinstance(packed, nm.NMWeight):
        ib = nm.index_bits(packed.m)
        return dict(FMT=FMT_NM, a=packed.values, b=packed.indices, scale=packed.values, zero=packed.values, BITS=1, PER=32,
                    IBITS=ib, IPER=codes_per_word(ib), NN=packed.n, MM=packed.m, GROUP=1, ZERO_INT=True,
                    KC=cols // packed.m * packed.n, WPR=1, IWPR=packed.indices.shape[1], GROUPS=1, ZWPR=1)
    if isinstance(packed, sparse_quant.SparseQuantWeight):
        pattern = sparse_quant.parse_pattern(packed.pattern)
        if pattern is None:
            raise TypeError("the Triton kernels take sparse_quant with an N:M pattern only")
        n, m = pattern
        ib = nm.index_bits(m)
        bits = packed.bits
        return dict(FMT=FMT_SPARSE_QUANT, a=packed.codes, b=packed.indices, scale=packed.scale, zero=packed.zero, BITS=bits,
                    PER=codes_per_word(bits), IBITS=ib, IPER=codes_per_word(ib), NN=n, MM=m, GROUP=packed.group_size,
                    ZERO_INT=packed.zero_kind == "integer", KC=cols // m * n, WPR=packed.codes.shape[1],
                    IWPR=packed.indices.shape[1], GROUPS=packed.groups,
                    ZWPR=packed.zero.shape[1] if packed.zero_kind == "integer" else 1)
    if isinstance(packed, LUTCodes):  # the split-K GEMV's table mode: "groups" of 4 words only pace the lanes (no statistics)
        per = codes_per_word(packed.bits)
        return dict(FMT=FMT_GROUP_QUANT, LUT=True, a=packed.codes, b=packed.codes, scale=packed.table, zero=packed.table, BITS=packed.bits,
                    PER=per, IBITS=1, IPER=32, NN=1, MM=1, GROUP=4 * per, ZERO_INT=True, KC=cols, WPR=packed.codes.shape[1], IWPR=1,
                    GROUPS=-(-cols // (4 * per)), ZWPR=1)
    raise TypeError(f"no Triton kernel for {type(packed).__name__}")


def supports(packed) -> bool:
    """Whether a Triton kernel takes this packed weight."""
    if isinstance(packed, sparse_quant.SparseQuantWeight):
        return sparse_quant.parse_pattern(packed.pattern) is not None
    return isinstance(packed, SUPPORTED)


def _nm_fast_ok(args: dict) -> bool:
    """N:M with M = 2 or 4 and N = 1 or 2 (a power of two kept values in 8 columns); sparse_quant codes of 2, 4
    or 8 bits."""
    n, m = args["NN"], args["MM"]
    return m in (2, 4) and n in (1, 2) and n < m and (args["FMT"] == FMT_NM or args["BITS"] in (2, 4, 8))


def fma_ok(args: dict) -> bool:
    """Whether the FMA kernel takes this format: every group_quant; N:M as _nm_fast_ok with, for sparse_quant,
    1 to 4 code words an index word and groups of whole index words."""
    if args["FMT"] == FMT_GROUP_QUANT:
        return True
    if not _nm_fast_ok(args):
        return False
    return args["FMT"] == FMT_NM or (args["IPER"] * args["BITS"] // 32 in (1, 2, 4) and
                                      args["GROUP"] % (args["IPER"] // args["NN"] * args["MM"]) == 0)


def splitk_ok(args: dict) -> bool:
    """The split-K GEMVs take group_quant with 2, 4 or 8 bits (a power of two codes a word) and groups of whole words
    (triton_splitk.py), and 2:4 N:M with 16-bit values or 4-bit codes (triton_nm_splitk.py)."""
    if args["FMT"] == FMT_NM:
        return args["NN"] == 2 and args["MM"] == 4 and args["a"].dtype in (torch.bfloat16, torch.float16)
    if args["FMT"] == FMT_SPARSE_QUANT:  # 2:4 + 4-bit codes, groups of whole 32-column lanes
        return args["NN"] == 2 and args["MM"] == 4 and args["BITS"] == 4 and args["GROUP"] % 32 == 0
    return args["FMT"] == FMT_GROUP_QUANT and args["PER"] in (4, 8, 16) and args["GROUP"] % args["PER"] == 0


def splitk_plan(args: dict, cols: int, block_k: int, split_k: int, batch: int, block_m: int, num_warps: int, x_size: int) -> dict:
    """Split-K GEMV: words a lane V (<= 4, inside one group), lanes L (32 a warp, more when block_k asks), K steps, splits."""
    if args["FMT"] != FMT_GROUP_QUANT:  # 2:4: a lane takes one index word (16 kept values, 32 columns) of every row a step
        lanes = max(32 * num_warps, pow2(max(1, block_k // 32)))
        k_tiles = -(-args["IWPR"] // lanes)
        split, k_iters = _splits(k_tiles, split_k)
        masked = not (args["IWPR"] % lanes == 0 and args["KC"] == 16 * args["IWPR"] and k_tiles % k_iters == 0)
        return dict(kernel="splitk", lanes=lanes, k_iters=k_iters, split=split, masked=masked, block_m=1)
    per, group_words = args["PER"], args["GROUP"] // args["PER"]
    v = min(4, group_words & -group_words)
    lanes = max(32 * num_warps, pow2(max(1, block_k // (per * v))))
    step = lanes * v
    k_tiles = -(-args["WPR"] // step)
    split, k_iters = _splits(k_tiles, split_k)
    masked = not (cols == args["WPR"] * per and args["WPR"] % step == 0 and k_tiles % k_iters == 0)
    return dict(kernel="splitk", v=v, lanes=lanes, k_iters=k_iters, split=split, masked=masked, ch=min(per, 16 // x_size),
                block_m=min(4, block_m, pow2(batch)))


def _splits(k_tiles: int, split_k: int) -> tuple[int, int]:
    split = max(1, min(split_k, k_tiles))
    k_iters = -(-k_tiles // split)
    return -(-k_tiles // k_iters), k_iters


def launch_plan(args: dict, cfg: Config, batch: int, rows: int, cols: int, x_size: int) -> dict:
    """The kernel and its derived launch parameters for a Config."""
    if cfg.kernel not in KERNELS:
        raise ValueError(f"Config.kernel must be one of {KERNELS}, got {cfg.kernel!r}")
    gq = args["FMT"] == FMT_GROUP_QUANT
    per, group = args["PER"], args["GROUP"]
    kernel = cfg.kernel if cfg.kernel != "auto" else "fma" if batch <= FMA_MAX_BATCH else "dot"
    if args.get("LUT"):
        kernel = "splitk"  # the only kernel with a table mode
    if kernel == "splitk" and not splitk_ok(args):
        kernel = "fma" if batch <= 4 else "dot"  # the split-K GEMVs take int2/4/8 group_quant and 2:4 (+ int4) only
    if kernel == "fma" and not fma_ok(args):
        kernel = "dot"  # this N:M pattern has no FMA kernel: the dot kernel takes any batch
    plan = dict(kernel=kernel, fmask=(1 << args["BITS"]) - 1 if args["BITS"] > 1 else 3,
                i64=max(rows * max(args["WPR"], args["KC"]), batch * cols, rows * args["GROUPS"], batch * rows) >= 2**31,
                s32=all(t.dtype != torch.float16 or (t.numel() % 2 == 0 and t.data_ptr() % 4 == 0) for t in (args["scale"], args["zero"])))
    if kernel == "splitk":
        return {**plan, **splitk_plan(args, cols, cfg.block_k, cfg.split_k, batch, cfg.block_m, cfg.num_warps, x_size)}
    if kernel == "fma":
        plan["block_m"] = min(4, pow2(min(cfg.block_m, batch)))
        if gq:  # a lane: 4 words (4 * per columns) of every row, a step
            lanes = pow2(max(1, round(cfg.block_k / (4 * per))))
            k_tiles = -(-args["WPR"] // (4 * lanes))
            stats = 0 if per & (per - 1) == 0 and group % (4 * per) == 0 else 1 if 4 * per <= group else 2
            plan.update(lanes=lanes, k_full=cols // (4 * lanes * per), stats=stats, ch=min(per & -per, 16 // x_size))
        else:  # a lane: one index word (IPER kept values) of every row, a step
            lanes = pow2(max(1, round(cfg.block_k / args["IPER"])))
            k_tiles = -(-args["IWPR"] // lanes)
            plan.update(lanes=lanes)
    else:
        plan["block_m"] = pow2(min(cfg.block_m, max(16, pow2(batch))))
        step = max(16, pow2(cfg.block_k))          # a K step; fast tiles split it into sub-steps inside one group
        block_k, fast = step, False
        if gq and per & (per - 1) == 0:
            block_k = min(step, group & -group)
            fast = block_k >= max(16, per)
        elif gq and group >= per:  # int3: sub-steps of whole words spanning at most two groups
            block_k = min(step, pow2(per) * (1 << (group // per).bit_length() - 1))
            fast = 2 if block_k >= 16 else False
        elif not gq and _nm_fast_ok(args):
            whole = args["IPER"] * args["MM"] // args["NN"]  # columns of a whole index word
            step = max(step, whole)
            block_k = min(step, 128, group & -group) if args["FMT"] == FMT_SPARSE_QUANT else min(step, 128)
            fast = block_k >= whole and (args["FMT"] == FMT_NM or block_k // args["MM"] * args["NN"] >= per)
        if not fast:  # per-element gathers: 128-column steps at most (wider ones compiled for minutes, past shared memory)
            step = block_k = max(16, min(128, pow2(cfg.block_k)))
        p2 = pow2(per) if gq else 1
        plan.update(fast=fast, p2=p2, block_k=block_k, ng=step // block_k)
        k_tiles = -(-args["WPR"] // (step // p2)) if gq and fast != 1 else -(-cols // step)
    plan["split"], plan["k_iters"] = _splits(k_tiles, cfg.split_k)
    return plan
