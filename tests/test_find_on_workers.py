"""`find-batch-size --on-workers`: the search on the cluster's Ray Train workers (the
session's local cluster), every rank trying the same size and the ranks agreeing on each.
Issue #10: "the answer is the minimum over ranks, agreed collectively, so one rank's OOM never
leaves another waiting in a collective" -- here through the command a user runs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, cli_in_process, run_cli

pytestmark = pytest.mark.ray

DIGITS = str(REPO / "jobs" / "configs" / "digits.yaml")


def _find(tmp_path, capsys, monkeypatch, name: str, *args: str) -> tuple[int, str, dict]:
    out = tmp_path / name
    rc, stdout, stderr = cli_in_process(["find-batch-size", "--config", DIGITS, *args,
                                         "--out", str(out)], capsys, monkeypatch)
    found = out / "find_batch_size.json"
    return rc, stdout + stderr, json.loads(found.read_text()) if found.exists() else {}


def test_ranks_out_of_memory_at_different_sizes_agree_on_the_smaller(ray_client, tmp_path,
                                                                     capsys, monkeypatch):
    """Rank 0 runs out of memory above 100 samples, rank 1 above 60: both answer 60, no rank
    hangs, and the sizes rank 0 fitted alone are marked as another rank's; in this process
    (one rank, limit 100) the same command answers 100."""
    model = ["--set", "model.name=import:tests.builders:oom_above_for_rank",
             "--set", "model.kwargs.limits=100,60", "--set", "scaling.num_workers=2"]
    rc, said, found = _find(tmp_path, capsys, monkeypatch, "workers", *model, "--on-workers")
    assert rc == 0, said[-3000:]
    assert found["max_micro_batch_size"] == 60 and found["ranks"] == 2
    tried = {t["micro_batch_size"]: t for t in found["trials"]}
    assert tried[60]["fits"] and not tried[61]["fits"]
    assert max(tried) == 64  # the doubling stops where any rank failed
    assert tried[61]["note"] == tried[64]["note"] == "another rank did not fit"  # rank 0's fit
    assert said.count("largest micro-batch that fits: 60") == 1
    rc, said, here = _find(tmp_path, capsys, monkeypatch, "here", *model)
    assert rc == 0 and here["max_micro_batch_size"] == 100 and here["ranks"] == 1


def test_on_workers_measures_what_one_process_measures(ray_cluster, tmp_path, capsys,
                                                       monkeypatch):
    """digits_cnn within a 16 MiB budget: the workers (2, each with DDP's gradient buckets
    counted) find the boundary one process finds -- the step's peak tensor memory does not
    depend on where it runs; the table shows once on the console (rank 0's, as it fills),
    not once per rank, nor twice (Ray Train's patched print)."""
    budget = ["--max-memory", "16MiB"]
    run = run_cli("find-batch-size", "--config", DIGITS, *budget, "--on-workers",
                  "--out", str(tmp_path / "workers"), env={"RAY_ADDRESS": ray_cluster["address"]})
    assert run.returncode == 0, run.stderr[-3000:]
    said = run.stdout + run.stderr
    workers = json.loads((tmp_path / "workers" / "find_batch_size.json").read_text())
    rc, _, here = _find(tmp_path, capsys, monkeypatch, "here", *budget)
    assert rc == 0
    assert workers["max_micro_batch_size"] == here["max_micro_batch_size"] > 0
    assert [t["micro_batch_size"] for t in workers["trials"]] == \
        [t["micro_batch_size"] for t in here["trials"]]
    assert [t["peak_memory_bytes"] for t in workers["trials"]] == \
        [t["peak_memory_bytes"] for t in here["trials"]]
    assert workers["suggestion"] == here["suggestion"] and workers["ranks"] == 2
    assert said.count(f"largest micro-batch that fits: {here['max_micro_batch_size']}") == 1
    assert sum(line.split()[:2] == ["1", "yes"] for line in said.splitlines()) == 1, said
