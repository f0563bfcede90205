"""The gloo harness (`tests/engine/ranks.py`): a rank that aborts after every rank finished and
the results were written is gloo's teardown (a warning, the results kept); a rank that aborts
before that fails the run."""

from __future__ import annotations

import atexit
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.engine.ranks import run_ranks


def _sum_rank(rank: int, world: int, abort: str) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    if rank == 1 and abort == "at exit":
        atexit.register(os.abort)  # after the barrier and destroy_process_group: teardown
    if rank == 1 and abort == "before the end":
        os.abort()
    return float(t)


@pytest.mark.timeout(120)
def test_an_abort_at_teardown_keeps_the_results_with_a_warning():
    with pytest.warns(UserWarning, match="gloo teardown after every rank finished"):
        assert run_ranks(_sum_rank, 2, "at exit") == [3.0, 3.0]


@pytest.mark.timeout(120)
def test_an_abort_before_every_rank_finished_fails():
    with pytest.raises(mp.ProcessExitedException):
        run_ranks(_sum_rank, 2, "before the end")
