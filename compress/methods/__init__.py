"""Compression methods, one file each, registered by name. Importing this package registers the
built-in ones; `get_method` looks a name up among every registered method."""

from compress.methods import cast, dsnot, finetune, gptq, magnitude, qmoe, rtn, sparse_lora, sparsegpt, spqr, squeezellm, wanda  # noqa: F401  (register)
from compress.methods.registry import get_method, method_names, register

__all__ = ["get_method", "method_names", "register"]
