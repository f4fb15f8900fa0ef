"""The diagonal Fisher information of target weights: SqueezeLLM's sensitivity.

As the reference computes it (kssteven418/SqueezeLLM-gradients, run.py): for each calibration
sequence on its own, the causal LM loss (labels = input_ids, mean over the sequence's predicted
tokens) is back-propagated, and every weight's gradient is squared and summed over the sequences.

Several sequences share one forward and backward: the loss is the sum of each sequence's own mean
loss, so the gradient at a sequence's activations is that sequence's alone, and for a Linear target
the gradient of sequence s is G_s = sum_t g_t x_t^T over its tokens t (g: the gradient at the layer's
output, x: its input). A forward hook keeps each target's input, and a hook on its output forms and
squares G_s as the backward passes. No Linear weight gradient is formed: the backward starts from the
input embeddings, made a leaf. A fused MoE expert's weight is a slice of a 3-D parameter the experts
module applies to tokens of every sequence at once: its gradient is the parameter's, taken one
parameter at a time, so with experts among the targets each backward holds one sequence.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from compress.calibration.statistics import tensor_core_fp32
from compress.errors import CompressError
from compress.model.targets import Target
from compress.progress import bar


def fisher_diagonal(
    model: nn.Module,
    targets: list[Target],
    batches: list[torch.Tensor],
    device: torch.device | str,
    chunk_size: int = 1,
    accumulate_on: torch.device | str | None = None,
    return_model: bool = True,
) -> dict[str, torch.Tensor]:
    """{target name: sum over the sequences of `batches` ([batch, seqlen] token ids) of the squared
    gradient of the sequence's LM loss w.r.t. the target's [out, in] weight}, fp32, on `accumulate_on`
    (default: `device`), where they are summed: the caller moves or stores them (a 7B model's sums
    are 26 GB, more than its bf16 weights).

    `chunk_size` sequences go through each forward and backward. The model runs on `device` in eval
    mode and is left as it was: no .grad on any parameter, requires_grad flags unchanged, the RNG
    untouched; and where it was, unless `return_model` is False (a caller done with the model saves
    moving it back)."""
    if not targets:
        return {}
    device = torch.device(device)
    store = device if accumulate_on is None else torch.device(accumulate_on)
    experts = [t for t in targets if t.is_expert]
    chunk_size = 1 if experts else chunk_size
    sums = {t.name: torch.zeros(t.weight.shape, dtype=torch.float32, device=store) for t in targets}
    of_param: dict[int, list[Target]] = {}  # fused expert parameter -> its targets
    for target in experts:
        of_param.setdefault(id(getattr(target.module, target.param_name)), []).append(target)
    sequences = 0  # in the chunk being back-propagated

    def linear_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            output.register_hook(lambda g: add_linear(name, x, g))  # g: the loss's gradient at the output

        return hook

    def add_linear(name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        x, g = x.reshape(sequences, -1, x.shape[-1]), g.reshape(sequences, -1, g.shape[-1])
        # bf16/fp16 factors are exact in TF32, so tensor cores give the fp32 product (statistics.tensor_core_fp32)
        exact = tensor_core_fp32() if x.dtype in (torch.bfloat16, torch.float16) and g.dtype == x.dtype else nullcontext()
        with exact:
            for s in range(sequences):  # one [out, in] gradient at a time
                gradient = g[s].float().T @ x[s].float()
                if gradient.device == store:
                    sums[name].addcmul_(gradient, gradient)
                else:
                    sums[name] += gradient.square().to(store)

    def expert_hook(param: nn.Parameter) -> None:
        for target in of_param[id(param)]:
            sums[target.name] += param.grad[target.expert].float().square().to(store)
        param.grad = None  # one parameter's gradient alive at a time, none left behind

    home, was_training = next(model.parameters()).device, model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    expert_params = [p for p in model.parameters() if id(p) in of_param]
    handles = []
    progress = bar(total=sum(batch.shape[0] for batch in batches), desc="fisher", unit="seq")
    try:
        model.to(device)
        model.eval()  # no dropout
        for param, _ in flags:  # only fused experts need gradients of parameters
            param.requires_grad_(False)
        for param in expert_params:
            param.requires_grad_(True)
            handles.append(param.register_post_accumulate_grad_hook(expert_hook))
        handles += [t.module.register_forward_hook(linear_hook(t.name)) for t in targets if not t.is_expert]
        embed = model.get_input_embeddings()
        for batch in batches:
            for chunk in batch.split(chunk_size):
                ids = chunk.to(device)
                sequences = ids.shape[0]
                embeddings = embed(ids).detach().requires_grad_()
                loss = _summed_sequence_losses(model, ids, embeddings)
                torch.autograd.backward(loss, inputs=[embeddings, *expert_params])
                del loss, embeddings
                progress.update(sequences)
    finally:
        progress.close()
        for handle in handles:
            handle.remove()
        for param in expert_params:  # set only if a backward broke off
            param.grad = None
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)
        if return_model:
            model.to(home)
    return sums


def _summed_sequence_losses(model: nn.Module, ids: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Sum over the sequences of each one's mean next-token cross-entropy (labels = input_ids)."""
    logits = getattr(model(inputs_embeds=embeddings, use_cache=False), "logits", None)
    if logits is None:
        raise CompressError(f"{type(model).__name__} has no language-model head: the Fisher diagonal needs the LM loss")
    losses = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return losses.view(ids.shape[0], -1).mean(dim=1).sum()
