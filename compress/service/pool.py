"""One worker of the compress work pool: Prefect's process worker, locked down for submissions.

A stock process worker runs whatever a flow run's deployment says (its entrypoint, its pull steps,
its command) in an environment and working folder that the flow run's job variables may change; so
anyone who reaches the Prefect API could run code on it, pick its GPU, or point it at other roots or
another tracking store. This one:

- takes only flow runs of the compress deployment it was started for (others stay queued);
- runs only the compress flow of this installation (PREFECT__FLOW_ENTRYPOINT; never the deployment's
  entrypoint or pull steps), with its own command and working folder;
- gives each flow run its own environment, not the job variables: CUDA_VISIBLE_DEVICES, the roots,
  MLFLOW_TRACKING_URI and COMPRESS_SERVED are the worker's.

`compress workers` starts one per GPU (compress/service/workers.py):
    python -m compress.service.pool --pool NAME --name WORKER --deployment-id ID
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import anyio.abc
from prefect.runner._flow_run_executor import FlowRunExecutorContext
from prefect.runner._starter_engine import EngineCommandStarter
from prefect.utilities.processutils import command_to_string
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

WORKER_NAME_VARIABLE = "COMPRESS_WORKER_NAME"  # recorded on each run's MLflow tags (compress.worker)


def flow_entrypoint() -> str:
    """The compress flow of this installation, as the engine loads it (file path:function)."""
    from flows import compress_flow

    return f"{Path(compress_flow.__file__).resolve()}:compress_recipe"


async def _own_flow(flow_run: FlowRun) -> Any:
    """The flow for Prefect's crash and cancellation hooks: ours, never loaded from the deployment."""
    from flows.compress_flow import compress_recipe

    return compress_recipe


class PinnedJobConfiguration(ProcessJobConfiguration):
    """A flow run's process: the worker's environment, command and folder, whatever its job variables say."""

    def prepare_for_flow_run(self, flow_run: FlowRun, deployment: Any = None, flow: Any = None, work_pool: Any = None,
                             worker_name: str | None = None, worker_id: Any = None) -> None:
        super().prepare_for_flow_run(flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id)
        prefect_env = {**self._base_environment(), **self._base_flow_run_environment(flow_run),
                       **self._base_attribution_environment(flow_run=flow_run, deployment=deployment, flow=flow,
                                                            worker_id=worker_id, worker_name=worker_name)}
        self.env = {**os.environ, **{k: v for k, v in prefect_env.items() if v is not None},
                    "PREFECT__FLOW_ENTRYPOINT": flow_entrypoint()}
        self.command = command_to_string([sys.executable, "-m", "prefect.engine"])
        self._command_configured = True
        self.working_dir = Path.cwd()


class PinnedWorker(ProcessWorker):
    """Prefect's process worker, taking only `deployment_id`'s flow runs, each with PinnedJobConfiguration."""

    job_configuration = PinnedJobConfiguration

    @classmethod
    def __dispatch_key__(cls) -> str:
        return "compress-process"  # registered apart: Prefect's own "process" worker stays what `prefect worker` starts

    def __init__(self, *args: Any, deployment_id: UUID, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deployment_id = deployment_id

    async def _get_scheduled_flow_runs(self) -> list[Any]:
        runs = await super()._get_scheduled_flow_runs()
        return [entry for entry in runs if entry.flow_run.deployment_id == self._deployment_id]

    async def run(self, flow_run: FlowRun, configuration: ProcessJobConfiguration,
                  task_status: anyio.abc.TaskStatus[int] | None = None) -> ProcessWorkerResult:
        """ProcessWorker.run with the configured command only, and our flow for the hooks."""
        if not isinstance(configuration, PinnedJobConfiguration):  # never run an unpinned configuration
            raise RuntimeError("a compress worker runs only pinned job configurations")
        task_status = task_status or anyio.TASK_STATUS_IGNORED
        execution = None
        with tempfile.TemporaryDirectory(suffix="prefect") as scratch, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            async with FlowRunExecutorContext() as ctx:
                starter = EngineCommandStarter(command=configuration.command, cwd=Path(configuration.working_dir or scratch).resolve(),
                                               env=configuration.env, stream_output=configuration.stream_output,
                                               control_channel=ctx.control_channel)
                executor = ctx.create_executor(flow_run, starter, resolve_flow=_own_flow, propose_submitting=False)

                async def execute(*, task_status: anyio.abc.TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
                    nonlocal execution
                    execution = await executor.submit(task_status=task_status)

                async with anyio.create_task_group() as group:
                    handle = await group.start(execute)
                    if handle.pid is None:
                        raise RuntimeError("Flow run process has no PID")
                    task_status.started(handle.pid)
        if execution is None or execution.status_code is None:
            raise RuntimeError("Failed to start flow run process.")
        return ProcessWorkerResult(status_code=execution.status_code, identifier=str(execution.handle.pid))


def main(argv: list[str] | None = None) -> None:
    """Run one pinned worker until it is stopped (its environment is the one its flow runs get)."""
    parser = argparse.ArgumentParser(prog="python -m compress.service.pool")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--deployment-id", required=True, type=UUID)
    args = parser.parse_args(argv)
    os.environ[WORKER_NAME_VARIABLE] = args.name
    worker = PinnedWorker(work_pool_name=args.pool, name=args.name, limit=1, deployment_id=args.deployment_id,
                          create_pool_if_not_found=False)
    try:
        anyio.run(worker.start)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
