"""The shared heart of every method: calibration tokens, the statistics hooks gather (input norms,
Hessians, routed-expert Hessians, Fisher diagonals), the layer-wise engine that runs the per-target
methods block by block, block streaming from the safetensors shards, and per-block checkpoints for
resume."""
