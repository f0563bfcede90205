"""Overhead of measuring the gradient noise scale, as a ratio to the same step without it.

The measurement rides on gradients the step computes anyway (`pipeline/engine/noise.py`):
- one worker with accumulation: the squared norm of the gradient after the first micro-step;
- several workers: a DDP communication hook sums each bucket's squared norm before the
  all-reduce; one more scalar rides on the step's existing loss all-reduce.
Both paths run here side by side with the same step without measurement (`measure_noise=False`,
no hook), on `digits_cnn` (global batch 128 in micro-batches of 32) through the engine's real
`train_step`: one process, and 2 gloo ranks (real DDP). Each round times `--steps` steps of each
variant, the starting variant alternating; the ratio is the median over rounds of
(with / without) in the same round, so machine noise hits both.

    python bench/noise_overhead.py            # prints a table, writes bench/results/noise_overhead.json

No timing is asserted anywhere; the goal (issue 10) is <= 1.05.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.record import save  # noqa: E402
from pipeline.engine.models import build_model  # noqa: E402
from pipeline.engine.noise import attach_local_norm  # noqa: E402
from pipeline.engine.step import train_step  # noqa: E402

BATCH, MICRO = 128, 32


def _model(ddp: bool, hook: bool):
    torch.manual_seed(0)
    m = build_model("digits_cnn", input_dim=64, num_outputs=10, vocab_size=None)
    probe = None
    if ddp:
        m = torch.nn.parallel.DistributedDataParallel(m)
        probe = attach_local_norm(m) if hook else None
    return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), probe


def _time(model, opt, probe, measure: bool, batches, steps: int) -> float:
    start = time.perf_counter()
    for i in range(steps):
        train_step(model, opt, batches[i % len(batches)], loss="cross_entropy",
                   noise_probe=probe, measure_noise=measure)
    return (time.perf_counter() - start) / steps


def _batches(per_rank: int):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(4):
        x, y = torch.randn(per_rank, 64, generator=g), torch.randint(0, 10, (per_rank,), generator=g)
        out.append([{"features": x[i : i + MICRO], "label": y[i : i + MICRO]}
                    for i in range(0, per_rank, MICRO)])
    return out


def compare(ddp: bool, rounds: int, steps: int) -> dict:
    per_rank = BATCH // (dist.get_world_size() if ddp else 1)
    batches = _batches(per_rank)
    plain, measured = _model(ddp, hook=False), _model(ddp, hook=True)
    for m in (plain, measured):  # warm up
        _time(*m, measure=m is measured, batches=batches, steps=3)
    ratios, t_plain, t_meas = [], [], []
    for r in range(rounds):
        order = [(plain, False), (measured, True)][:: 1 if r % 2 == 0 else -1]
        times = {flag: _time(*m, measure=flag, batches=batches, steps=steps) for m, flag in order}
        if ddp:  # the slower rank sets the pace
            t = torch.tensor([times[False], times[True]], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times = {False: float(t[0]), True: float(t[1])}
        t_plain.append(times[False])
        t_meas.append(times[True])
        ratios.append(times[True] / times[False])
    return {"variant": "2 gloo ranks, DDP hook" if ddp else "1 process, 4 micro-batches",
            "ms_without": 1e3 * statistics.median(t_plain), "ms_with": 1e3 * statistics.median(t_meas),
            "ratio": statistics.median(ratios), "rounds": rounds, "steps_per_round": steps}


def _rank(rank: int, port: int, rounds: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        res = compare(True, rounds, steps)
        if rank == 0:
            torch.save(res, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    rows = [compare(False, args.rounds, args.steps)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:  # rank 0's row, handed back (gone after)
        tmp = Path(folder) / "noise_ddp.pt"
        mp.spawn(_rank, args=(port, args.rounds, args.steps, str(tmp)), nprocs=2, join=True)
        rows.append(torch.load(tmp, weights_only=True))  # plain numbers and strings
    print(f"{'variant':32} {'ms/step without':>16} {'ms/step with':>13} {'ratio':>7}")
    for r in rows:
        print(f"{r['variant']:32} {r['ms_without']:16.2f} {r['ms_with']:13.2f} {r['ratio']:7.3f}")
    save(Path(__file__).parent / "results" / "noise_overhead.json",
               {"benchmark": "noise_overhead", "model": "digits_cnn", "global_batch": BATCH,
                "micro_batch": MICRO, "date": time.strftime("%Y-%m-%d"),
                "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
