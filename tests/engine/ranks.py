"""Run a function on N real processes joined by torch.distributed (gloo), as DDP ranks.

Teardown is the part that matters. A rank that destroys its gloo process group while a peer
still holds its end -- after DDP has run collectives on it -- can abort the process with
"terminate called without an active exception" (SIGABRT from gloo's C++ side). Measured
here with torch 2.13 on CPU: one DDP step, then rank 1 waits 0.5 s before
`destroy_process_group`: rank 0 aborted in 2 of 12 runs; with no DDP (a bare all-reduce) 0 of
12; with a barrier before the destroy 0 of 15. The old harness let rank 0 write its result
file while rank 1 was already tearing down, so it failed in about half of the runs.

So every rank returns its result, rank 0 writes it, and all ranks meet at a barrier before
they destroy the group together. Ray Train does the same by construction: `ray.train.report`
is a barrier and the worker group is torn down after every worker has returned.

That made it rare, not impossible: in a CI run of 2026-11-29 a rank of the auto micro-batch
test (out of memory on one rank) still aborted with the same bare message, once in about ten
CI runs, and 80 runs of that test here did not show it again. So each rank also collects its
garbage (DDP reducers kept alive by an exception's traceback hold the group) before the
barrier, and marks that it passed the barrier; an abort after every rank has passed it and the
results are written is teardown, outside what the tests check: it is reported as a warning and
the results are used. An abort before that still fails the test.
"""

from __future__ import annotations

import gc
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str, fn: Callable[..., Any],
               args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        gc.collect()  # what still holds the group (a DDP reducer in a traceback's cycle) goes now
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            torch.save(gathered, out)
        dist.barrier()  # nobody tears down while a peer is still working
        Path(f"{out}.passed{rank}").touch()
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """`[fn(rank, world, *args) for rank in range(world)]`, each on its own gloo process.

    `fn` must be importable (a module-level function) and its result picklable.
    """
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "results.pt")
        try:
            mp.spawn(_rank_main, args=(world, _free_port(), out, fn, args), nprocs=world,
                     join=True)
        except mp.ProcessExitedException as err:
            if not all(Path(f"{out}.passed{r}").exists() for r in range(world)):
                raise
            warnings.warn(f"gloo teardown after every rank finished: {err}", stacklevel=2)
        return torch.load(out, weights_only=False)
