"""What a data-parallel run (`compress run --nproc N`, or under torchrun) may do, checked before any
work, and where each of its processes computes.

Only layer-wise stages whose statistics are sums over tokens can share the calibration batches; a stage
that needs the whole model's statistics (a gradient pass) or trains the whole model runs in one process.
On CPU the processes talk over gloo; on CUDA over NCCL, each on its own device (local rank r on cuda:r).
"""

from __future__ import annotations

import math

from compress.errors import CompressError
from compress.methods import get_method
from compress.methods.base import ModelMethod
from compress.recipe import Recipe


def check_data_parallel(recipe: Recipe, processes: int) -> None:
    """Raise CompressError (one line) if `recipe` cannot run in `processes` data-parallel processes."""
    if processes < 1:
        raise CompressError(f"--nproc must be at least 1 (got {processes})")
    if processes == 1:
        return
    from compress.calibration.model_statistics import MODEL_STATISTICS

    for index, stage in enumerate(recipe.stages):
        method = get_method(stage.method)
        if issubclass(method, ModelMethod):
            raise CompressError(f"stages.{index} ({stage.method}) works on the whole model at once, which is not shared between "
                                f"processes: run it with --nproc 1")
        whole = [name for name in method.statistics if name in MODEL_STATISTICS]
        if whole:
            raise CompressError(f"stages.{index} ({stage.method}) needs whole-model statistics ({', '.join(whole)}), which are not "
                                f"summed over processes yet: run it with --nproc 1")
    batches = math.ceil(recipe.calibration.nsamples / recipe.calibration.batch_size)
    if batches < processes:
        raise CompressError(f"{processes} processes need at least {processes} calibration batches, the recipe has {batches} "
                            f"(calibration.nsamples {recipe.calibration.nsamples} / batch_size {recipe.calibration.batch_size})")
    if ":" in recipe.model.device:
        raise CompressError(f"model.device {recipe.model.device} names one device, but each process takes its own: use cuda or auto")


def backend_for(recipe: Recipe, local_processes: int) -> str:
    """The torch.distributed backend of a run: gloo on CPU; NCCL on CUDA, which needs one device for
    each process on this machine (raises CompressError otherwise)."""
    import torch

    from compress.model.load import pick_device

    if pick_device(recipe.model.device).type != "cuda":
        return "gloo"
    found = torch.cuda.device_count()
    if found < local_processes:
        raise CompressError(f"{local_processes} processes on CUDA need one device each; this machine has {found} "
                            f"(run fewer processes, or on the CPU: --set model.device=cpu)")
    return "nccl"
