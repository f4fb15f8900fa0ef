"""The pipeline of a run, step by step: plan (every input checked before compute), load, calibrate, each stage,
evaluate, export, audit. `compress.pipeline.engine.run` chains them; the step store keeps each step's
folder by the content of its inputs."""
