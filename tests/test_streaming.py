"""Block streaming (issue 8.4): a stage holds only what lies outside the blocks plus the current block."""

from __future__ import annotations

import pytest
import torch

from compress.calibration.streaming import open_blockwise
from compress.model.checkpoint import CheckpointFiles, CheckpointWriter
from compress.model.load import embedded_model_path, load_model
from compress.recipe import ModelSpec


def _on_meta(module: torch.nn.Module) -> bool:
    return all(p.device.type == "meta" for p in module.parameters())


def test_blocks_are_read_on_demand_and_released(tmp_path):
    spec = ModelSpec(device="cpu", kind="causal")
    model = open_blockwise(spec)
    assert model.streamed
    blocks = model.layout.blocks
    assert all(_on_meta(block) for block in blocks)
    assert not any(p.device.type == "meta" for p in model.loaded.model.model.embed_tokens.parameters())
    model.fetch(1)
    assert not _on_meta(blocks[1]) and _on_meta(blocks[0]) and _on_meta(blocks[2])
    model.release(1)
    assert _on_meta(blocks[1])

    # all blocks fetched, the model computes exactly what the whole loaded one does
    for index in range(len(blocks)):
        model.fetch(index)
    whole = load_model(spec).model
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.loaded.model(input_ids=ids).logits, whole(input_ids=ids).logits)

    # written block by block, the checkpoint reloads to the same model
    writer = CheckpointWriter(tmp_path / "copy", len(blocks))
    for index in range(len(blocks)):
        writer.write(index + 1, model.block_tensors(index))
    writer.write(0, model.outside_tensors())
    writer.finish(embedded_model_path())
    copy = load_model(spec.model_copy(update={"source": str(tmp_path / "copy")})).model
    with torch.no_grad():
        assert torch.equal(copy(input_ids=ids).logits, whole(input_ids=ids).logits)
    assert len(set(CheckpointFiles(tmp_path / "copy").where.values())) == len(blocks) + 1


def test_a_checkpoint_in_another_layout_is_loaded_whole(tiny_mixtral):
    # Mixtral's files hold per-expert w1/w2/w3 that transformers fuses on load: no name matches a parameter
    model = open_blockwise(ModelSpec(source=str(tiny_mixtral), device="cpu", kind="causal"))
    assert not model.streamed and not any(_on_meta(block) for block in model.layout.blocks)


def test_an_untied_head_stays_on_meta_and_is_copied_bit_for_bit(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         vocab_size=300, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "untied")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(tmp_path / "untied")
    model = open_blockwise(ModelSpec(source=str(tmp_path / "untied"), device="cpu", kind="causal"))
    assert model.streamed and model.loaded.model.lm_head.weight.device.type == "meta"
    stored = CheckpointFiles(tmp_path / "untied").read(["lm_head.weight"])["lm_head.weight"]
    assert torch.equal(model.outside_tensors()["lm_head.weight"], stored)
    from compress.calibration.capture import capture_block_inputs

    captured = capture_block_inputs(model.loaded.model, model.layout, [torch.tensor([[1, 2, 3]])], torch.device("cpu"))
    assert captured[0].hidden.shape == (1, 3, 32)  # the embeddings ran with the head still on meta


def test_tensor_shelf_writes_in_bounded_parts_and_reads_back(tmp_path, monkeypatch):
    from compress.calibration.shelf import TensorShelf

    monkeypatch.setattr(TensorShelf, "CHUNK_BYTES", 64 * 4)  # a part closes once 64 fp32 values are pending
    tensors = {f"t{i}": torch.full((8, 5), float(i)) for i in range(6)}
    expected = {name: tensor.clone() for name, tensor in tensors.items()}
    shelf = TensorShelf(tmp_path / "shelf")
    assert not shelf.complete
    shelf.put(tensors)
    assert tensors == {}  # handed over: the caller's memory is free
    assert shelf.complete and len(list((tmp_path / "shelf").glob("part-*.safetensors"))) == 3
    assert set(shelf) == set(expected) and all(torch.equal(shelf[n], t) for n, t in expected.items())
    with pytest.raises(KeyError):
        shelf["missing"]
    shelf.remove()
    assert not (tmp_path / "shelf").exists()
