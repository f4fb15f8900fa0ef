"""Merging packed files byte-wise: what a streamed stage does with the packed file each block leaves."""

import pytest
import torch

from compress.formats.packed_file import PACKED_FILE, merge_packed, read_packed, write_packed
from compress.methods.gptq import gptq_quantize
from compress.methods.spqr import SpQRParams, spqr_quantize
from compress.methods.squeezellm import SqueezeLLM, SqueezeLLMParams
from compress.state import CompressionState, PackedOnDisk, TargetState


def _forms() -> dict:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 64, generator=generator)
    weight[torch.rand(32, 64, generator=generator) < 0.02] *= 8
    inputs = torch.randn(256, 64, generator=generator) * (torch.rand(64, generator=generator) * 3 + 0.1)
    hessian = inputs.T @ inputs
    keep = torch.rand(32, 64, generator=generator) > 0.5
    fisher = torch.rand(32, 64, generator=generator).pow(4)
    return {
        "a.spqr": spqr_quantize(weight, hessian, SpQRParams(bits=3, group_size=16))[1],  # quantized statistics, outliers, perm
        "a.gptq": gptq_quantize(weight, hessian, 4, 32)[1],
        "b.lut": SqueezeLLM(SqueezeLLMParams(bits=3)).compress_target(weight * keep, {"fisher": fisher}, keep).quantized,
        "b.gptq": gptq_quantize(weight, hessian, 2, 64)[1],
    }


def _same(left, right) -> bool:
    kept = torch.ones_like(left.codes, dtype=torch.bool) if left.keep is None else left.keep  # pruned codes are not stored
    return torch.equal(left.dequantize(), right.dequantize()) and torch.equal(left.codes[kept], right.codes[kept].to(left.codes.dtype))


def test_merged_file_reads_back_every_chosen_form_bit_for_bit(tmp_path):
    forms = _forms()
    write_packed(tmp_path / "a.safetensors", {k: v for k, v in forms.items() if k.startswith("a.")})
    write_packed(tmp_path / "b.safetensors", {k: v for k, v in forms.items() if k.startswith("b.")})
    merge_packed([(tmp_path / "a.safetensors", ["a.spqr", "a.gptq"]), (tmp_path / "b.safetensors", ["b.lut"])], tmp_path / "m.safetensors")
    merged = read_packed(tmp_path / "m.safetensors")
    assert list(merged) == ["a.spqr", "a.gptq", "b.lut"]  # b.gptq was not asked for
    assert all(_same(merged[name], forms[name]) for name in merged)
    # nothing but the chosen tensors: the same bytes of data as one file written whole
    write_packed(tmp_path / "w.safetensors", {k: forms[k] for k in merged})
    whole, written = (tmp_path / "w.safetensors").stat().st_size, (tmp_path / "m.safetensors").stat().st_size
    assert abs(whole - written) < 64  # headers may differ in spacing only
    assert list(read_packed(tmp_path / "m.safetensors", ["b.lut"])) == ["b.lut"]


def test_merge_refuses_a_target_twice_and_an_older_format(tmp_path):
    forms = _forms()
    write_packed(tmp_path / "a.safetensors", {"x": forms["a.gptq"]})
    with pytest.raises(ValueError, match="cannot be merged into itself"):
        merge_packed([(tmp_path / "a.safetensors", ["x"])], tmp_path / "a.safetensors")
    assert read_packed(tmp_path / "a.safetensors")["x"].bits == 4  # untouched
    with pytest.raises(ValueError, match="more than one part"):
        merge_packed([(tmp_path / "a.safetensors", ["x"]), (tmp_path / "a.safetensors", ["x"])], tmp_path / "m.safetensors")
    raw = (tmp_path / "a.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + length].replace(b"compress-packed/3", b"compress-packed/2")
    (tmp_path / "old.safetensors").write_bytes(raw[:8] + header + raw[8 + length :])
    with pytest.raises(ValueError, match="only packed files of format 3"):
        merge_packed([(tmp_path / "old.safetensors", ["x"])], tmp_path / "m.safetensors")


def test_state_saves_forms_on_disk_and_in_memory_alike(tmp_path):
    forms = _forms()
    first = CompressionState({name: TargetState(stages=["q"], quantized=form) for name, form in forms.items() if name.startswith("a.")})
    (tmp_path / "one").mkdir()
    first.save(tmp_path / "one")
    lazy = CompressionState.load(tmp_path / "one", read_packed_forms=False)
    assert lazy.targets["a.spqr"].quantized == PackedOnDisk(tmp_path / "one" / PACKED_FILE, "a.spqr")
    lazy.targets["b.lut"] = TargetState(stages=["q"], quantized=forms["b.lut"])  # a newly quantized target, in memory
    del lazy.targets["a.gptq"]
    (tmp_path / "two").mkdir()
    lazy.save(tmp_path / "two")
    assert not any(p.name.startswith(".") for p in (tmp_path / "two").iterdir())  # no temporary file left
    again = CompressionState.load(tmp_path / "two")
    assert sorted(again.targets) == ["a.spqr", "b.lut"]
    assert all(_same(again.targets[name].quantized, forms[name]) for name in again.targets)
