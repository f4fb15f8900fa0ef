"""What the llm-compressor peer scripts share (llmcompressor_wanda.py, llmcompressor_gptq.py).

Runs in the *peer* virtualenv, like the scripts that import it (they are run as scripts, so this
folder is on sys.path). Importing it switches Hugging Face to offline mode before torch and
transformers are imported. The heavy peer packages (datasets, llmcompressor, transformers) are
imported inside the functions, so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def add_input_args(p) -> None:
    """--model and --calib-tokens (first on every peer script's command line)."""
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--calib-tokens", required=True,
                   help="torch LongTensor [nsamples, seqlen] of input ids (.pt)")


def add_output_args(p, dtype_help: str) -> None:
    """--out, --device, evaluation, --dtype and --no-save (after the method's own options)."""
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-text", default=None,
                   help="plain-text file for perplexity (256-token windows)")
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES) + ["auto"], help=dtype_help)
    p.add_argument("--no-save", action="store_true",
                   help="skip writing the checkpoint (peer.json is still written)")


def load_calib_tokens(path: str) -> torch.Tensor:
    """The calibration rows, a 2-D LongTensor [nsamples, seqlen] on the CPU."""
    tokens = torch.load(path)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise SystemExit("--calib-tokens must hold a 2-D LongTensor [nsamples, seqlen]")
    return tokens.long().cpu()


def load_model(args):
    """(tokenizer, model in --dtype on --device in eval mode, the checkpoint's own dtype)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    load_kwargs = {}
    if args.dtype != "auto":
        load_kwargs["dtype"] = DTYPES[args.dtype]
    hf_config = AutoConfig.from_pretrained(args.model)
    orig_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(orig_dtype, str):
        orig_dtype = DTYPES.get(orig_dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, **load_kwargs)
    model.to(args.device)
    model.eval()
    return tokenizer, model, orig_dtype


def decoder_layer_classes(model) -> list[str]:
    names = list(getattr(model, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    names = [n for n in names if n in present]
    if not names:
        raise SystemExit("cannot infer the decoder-layer class (model._no_split_modules)")
    return names


def layer_linear_names(model, layer_classes) -> list[str]:
    out = []
    for lname, layer in model.named_modules():
        if type(layer).__name__ in layer_classes:
            for cname, child in layer.named_modules():
                if isinstance(child, torch.nn.Linear):
                    out.append(f"{lname}.{cname}")
    return out


def weight_snapshot(model) -> dict[str, torch.Tensor]:
    """Clone of every nn.Linear / nn.Embedding weight (by module name)."""
    return {name: mod.weight.detach().to("cpu", copy=True)
            for name, mod in model.named_modules()
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding))}


@torch.no_grad()
def perplexity(model, tokenizer, path, seqlen, device):
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    nwin = ids.numel() // seqlen
    if nwin == 0:
        raise SystemExit(f"eval text has fewer than {seqlen} tokens")
    windows = ids[: nwin * seqlen].view(nwin, seqlen)
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    bs = 8
    for i in range(0, nwin, bs):
        batch = windows[i:i + bs].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            batch[:, 1:].reshape(-1), reduction="sum")
        nll_sum += float(loss)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll_sum / count), nwin


def eval_perplexity(model, tokenizer, args, dense: bool):
    """Perplexity on --eval-text (None without it), printed as dense or as the result."""
    if not args.eval_text:
        return None
    ppl, nwin = perplexity(model, tokenizer, args.eval_text, args.eval_seqlen, args.device)
    if dense:
        print(f"dense perplexity: {ppl:.4f}", flush=True)
    else:
        print(f"perplexity: {ppl:.4f} ({nwin} windows of {args.eval_seqlen})", flush=True)
    return ppl


def calibration_dataset(tokens: torch.Tensor):
    """A datasets.Dataset of exactly these rows (all-ones attention masks)."""
    import datasets

    return datasets.Dataset.from_dict({
        "input_ids": tokens.tolist(),
        "attention_mask": torch.ones_like(tokens).tolist(),
    })


def run_oneshot(model, tokenizer, ds, modifier, tokens, layer_classes, batch_size: int = 1, cuda: bool = False):
    """llm-compressor's oneshot on exactly the rows of ``ds`` in order; (model, seconds), the seconds
    between CUDA synchronizes when ``cuda``."""
    from llmcompressor import oneshot

    nsamples, seqlen = tokens.shape
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model = oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=ds,
        recipe=modifier,
        num_calibration_samples=nsamples,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        pad_to_max_length=False,
        batch_size=batch_size,
        sequential_targets=layer_classes,
        output_dir=None,  # we save ourselves (dense format)
        log_dir=None,
    )
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print(f"oneshot seconds: {seconds:.3f}", flush=True)
    return model, seconds


def oneshot_record(tokens, layer_classes, args) -> dict:
    """The oneshot settings of run_oneshot plus --dtype / --device, for peer.json's config."""
    nsamples, seqlen = tokens.shape
    return {"num_calibration_samples": nsamples, "max_seq_length": seqlen,
            "sequential_targets": layer_classes,
            "shuffle_calibration_samples": False, "batch_size": 1,
            "dtype": args.dtype, "device": args.device}


def fail_on_problems(problems, message: str) -> None:
    if problems:
        for p in problems:
            print("PROBLEM:", p, file=sys.stderr)
        raise SystemExit(message)


def save_checkpoint(model, tokenizer, args, orig_dtype) -> None:
    """Dense HF checkpoint in the model's original dtype (unless --dtype auto) into --out."""
    if isinstance(orig_dtype, torch.dtype) and args.dtype != "auto":
        model.to(orig_dtype)
    model.to("cpu")
    # dense format: oneshot wraps save_pretrained; without save_compressed=False it would infer
    # a compressed-tensors format (sparse for pruning, int32-packed for quantization)
    model.save_pretrained(args.out, save_compressed=False)
    tokenizer.save_pretrained(args.out)


def peer_result(args, seconds, fields: dict, ppl, dense_ppl, **extra_versions) -> dict:
    """peer.json: tool and versions, ``fields`` (the method's own), perplexities and inputs."""
    import llmcompressor
    import transformers

    return {
        "tool": "llmcompressor",
        "version": llmcompressor.__version__,
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            **extra_versions,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "seconds": seconds,
        **fields,
        "perplexity": ppl,
        "dense_perplexity": dense_ppl,
        "eval_text": args.eval_text,
        "eval_seqlen": args.eval_seqlen,
        "model": os.path.abspath(args.model),
        "calib_tokens": os.path.abspath(args.calib_tokens),
    }


def write_result(args, result: dict, summary_keys) -> None:
    """Write peer.json into --out and print a one-line summary of ``summary_keys``."""
    with open(os.path.join(args.out, "peer.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps({k: result[k] for k in summary_keys}))
