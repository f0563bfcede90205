"""Steady-state training throughput: the pipeline (1 Ray Train worker) vs a bare PyTorch loop.

Both train the same model (digits_cnn) on the same tensors (the digits training split) with the
same global batch, optimizer and thread count, in the same run, `--repeats` times (who goes
first rotates) so machine noise hits both. A third variant, the engine's own loop
(`train_epoch`) in this process on the bare loop's batches, splits the gap: the engine's cost
per step against what Ray, the data feed and logging add. Steady state = epochs 2.. (epoch 1 pays for
start-up). The pipeline's per-epoch samples/s are read back from its MLflow run.

    python bench/throughput.py [--epochs 6] [--batch 64] [--repeats 3]

Prints a table and writes bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import save  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.batches import SampleTable, split_train_val  # noqa: E402
from pipeline.data.datasets import resolve  # noqa: E402
from pipeline.engine.models import build_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def bare_loop(x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch: int, lr: float,
              threads: int) -> list[float]:
    """The plainest correct loop: shuffled index batches, forward, backward, SGD step."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("digits_cnn", input_dim=64, num_outputs=10, vocab_size=None)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    rates = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        n_batches = len(x) // batch
        start = time.perf_counter()
        for i in range(n_batches):
            idx = perm[i * batch : (i + 1) * batch]
            loss = torch.nn.functional.cross_entropy(model({"features": x[idx]}), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(n_batches * batch / (time.perf_counter() - start))
    return rates


def engine_loop(x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch: int, lr: float,
                threads: int) -> list[float]:
    """The pipeline's own training loop (`pipeline.engine.loop.train_epoch`, seeded per step,
    the loss and gradient norm read back every step) on the bare loop's batches, in this
    process: what the engine costs per step, without Ray, the data feed or logging."""
    from pipeline.engine.loop import LoopState, train_epoch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("digits_cnn", input_dim=64, num_outputs=10, vocab_size=None)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    state = LoopState(micro_batch_size=batch)
    rates = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        steps = [(lambda size, idx=perm[i * batch : (i + 1) * batch]:
                  [{"features": x[idx], "label": y[idx]}]) for i in range(len(x) // batch)]
        state.epoch = epoch
        metrics = train_epoch(model, opt, steps, state, lr_fn=lambda step: lr,
                              loss="cross_entropy", seed=0)
        rates.append(len(steps) * batch / metrics["epoch_time_s"])
    return rates


def pipeline_run(cfg, info, out: Path) -> list[float]:
    from mlflow.tracking import MlflowClient

    from pipeline.launch import run_training

    summary = run_training(cfg, info, out)
    hist = MlflowClient(summary["tracking_uri"]).get_metric_history(summary["mlflow_run_id"],
                                                                    "samples_per_s")
    return [m.value for m in sorted(hist, key=lambda m: m.step)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)  # (the 3 arms each first once)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    cfg = load_config(None, [
        "scaling.num_workers=1", f"train.epochs={args.epochs}",
        f"train.global_batch_size={args.batch}", "train.micro_batch_size=null",
        "train.base_lr=0.05", f"train.base_batch_size={args.batch}", "tracking.log_model=false",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.experiment=bench-throughput"])
    cfg, info = resolve(cfg)
    import pyarrow.parquet as pq

    st = SampleTable.from_table(pq.read_table(info.uri), feature_column="features",
                                label_column="label")
    train_pos, _ = split_train_val(len(st), st.labels, cfg.data.val_fraction, cfg.data.split_seed)
    x = torch.from_numpy(st.features[train_pos])
    y = torch.from_numpy(st.labels[train_pos])
    threads = int(cfg.scaling.cpus_per_worker)  # Ray sets OMP_NUM_THREADS to the worker's CPUs
    rows = []
    kw = dict(epochs=args.epochs, batch=args.batch, lr=0.05, threads=threads)

    def run(name: str, r: int) -> list[float]:
        if name == "pipeline":
            return pipeline_run(cfg, info, tmp / f"run{r}")
        return (engine_loop if name == "engine" else bare_loop)(x, y, **kw)

    runs = ["pipeline", "engine", "bare"]
    for r in range(args.repeats):
        order = runs[r % 3:] + runs[: r % 3]  # who goes first rotates (the load drifts)
        got = {name: run(name, r) for name in order}
        rows.append({"repeat": r, "order": order,
                     **{name: statistics.median(got[name][1:]) for name in runs},
                     **{f"{name}_epochs": got[name] for name in runs}})
    ratio = statistics.median(row["pipeline"] / row["bare"] for row in rows)
    engine = statistics.median(row["engine"] / row["bare"] for row in rows)
    print(f"{'repeat':>6} {'pipeline samples/s':>19} {'engine samples/s':>17} "
          f"{'bare samples/s':>15} {'pipeline/bare':>14} {'engine/bare':>12}")
    for row in rows:
        print(f"{row['repeat']:>6} {row['pipeline']:>19.0f} {row['engine']:>17.0f} "
              f"{row['bare']:>15.0f} {row['pipeline'] / row['bare']:>14.3f} "
              f"{row['engine'] / row['bare']:>12.3f}")
    print(f"median pipeline/bare ratio (steady state, epochs 2..{args.epochs}): {ratio:.3f} "
          f"(goal >= 0.9); the engine's loop alone: {engine:.3f}")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "throughput", "model": "digits_cnn", "global_batch": args.batch,
           "workers": 1, "threads": threads, "epochs": args.epochs, "ratio": ratio,
           "engine_ratio": engine,
           "rows": rows, "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M")}
    save(RESULTS / "throughput.json", out)
    print(f"wrote {RESULTS / 'throughput.json'}")
    np.set_printoptions(precision=0)


if __name__ == "__main__":
    main()
