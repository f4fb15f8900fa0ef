"""`import compress` makes transformers able to load packed folders without importing transformers
itself (that would cost seconds on every `import compress`): if transformers' quantizer registry is
already imported, register now; otherwise register right after it is first imported."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

REGISTRY_MODULE = "transformers.quantizers.auto"


def _register() -> None:
    loading = sys.modules.get("compress.deploy.hf")
    if loading is not None and not hasattr(loading, "register"):
        return  # compress.deploy.hf itself is importing transformers: its caller registers once it is loaded
    from compress.deploy.hf import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers' quantizer registry with the other finders, and runs `_register` once the
    module has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # once; and so the lookup below does not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if REGISTRY_MODULE in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
