"""The deployable export end to end: one run whose targets land in every packed format, loaded back on
the kernel-backed modules by compress.load and by transformers' from_pretrained (in a fresh interpreter,
either import order), generating the tokens the evaluated model generates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import fast_recipe

import compress
from compress.kernels.modules import PackedLinear

# each stage on its own targets, so that one run stores every format
STAGES = [
    {"method": "wanda", "pattern": "2:4", "targets": {"include": ["*.mlp.up_proj"]}},  # nm
    {"method": "magnitude", "sparsity": 0.6, "targets": {"include": ["*.self_attn.q_proj"]}},  # bitmap
    {"method": "rtn", "bits": 4, "group_size": 64, "targets": {"include": ["*.self_attn.k_proj"]}},  # group_quant
    {"method": "wanda", "pattern": "2:4", "targets": {"include": ["*.mlp.gate_proj"]}},
    {"method": "gptq", "bits": 4, "group_size": 64, "targets": {"include": ["*.mlp.gate_proj"]}},  # sparse_quant
    {"method": "spqr", "bits": 3, "targets": {"include": ["*.self_attn.v_proj"]}},  # spqr
    {"method": "squeezellm", "bits": 3, "targets": {"include": ["*.self_attn.o_proj"]}},  # lut
]
FORMATS = {"nm": "NMLinear", "bitmap": "BitmapLinear", "group_quant": "GroupQuantLinear", "sparse_quant": "SparseQuantLinear",
           "spqr": "SpQRLinear", "lut": "LUTLinear"}
PROMPT = [[1, 45, 9, 300, 12, 77]]


@pytest.fixture(scope="module")
def every_format(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "out"
    report = compress.run(fast_recipe(*STAGES, output={"hf": True}), out=out, track=False)
    return out, report


def test_every_format_is_written_verified_and_audited(every_format):
    out, report = every_format
    assert report["formats"] == {name: 4 for name in FORMATS}  # down_proj is not compressed: a plain Linear
    assert report["verify"]["verify_ok"] and report["verify"]["verify_packed_modules"] == 24
    assert report["metrics"]["verify_max_abs_diff"] <= report["verify"]["verify_tolerance"]
    assert report["audit"]["ok"], report["audit"]["problems"]
    # the deployable part is smaller than the dense checkpoint written beside it
    packed = sum(f.stat().st_size for f in (out / "packed").glob("*.safetensors"))
    dense = sum(f.stat().st_size for f in (out / "model").glob("*.safetensors"))
    assert packed < 0.85 * dense and report["metrics"]["packed_bytes"] < dense  # embeddings and down_proj stay dense


def test_load_builds_kernel_modules_and_generates_the_evaluated_tokens(every_format):
    from transformers import AutoModelForCausalLM

    out, report = every_format
    model = compress.load(out, dtype=torch.float32)
    for name, target in report["targets"].items():
        module = model.get_submodule(name)
        if target["format"] == "dense":
            assert isinstance(module, torch.nn.Linear)
        else:  # only the packed tensors: no dense weight anywhere
            assert type(module).__name__ == FORMATS[target["format"]] and isinstance(module, PackedLinear)
            assert not hasattr(module, "weight") and all(p.numel() < module.in_features * module.out_features for p in module.buffers())
    evaluated = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        got = model.generate(input_ids=prompt, max_new_tokens=16, do_sample=False)
        expected = evaluated.generate(input_ids=prompt, max_new_tokens=16, do_sample=False)
    assert got.tolist() == expected.tolist()


LOADS = {
    "compress first": "import compress, transformers\nmodel = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])",
    "transformers first": "import transformers, compress\nmodel = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])",
    "compress.load alone": "import compress\nmodel = compress.load(sys.argv[1])",
}


@pytest.mark.parametrize("load", list(LOADS))
def test_a_fresh_interpreter_loads_the_packed_folder(every_format, load):
    """transformers' from_pretrained after `import compress` (either import order), and compress.load
    with transformers not imported yet."""
    out, report = every_format
    script = f"""
import json, sys
{LOADS[load]}
kinds = sorted({{type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Linear")}})
print(json.dumps(kinds))
"""
    done = subprocess.run([sys.executable, "-c", script, str(out / "packed")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(json.loads(done.stdout.strip().splitlines()[-1])) >= set(FORMATS.values())


def test_import_compress_does_not_import_transformers():
    done = subprocess.run([sys.executable, "-c", "import sys, compress; print('transformers' in sys.modules, 'torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_kept_mask_is_the_pruning_mask_in_the_weights_own_column_order():
    from compress.formats import spqr
    from compress.formats.registry import kept_mask
    from compress.methods.spqr import SpQR

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 96, generator=generator)
    keep = torch.rand(32, 96, generator=generator) > 0.5
    inputs = torch.randn(256, 96, generator=generator)
    hessian = inputs.T @ inputs / 256
    packed = SpQR(SpQR.Params(bits=3, group_size=16)).compress_target(weight * keep, {"hessian": hessian}, keep).quantized
    assert packed.perm is not None and packed.keep is not None
    stored = spqr.from_quantized(packed)
    assert torch.equal(kept_mask(stored), keep)


def test_verify_tolerance_follows_the_dtypes():
    """2 units of the checkpoint dtype when computing in float32; 8 units of a 16-bit compute dtype,
    whose rounded activations drift apart layer by layer; proportional to the largest logit."""
    from compress.pipeline.verify import tolerance

    assert tolerance(torch.bfloat16, 10.0) == pytest.approx(2 * 2**-7 * 10)
    assert tolerance(torch.bfloat16, 10.0, torch.bfloat16) == pytest.approx(8 * 2**-7 * 10)
    assert tolerance(torch.float32, 0.5) == pytest.approx(2 * 2**-23)  # small logits: absolute floor of one unit of scale
