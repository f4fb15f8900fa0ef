"""Token data: calibration windows (seeded, from text files or a `datasets` id) and eval text."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.recipe import CalibrationSpec


def embedded_text(name: str) -> Path:
    return Path(str(resources.files("compress") / "assets" / "text" / name))


def read_text_file(path: str | Path, what: str) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CompressError(f"{what} file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CompressError(f"{what} file is empty: {path}")
    return text


def tokenize(tokenizer: object, text: str) -> torch.Tensor:
    """Token ids of a whole text, without special tokens (1-D LongTensor)."""
    from transformers.utils import logging

    # One call over the whole text (pieces would change ids at the cuts); its only complaint is that
    # the text is longer than the model's context, which is expected here.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    finally:
        logging.set_verbosity(verbosity)
    return torch.tensor(ids, dtype=torch.long)


def calibration_text(spec: CalibrationSpec) -> tuple[str, str]:
    """(text, description of where it came from)."""
    if spec.dataset:
        try:
            import datasets
        except ImportError:
            raise CompressError("calibration.dataset needs the `datasets` package: pip install 'compress[datasets]'") from None
        try:
            data = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.dataset_split)
        except Exception as error:  # datasets raises many types; the user needs the message
            raise CompressError(f"calibration.dataset {spec.dataset!r}: {str(error).splitlines()[0]}") from None
        if spec.dataset_field not in data.column_names:
            raise CompressError(
                f"calibration.dataset_field {spec.dataset_field!r} not in dataset columns {data.column_names}"
            )
        text = "\n\n".join(t for t in data[spec.dataset_field] if t)
        if not text.strip():
            raise CompressError(f"calibration.dataset {spec.dataset!r} has no text in {spec.dataset_field!r}")
        return text, f"dataset:{spec.dataset}:{spec.dataset_split}"
    paths = spec.text or [str(embedded_text("train.txt"))]
    texts = [read_text_file(path, "calibration") for path in paths]
    return "\n\n".join(texts), ",".join(paths if spec.text else ["<embedded train.txt>"])


def calibration_tokens(spec: CalibrationSpec, tokenizer: object) -> tuple[torch.Tensor, str]:
    """[nsamples, seqlen] windows at seeded random offsets of the calibration text, and its source."""
    text, source = calibration_text(spec)
    ids = tokenize(tokenizer, text)
    _check_length(ids.numel(), spec, source)
    generator = torch.Generator().manual_seed(spec.seed)  # our own generator: the caller's RNG is untouched
    starts = torch.randint(0, ids.numel() - spec.seqlen, (spec.nsamples,), generator=generator)
    return torch.stack([ids[s : s + spec.seqlen] for s in starts.tolist()]), source


def _check_length(count: int, spec: CalibrationSpec, source: str) -> None:
    if count <= spec.seqlen:  # a window needs seqlen tokens and a start to draw: seqlen + 1 at least
        raise CompressError(f"calibration text ({source}) has {count} tokens; calibration.seqlen={spec.seqlen} needs more")


def check_calibration_text(spec: CalibrationSpec, tokenizer: object) -> None:
    """Raise what `calibration_tokens` would on too short a text, before any work (for `compress
    plan`). A long text is tokenized only as far as needed: a prefix cut at a space gives a lower
    bound (with a few tokens' margin for the cut). A `datasets` source is not checked: it would
    have to be downloaded."""
    if spec.dataset:
        return
    text, source = calibration_text(spec)
    chars = 16 * (spec.seqlen + 1)
    while chars < len(text):
        cut = text.rfind(" ", 0, chars)
        if tokenize(tokenizer, text[: cut if cut > 0 else chars]).numel() > spec.seqlen + 16:
            return
        chars *= 4
    _check_length(tokenize(tokenizer, text).numel(), spec, source)


def batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(tokens.split(batch_size))
