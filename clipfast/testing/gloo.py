"""A gloo process-group launcher for distributed tests and benchmarks on one machine, no GPU needed."""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo(worker, world_size: int, args: tuple = (), timeout: float = 180.0) -> None:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` fresh processes that share a gloo process
    group on 127.0.0.1 (a free port), and wait at most ``timeout`` seconds. The group is created before
    and destroyed after ``worker``. Any failure or the timeout raises here; processes are always
    terminated. ``worker`` must be importable by module name (spawned processes unpickle it)."""
    context = mp.start_processes(_gloo_entry, args=(worker, world_size, free_port(), args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} gloo processes did not finish within {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


def _gloo_entry(rank, worker, world_size, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # W processes share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
