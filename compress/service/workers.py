"""`compress workers`: a Prefect work pool and one worker per GPU on this machine.

The deployment `compress-recipe/compress` targets the work pool (created if missing, type process),
so `compress submit` sends runs to it; each worker (compress/service/pool.py) is its own process,
pinned to one GPU with CUDA_VISIBLE_DEVICES, taking one flow run at a time and running it in a child
process with that environment. All of them track in the same MLFLOW_TRACKING_URI. This command
supervises them: a worker that exits is started again, and Ctrl-C (or SIGTERM) stops them all, their
flow runs and the Prefect server it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from compress.errors import CompressError
from compress.stopping import SIGNALS, stop_children

RESTART_DELAY = 5.0  # seconds between a worker's exit and its restart (a crash loop stays slow)


@dataclass(frozen=True)
class Slot:
    """One worker: its name (unique in the pool) and the CUDA_VISIBLE_DEVICES it runs with."""

    name: str
    devices: str


def worker_devices(gpus: str | None, count: int | None, host: str | None = None) -> list[Slot]:
    """The workers `--gpus 0,1` or `--count N` asks for, named after the host so that several hosts
    can share a pool; without GPUs, CUDA_VISIBLE_DEVICES is empty (no GPU visible at all)."""
    host = host or socket.gethostname().split(".")[0]
    if gpus is not None:
        indices = [part.strip() for part in gpus.split(",") if part.strip()]
        if not indices or not all(i.isdigit() for i in indices) or len(set(indices)) != len(indices):
            raise CompressError(f"--gpus {gpus!r}: give distinct GPU indices separated by commas, e.g. 0,1")
        return [Slot(f"{host}-gpu{i}", i) for i in indices]
    if count is None or count < 1:
        raise CompressError("--count must be at least 1")
    return [Slot(f"{host}-cpu{i}", "") for i in range(count)]


def deploy_to_pool(pool: str) -> str:
    """Create the work pool if missing and point the compress deployment at it; its id. The workers
    take only this deployment's flow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    from flows.compress_flow import DEPLOYMENT_NAME, compress_recipe

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
        else:
            if found.type != "process":
                raise CompressError(f"work pool {pool!r} is of type {found.type!r}, not process: choose another with --pool")
    deployment = compress_recipe.to_deployment(name=DEPLOYMENT_NAME)
    return str(deployment.apply(work_pool_name=pool))


def _start(slot: Slot, pool: str, deployment_id: str) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": slot.devices}
    command = [sys.executable, "-m", "compress.service.pool", "--pool", pool, "--name", slot.name, "--deployment-id", deployment_id]
    process = subprocess.Popen(command, env=env)
    print(f"worker {slot.name}: CUDA_VISIBLE_DEVICES={slot.devices!r}, pid {process.pid}", file=sys.stderr)
    return process


def run_workers(slots: list[Slot], pool: str) -> int:
    """Start the service, the pool and the workers; restart a worker that exits; on SIGINT/SIGTERM
    stop everything this process started and return 128 + the signal."""
    from compress.service.prefect import start_service, stop_server

    received: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, stop) for sig in SIGNALS}
    server = None
    try:
        server = start_service(f"work pool {pool!r}: {len(slots)} worker(s)")
        deployment_id = deploy_to_pool(pool)
        processes = {slot: _start(slot, pool, deployment_id) for slot in slots}
        exited: dict[Slot, float] = {}
        while not received:
            time.sleep(0.5)
            for slot, process in processes.items():
                if slot not in exited and process.poll() is not None:
                    print(f"worker {slot.name} exited with code {process.returncode}; restarting in {RESTART_DELAY:.0f} s",
                          file=sys.stderr)
                    exited[slot] = time.monotonic()
                if slot in exited and time.monotonic() - exited[slot] >= RESTART_DELAY and not received:
                    processes[slot] = _start(slot, pool, deployment_id)
                    del exited[slot]
    finally:
        for sig in SIGNALS:  # a second Ctrl-C while stopping changes nothing
            signal.signal(sig, signal.SIG_IGN)
        if received:
            print(f"stopping the workers ({signal.Signals(received[0]).name})", file=sys.stderr)
        stop_children(timeout=30)  # the workers, their flow runs, the Prefect server
        stop_server(server)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + received[0]
