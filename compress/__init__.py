"""compress: recipes of pruning and quantization stages over Hugging Face models."""

__version__ = "0.1.0"
