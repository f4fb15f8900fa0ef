"""RTN and GPTQ against properties that hold by construction and the layer's real output error."""

import pytest
import torch

from compress.methods.gptq import GPTQ, gptq_quantize
from compress.methods.quantization import fit_grid, quantize_codes, round_to_grid
from compress.methods.rtn import rtn_quantize
from compress.methods.sparsegpt import sparsegpt_prune


def _layer(rows=32, columns=128, tokens=1024, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    mixing = torch.randn(columns, columns, generator=generator) / columns**0.5 + torch.eye(columns)
    inputs = torch.randn(tokens, columns, generator=generator) @ mixing
    return weight, inputs, inputs.T @ inputs


def _output_error(weight, new_weight, inputs):
    return ((inputs @ weight.T - inputs @ new_weight.T).pow(2).sum() / (inputs @ weight.T).pow(2).sum()).item()


@pytest.mark.parametrize("symmetric", [False, True])
def test_grid_has_zero_and_codes_in_range(symmetric):
    weight, _, _ = _layer()
    grid = fit_grid(weight, 3, symmetric)
    codes = quantize_codes(weight, grid)
    assert codes.min() >= 0 and codes.max() <= 7 and torch.equal(codes, codes.round())
    assert (round_to_grid(torch.zeros_like(weight), grid) == 0).all()


@pytest.mark.parametrize("group_size", [None, 32])
def test_rtn_has_at_most_2_to_the_bits_values_per_group(group_size):
    weight, _, _ = _layer()
    quantized, _ = rtn_quantize(weight, 3, group_size)
    for row in range(4):
        for start in range(0, 128, group_size or 128):
            assert quantized[row, start : start + (group_size or 128)].unique().numel() <= 8


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("columns", [128, 120, 97])  # 120, 97: the last group of 32 is 24, 1 wide
def test_16_bits_is_lossless_within_fp_tolerance(method, columns):
    weight, _, hessian = _layer(columns=columns)
    quantized, packed = rtn_quantize(weight, 16, 32) if method == "rtn" else gptq_quantize(weight, hessian, 16, 32)
    assert torch.allclose(quantized, weight, atol=1e-3 * weight.abs().max().item())
    if method == "gptq":  # the packed form (a last, shorter group included) rebuilds it
        assert packed.scale.shape == (32, -(-columns // 32)) and torch.equal(packed.dequantize(), quantized)


@pytest.mark.parametrize("bits, group_size", [(3, None), (3, 32), (4, 32), (2, 16)])
def test_gptq_beats_rtn_on_the_layer_output(bits, group_size):
    weight, inputs, hessian = _layer()
    gptq, packed = gptq_quantize(weight, hessian, bits, group_size, block_size=64)
    assert packed.scale.shape == (32, 128 // group_size if group_size else 1)
    rtn, _ = rtn_quantize(weight, bits, group_size)
    assert _output_error(weight, gptq, inputs) < 0.8 * _output_error(weight, rtn, inputs)


def test_gptq_groups_spanning_blocks():
    """A group wider than the sweep's block is fitted on the columns beyond the block too."""
    weight, inputs, hessian = _layer()
    quantized, packed = gptq_quantize(weight, hessian, 4, 64, block_size=16)
    assert packed.scale.shape == (32, 2)
    for row in range(4):
        assert quantized[row, :64].unique().numel() <= 16


def test_pruned_zeros_stay_zero_and_nm_survives():
    weight, inputs, hessian = _layer(seed=2)
    pruned, keep = sparsegpt_prune(weight, hessian, 0.5, "2:4", block_size=32)
    for quantized in (gptq_quantize(pruned, hessian, 3, 32, keep=keep)[0], GPTQ(GPTQ.Params(bits=3, group_size=32))
                      .compress_target(pruned, {"hessian": hessian}, keep).weight):
        assert (quantized[~keep] == 0).all()
        assert ((quantized != 0).view(32, -1, 4).sum(-1) <= 2).all()
    assert (rtn_quantize(pruned, 3, 32)[0][~keep] == 0).all()


@pytest.mark.parametrize("stages", [
    [{"method": "gptq", "bits": 3, "group_size": 32}],
    [{"method": "wanda", "pattern": "2:4"}, {"method": "rtn", "bits": 4, "group_size": 64}],
    [{"method": "spqr", "bits": 3}],
    [{"method": "wanda", "pattern": "2:4"}, {"method": "spqr", "bits": 3}],
])
def test_packed_export_rebuilds_the_evaluated_weights_and_gives_the_bits(stages, tmp_path):
    """packed/ holds every target in a kernel format that unpacks to exactly the evaluated weights
    (model/, written with output.hf), and bits/param is its target tensors' bytes over the weights."""
    from conftest import checkpoint_tensors, exported_tensors, fast_recipe

    from compress.deploy.packed_model import stored_bytes
    from compress.formats.words import codes_per_word
    from compress.pipeline.engine import run
    from compress.recipe import validate_recipe

    out = tmp_path / "q"
    report = run(validate_recipe(fast_recipe(*stages, evaluate={"dense": False}, output={"hf": True})), out)
    evaluated, exported = checkpoint_tensors(out / "model"), exported_tensors(out)
    pruned = stages[0]["method"] == "wanda"
    expected_format = {"gptq": "group_quant", "rtn": "sparse_quant" if pruned else "group_quant", "spqr": "spqr"}[stages[-1]["method"]]
    assert report["formats"] == {expected_format: 4 * 7}
    for name in report["targets"]:
        assert torch.equal(exported[f"{name}.weight"], evaluated[f"{name}.weight"]), name
        if pruned:  # pruned zeros stay zero, 2:4 holds
            assert ((exported[f"{name}.weight"] != 0).view(exported[f"{name}.weight"].shape[0], -1, 4).sum(-1) <= 2).all()
    params = report["metrics"]["target_params"]
    assert report["metrics"]["bits_per_param"] == 8 * stored_bytes(out / "packed", list(report["targets"]))["target_bytes"] / params
    bits = stages[-1]["bits"]
    word_bits = 32 / codes_per_word(bits)  # codes never straddle a 32-bit word: 3-bit codes take 3.2 bits
    # pruned: kept codes only, plus 2-bit in-group indices of the kept half (2:4) or a 1-bit bitmask
    expected = 0.5 * word_bits + 1 if pruned else word_bits
    if stages[-1]["method"] == "spqr":  # 3-bit statistics per 16 weights; their fp16 second level, perm, row pointers < 1
        outliers = sum(t["quantized"]["outliers"] for t in report["targets"].values())  # 16-bit value + 16-bit column each
        expected += 2 * 3.2 / 16 + 32 * outliers / params
        assert expected < report["metrics"]["bits_per_param"] < expected + 1.0
    else:  # plus fp16 scales and packed integer zero points per group
        assert expected < report["metrics"]["bits_per_param"] < expected + 1.2
    assert report["verify"]["verify_ok"] and report["audit"]["ok"], report["audit"]["problems"]


def test_bit_packing_round_trips():
    from compress.formats.bits import pack_bits, unpack_bits

    generator = torch.Generator().manual_seed(0)
    for bits in (1, 2, 3, 4, 5, 8, 16):
        values = torch.randint(0, 2**bits, (1001,), generator=generator)
        packed = pack_bits(values, bits)
        assert packed.numel() == (1001 * bits + 7) // 8
        assert torch.equal(unpack_bits(packed, bits, 1001), values)


def test_word_packing_gives_the_bit_stream_bytes():
    from compress.formats.bits import _pack_stream, _unpack_stream, pack_bits, unpack_bits

    generator = torch.Generator().manual_seed(1)
    for bits in range(1, 9):  # 8 reaches the sign bit of the 64-bit words
        for count in (1, 7, 8, 9, 1001):
            values = torch.randint(0, 2**bits, (count,), generator=generator)
            packed = pack_bits(values, bits)
            assert torch.equal(packed, _pack_stream(values, bits))
            assert torch.equal(_unpack_stream(packed.to(torch.int64), bits, count), values)
            assert torch.equal(unpack_bits(packed, bits, count, torch.uint8), values.to(torch.uint8))


@pytest.mark.parametrize("per_row, stored", [(3, torch.uint8), (300, torch.int16), (40000, torch.int16)])
def test_outlier_rows_round_trip_in_the_narrowest_count_type(per_row, stored, tmp_path):
    from compress.formats.outliers import Outliers
    from compress.formats.packed_file import read_packed, write_packed
    from compress.formats.quantized import QuantizedWeight

    rows, columns = 4, 65536  # column indices up to 65535 exercise the unsigned reading of int16
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, columns, generator=generator)
    chosen = torch.zeros(rows, columns, dtype=torch.bool)
    for row in range(rows - 1):  # the last row has none
        chosen[row, torch.randperm(columns, generator=generator)[: per_row + row]] = True
    chosen[0, -1] = True
    outliers = Outliers.from_mask(weight, chosen)
    assert outliers.row_counts().dtype == stored
    codes = torch.zeros(rows, columns, dtype=torch.int64)
    packed = QuantizedWeight((rows, columns), 2, columns, codes, None, None, outliers,
                             lut=torch.tensor([[0.0, 1.0, 2.0, 3.0]] * rows, dtype=torch.float16))
    write_packed(tmp_path / "p.safetensors", {"w": packed})
    back = read_packed(tmp_path / "p.safetensors")["w"]
    assert torch.equal(back.outliers.row_ptr, outliers.row_ptr)
    assert torch.equal(back.dequantize(), packed.dequantize())
    assert torch.equal(back.dequantize()[chosen], weight[chosen].half().float())


def test_format_2_files_with_row_pointers_still_read(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from compress.formats.outliers import Outliers
    from compress.formats.packed_file import read_packed, write_packed
    from compress.formats.quantized import QuantizedWeight

    weight = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    chosen = weight.abs() > 1
    packed = QuantizedWeight((3, 8), 2, 8, torch.zeros(3, 8, dtype=torch.int64), None, None,
                             Outliers.from_mask(weight, chosen), lut=torch.zeros(3, 4, dtype=torch.float16))
    write_packed(tmp_path / "v3.safetensors", {"w": packed})
    with safe_open(str(tmp_path / "v3.safetensors"), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if not key.endswith("row_counts")}
        header = json.loads(handle.metadata()["compress_packed"])
    tensors["w.outliers.row_ptr"] = packed.outliers.row_ptr
    header["format"] = "compress-packed/2"
    save_file(tensors, str(tmp_path / "v2.safetensors"), metadata={"compress_packed": json.dumps(header)})
    assert torch.equal(read_packed(tmp_path / "v2.safetensors")["w"].dequantize(), packed.dequantize())
    header["format"] = "compress-packed/9"
    save_file(tensors, str(tmp_path / "v9.safetensors"), metadata={"compress_packed": json.dumps(header)})
    with pytest.raises(ValueError, match="version this reader knows"):
        read_packed(tmp_path / "v9.safetensors")


def test_gptq_act_order_sweeps_by_hessian_diagonal_and_packs_the_permutation(tmp_path):
    from compress.formats.packed_file import read_packed, write_packed

    weight, inputs, hessian = _layer(seed=3)
    quantized, packed = gptq_quantize(weight, hessian, 3, 32, act_order=True)
    assert torch.equal(packed.perm, torch.argsort(torch.diag(hessian), descending=True))
    write_packed(tmp_path / "p.safetensors", {"w": packed})
    assert torch.equal(read_packed(tmp_path / "p.safetensors")["w"].dequantize(), quantized)
    rtn, _ = rtn_quantize(weight, 3, 32)
    assert _output_error(weight, quantized, inputs) < 0.8 * _output_error(weight, rtn, inputs)
    assert torch.allclose(gptq_quantize(weight, hessian, 16, 32, act_order=True)[0], weight, atol=1e-3 * weight.abs().max().item())


def test_moe_experts_prune_refine_and_quantize(tiny_mixtral, tmp_path):
    """Fused experts go through every stage kind: Wanda, DSnoT on all targets, GPTQ, each expert packed in its own format."""
    from conftest import fast_recipe

    from compress.pipeline.engine import run
    from compress.recipe import validate_recipe

    recipe = fast_recipe({"method": "wanda", "sparsity": 0.5}, {"method": "dsnot", "skip_layer": "no_skip"},
                         {"method": "gptq", "bits": 4, "group_size": 16}, model={"source": str(tiny_mixtral)},
                         evaluate={"dense": False})
    report = run(validate_recipe(recipe), tmp_path / "moe")
    expert = "model.layers.0.mlp.experts.1.down_proj"
    assert report["targets"][expert]["quantized"]["bits"] == 4 and report["targets"][expert]["stages"] == ["wanda", "dsnot", "gptq"]
    assert report["targets"][expert]["format"] == "sparse_quant"  # each expert in its own format, run by the packed experts module
    assert report["audit"]["ok"] and report["verify"]["verify_ok"]
    assert abs(report["targets"][expert]["sparsity"] - 0.5) < 1e-6


def test_gptq_static_groups_fit_every_grid_on_the_original_weights():
    from compress.methods.quantization import fit_grid

    weight, inputs, hessian = _layer(seed=4)
    quantized, packed = gptq_quantize(weight, hessian, 3, 32, static_groups=True)
    for group in range(4):
        expected = fit_grid(weight[:, 32 * group : 32 * (group + 1)], 3)
        assert torch.equal(packed.scale[:, group : group + 1].float(), expected.scale)
    rtn, _ = rtn_quantize(weight, 3, 32)  # same grids as RTN; GPTQ's compensation still lowers the error
    assert _output_error(weight, quantized, inputs) < 0.8 * _output_error(weight, rtn, inputs)
    with pytest.raises(ValueError, match="static_groups with act_order"):
        GPTQ.Params(bits=3, static_groups=True, act_order=True)
