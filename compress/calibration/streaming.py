"""Block streaming: a model whose decoder blocks are read from its safetensors files when the engine
reaches them and written out as soon as they are compressed.

A stage opens its input checkpoint as a skeleton (parameters on the meta device, buffers such as
rotary tables real), loads what the engine runs outside the blocks (the input embeddings, whatever
else lies before block 0) and nothing else: an untied output head stays on meta, and every tensor
outside the blocks is copied to the output from the input's files, bit for bit, since stages do not
change them. `fetch(i)` reads block i's tensors from the shards; `finish(i)` writes it, in the
checkpoint's storage dtype, as its own shard of the output checkpoint and returns its memory. So a
model larger than host memory needs one block plus the calibration activations at a time.

A checkpoint whose file keys are not the model's own parameter names (transformers 5 fuses some
layouts on load, e.g. Mixtral's per-expert w1/w2/w3 into `experts.gate_up_proj`) is loaded whole
instead; its blocks are still written one shard each, under the model's names, so every later
stage streams.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.model.checkpoint import INDEX_FILE, CheckpointFiles, keys_match, unique_tensors
from compress.model.load import LoadedModel, checkpoint_dtype, compute_dtype_for, load_model, pick_device, resolve_kind, resolve_source
from compress.model.targets import ModelLayout, Target, discover
from compress.recipe import ModelSpec


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and their buffers for real (the
    rotary tables a model computes in __init__ are not in its checkpoint)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@dataclass
class BlockwiseModel:
    """The model a stage works on; `files` is None when it was loaded whole (see the module docstring)."""

    loaded: LoadedModel
    layout: ModelLayout
    files: CheckpointFiles | None

    @property
    def streamed(self) -> bool:
        return self.files is not None

    @property
    def source(self) -> Path:
        """The checkpoint folder it was opened from."""
        return Path(self.loaded.source)

    def _block_prefix(self, index: int) -> str:
        return f"{self.layout.blocks_path}.{index}."

    def fetch(self, index: int) -> None:
        """Read block `index` from the checkpoint, in the compute dtype (a no-op for a whole model)."""
        if not self.streamed:
            return
        block = self.layout.blocks[index]
        prefix = self._block_prefix(index)
        inner_names = list(unique_tensors(block))
        read = self.files.read([prefix + name for name in inner_names])
        dtype = self.loaded.compute_dtype
        # cast one tensor at a time, dropping its stored copy: a block is never held twice
        block.load_state_dict({name: _cast(read.pop(prefix + name), dtype) for name in inner_names}, assign=True, strict=True)

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Block `index` as it will be stored: checkpoint names, storage dtype, on the host."""
        prefix = self._block_prefix(index)
        return {prefix + name: self._stored(t) for name, t in unique_tensors(self.layout.blocks[index]).items()}

    def _stored(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = tensor.to(self.loaded.storage_dtype)
        return tensor.cpu().contiguous()

    def release(self, index: int) -> None:
        """Give block `index`'s memory back (a no-op for a whole model)."""
        if self.streamed:
            _to_meta(self.layout.blocks[index])

    def outside_tensors(self) -> dict[str, torch.Tensor]:
        """Everything outside the blocks, as stored (read again from the input's files when streamed)."""
        names = _outside_names(self.loaded.model, self.layout)
        if self.streamed:
            return {name: tensor.contiguous() for name, tensor in self.files.read(names).items()}
        tensors = unique_tensors(self.loaded.model)
        return {name: self._stored(tensors[name]) for name in names}


def _to_meta(module: nn.Module) -> None:
    """Put the tensors the checkpoint holds back on meta; buffers it does not hold (computed in
    __init__, like rotary tables) stay, since `fetch` could not bring them back."""
    module.load_state_dict({name: torch.empty_like(t, device="meta") for name, t in unique_tensors(module).items()},
                           assign=True, strict=True)


def _outside_names(model: nn.Module, layout: ModelLayout) -> list[str]:
    prefix = f"{layout.blocks_path}."
    return [name for name in unique_tensors(model) if not name.startswith(prefix)]


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def open_blockwise(spec: ModelSpec) -> BlockwiseModel:
    """The checkpoint `spec.source` names with only what lies outside its blocks in memory, or whole
    when its files do not hold the model's own parameter names."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    folder = Path(resolve_source(spec))
    has_safetensors = (folder / INDEX_FILE).is_file() or any(folder.glob("*.safetensors"))
    if has_safetensors:
        config = AutoConfig.from_pretrained(str(folder))
        kind = resolve_kind(str(folder), spec.kind)
        loader = AutoModelForCausalLM if kind == "causal" else AutoModel
        storage = checkpoint_dtype(folder)
        with parameters_on_meta():
            model = loader.from_config(config, dtype=storage)
        files = CheckpointFiles(folder)
        if keys_match(model, files):
            device = pick_device(spec.device)
            compute = compute_dtype_for(spec, storage, device)
            layout = discover(model)  # the blocks' parameters stay on meta until `fetch`
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            head_weight = head.weight if head is not None else None
            embeddings = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
            tensors = unique_tensors(model)
            # the engine never runs an untied head: it stays on meta (a 7B model's is 0.5 GB in fp32)
            outside = [name for name in _outside_names(model, layout)
                       if head_weight is None or tensors[name] is not head_weight or head_weight is embeddings]
            read = files.read(outside)
            model.load_state_dict({k: _cast(v, compute) for k, v in read.items()}, assign=True, strict=False)
            if hasattr(model, "tie_weights"):
                model.tie_weights()
            model.to(compute).eval()
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            loaded = LoadedModel(model, tokenizer, str(folder), kind, device, compute, storage)
            return BlockwiseModel(loaded, layout, files)
    loaded = load_model(spec)
    return BlockwiseModel(loaded, discover(loaded.model), None)


class _TargetWeights(Mapping):
    """A checkpoint's weights of some targets, read from its files when asked for (one block's worth
    at a time in the engine)."""

    def __init__(self, files: CheckpointFiles, targets: list[Target], dtype: torch.dtype) -> None:
        self.files, self.dtype = files, dtype
        self.targets = {t.name: t for t in targets}

    def __getitem__(self, name: str) -> torch.Tensor:
        target = self.targets[name]
        module_path = name.rsplit(".", 2)[0] if target.is_expert else name
        tensor = self.files.read([f"{module_path}.{target.param_name}"]).popitem()[1]
        return (tensor if target.expert is None else tensor[target.expert]).to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)


def reference_weights(spec: ModelSpec, targets: list[Target]) -> Mapping[str, torch.Tensor]:
    """The weights `targets` had in the checkpoint `spec.source` names (what a refining stage such as
    DSnoT compares against), by target name."""
    reference = open_blockwise(spec)
    if reference.streamed:
        return _TargetWeights(reference.files, targets, reference.loaded.compute_dtype)
    wanted = {t.name for t in targets}
    return {t.name: t.weight.clone() for t in reference.layout.targets if t.name in wanted}
