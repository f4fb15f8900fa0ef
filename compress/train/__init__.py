"""The training loop whole-model methods share (sparsity-aware training, sparse LoRA): data packing,
teacher, losses, accumulation, checkpoints, step metrics. (Empty until the first training method.)"""
