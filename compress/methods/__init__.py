"""Built-in methods; importing this package registers them by name."""

from compress.methods import dsnot, gptq, magnitude, rtn, sparsegpt, spqr, squeezellm, wanda  # noqa: F401
