"""Built-in methods; importing this package registers them by name."""

from compress.methods import dsnot, magnitude, sparsegpt, wanda  # noqa: F401
