"""compress: recipes of pruning and quantization stages over Hugging Face models.

    import compress
    report = compress.run("recipes/wanda-50.yaml", out="runs/wanda")      # what `compress run` does
    report = compress.apply(model, {"stages": [{"method": "gptq", "bits": 4}]})  # a model in memory
    model = compress.load("runs/wanda")                                      # the packed export, on the kernels
"""

__version__ = "0.1.0"

from compress.api import apply, embedded_model, load, run
from compress.deploy.hook import install as _install_transformers_loader

_install_transformers_loader()  # AutoModel*.from_pretrained(OUT + "/packed") works after `import compress`

__all__ = ["__version__", "apply", "embedded_model", "load", "run"]
