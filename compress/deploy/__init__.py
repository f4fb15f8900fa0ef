"""The deployable model: the `packed/` folder a run writes (packed_model.py), and loading it back with
kernel-backed modules, through `compress.load` or transformers' own `from_pretrained` (hf.py)."""
