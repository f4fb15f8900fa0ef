"""The training loop whole-model methods share (sparsity-aware training, fixed-mask fine-tuning, sparse
LoRA): data packing (data.py), the objective (losses.py), the schedule (schedule.py), resumable
checkpoints (checkpoint.py), the loop (loop.py) and its binding to a recipe's stage (stage.py)."""
