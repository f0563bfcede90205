"""The streaming mode against the object-store mode (`data.mode`, `pipeline/blocks.py`) on a
cluster of a head and two worker nodes simulated on this machine (`ray.cluster_utils.Cluster`,
as `tests/test_nodes_ray.py`; Ray's default node address; the head offers no CPU, so the two
ranks of each job run one per worker node), at two dataset sizes.

Each job is `python -m pipeline train` (2 workers, 3 epochs, an MLP on feature vectors of
`--width` float32: 1 KiB a row at 256) submitted from a subprocess joined to the cluster, as a
user would. While it runs, every node's object-store use is sampled from its raylet (every
0.1 s): the peak is the data the node held. The ranks report what they received of the data
(`data_fetched_mib`: streamed rows, or the blocks the node pulled) and rank 0's peak RSS
(`worker_rss_mib`), and how long the steps and validation waited for rows (`data_wait_s`);
the CPU seconds of the ranks, the BlockServer actors and the raylets of this cluster are
sampled too, from the job's start, and the ranks' by thread (`rank_thread_s`). Each job runs
on a fresh cluster; the modes alternate over `--rounds`. Throughput is the median `samples_per_s` of the
epochs after the first (steady state); the ratio is the median over rounds of streaming over
object-store in the same round.

    python bench/streaming.py [--rows 60000] [--scale 1 10] [--width 256] [--rounds 2]

Prints a table and writes bench/results/streaming.json. The issue's targets, in streaming mode:
per-node resident data <= 0.6 of the dataset; worker RSS growing by no more than its share
(half, with 2 ranks) of the data's growth from 1x to 10x; steady-state throughput >= 0.9x the
object-store mode's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import save  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def dataset(rows: int, width: int, root: Path) -> tuple[Path, int]:
    """Feature vectors with 10 classes, in 8 Parquet files (a folder: Ray Data reads the files
    in parallel tasks, spread over the nodes); and its size in memory."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / f"features-{rows}x{width}"
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, rows)
    centers = rng.normal(size=(10, width)).astype(np.float32)
    x = centers[labels] + rng.normal(scale=2.0, size=(rows, width)).astype(np.float32)
    table = pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)),
                                                                    width),
                      "label": pa.array(labels.astype(np.int64))})
    if not path.exists():
        tmp = Path(tempfile.mkdtemp(dir=root))
        for i, part in enumerate(np.array_split(np.arange(rows), 8)):
            pq.write_table(table.slice(int(part[0]), len(part)), tmp / f"part-{i}.parquet")
        tmp.rename(path)
    return path, table.nbytes


class StoreSampler:
    """Every node's object-store bytes in use, sampled from its raylet; the peak per node."""

    def __init__(self, nodes: list[dict]) -> None:
        from ray._private.internal_api import node_stats

        self.nodes, self.node_stats = nodes, node_stats
        self.peak = {n["NodeID"]: 0 for n in nodes}  # all bytes in use
        self.primary = {n["NodeID"]: 0 for n in nodes}  # primary copies: the node's own
        self.spilled = {n["NodeID"]: 0 for n in nodes}
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (group, CPU seconds so far)
        self.start_cpu: dict[int, float] = {}  # pid -> CPU seconds when the sampling began
        self.sampled = False  # (processes found by the first sample count from then on)
        # the ranks' CPU by thread: (pid, thread id) -> (thread name, CPU seconds so far)
        self.rank_threads: dict[tuple[int, int], tuple[str, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            for n in self.nodes:
                try:
                    reply = self.node_stats(n["NodeManagerAddress"], n["NodeManagerPort"],
                                            include_memory_info=False)
                except Exception:  # a raylet busy or gone for a moment
                    continue
                stats, node = reply.store_stats, n["NodeID"]
                self.peak[node] = max(self.peak[node], stats.object_store_bytes_used)
                self.primary[node] = max(self.primary[node], stats.object_store_bytes_primary_copy)
                self.spilled[node] = max(self.spilled[node], stats.spilled_bytes_total)
            self.sample_cpu()
            time.sleep(0.1)

    def sample_cpu(self) -> None:
        """CPU seconds of the processes that train (the ranks), that serve rows (the
        BlockServer actors) and of Ray's own daemons (raylets: they move objects between
        nodes), by process, since the sampling began (a raylet's start-up before it is not
        counted); the last sample of a process that has exited stands. Only this bench's
        cluster: the processes descending from this one (Cluster's daemons and the workers
        they start), not another Ray on the machine."""
        import psutil

        for proc in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(proc.cmdline())
                group = ("ranks" if "RayTrainWorker" in cmd else
                         "servers" if "BlockServer" in cmd else
                         "raylets" if "raylet" in cmd.split(" ")[0] else None)
                if group is not None:
                    t = proc.cpu_times()
                    seconds = t.user + t.system
                    base = self.start_cpu.setdefault(proc.pid, 0.0 if self.sampled else seconds)
                    self.cpu[proc.pid] = (group, seconds - base)
                    if group == "ranks":
                        self.sample_threads(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.sampled = True

    def sample_threads(self, proc) -> None:
        """A rank's threads' CPU seconds, by name (Linux: /proc/PID/task/TID/comm): where a
        rank's CPU goes -- its main thread (training, the feed) or Ray's own (its client)."""
        for t in proc.threads():
            try:
                with open(f"/proc/{proc.pid}/task/{t.id}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue
            self.rank_threads[(proc.pid, t.id)] = (
                "main" if t.id == proc.pid else name, t.user_time + t.system_time)

    def rank_thread_s(self) -> dict[str, float]:
        """The ranks' CPU seconds (their whole lives) by thread name, summed over ranks and
        threads of one name, largest first."""
        out: dict[str, float] = {}
        for name, seconds in self.rank_threads.values():
            out[name] = out.get(name, 0.0) + seconds
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def cpu_s(self) -> dict[str, float]:
        out = {"ranks": 0.0, "servers": 0.0, "raylets": 0.0}
        for group, seconds in self.cpu.values():
            out[group] += seconds
        return out

    def __enter__(self) -> StoreSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def most(per_node: dict, head: str, data_bytes: int) -> float:
    """The largest of the worker nodes' values, as a share of the data."""
    return max(v for k, v in per_node.items() if k != head) / data_bytes


def job(address: str, tracking: str, path: Path, mode: str, out: Path, epochs: int) -> dict:
    sets = [f"data.path={path}", "data.feature_column=features", "data.label_column=label",
            "data.val_fraction=0.05", f"data.mode={mode}", "model.name=mlp",
            "model.kwargs={hidden: 64}", "train.global_batch_size=256", f"train.epochs={epochs}",
            "train.base_lr=0.01", "train.grad_clip=1.0", "scaling.num_workers=2",
            "tracking.log_model=false",
            f"tracking.uri={tracking}", f"tracking.experiment=streaming-{mode}"]
    args = [sys.executable, "-m", "pipeline", "train", *[a for s in sets for a in ("--set", s)],
            "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "RAY_ADDRESS": address})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} job failed:\n{proc.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text())

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    run = result["mlflow_run_id"]

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run, key),
                                        key=lambda m: m.step)]

    return {"wall_s": wall, "samples_per_s": history("samples_per_s"),
            "epoch_time_s": history("epoch_time_s"),
            "data_fetched_mib": history("data_fetched_mib"),
            "data_wait_s": history("data_wait_s"),
            "worker_rss_mib": history("worker_rss_mib")[-1],
            "val_accuracy": history("val_accuracy")[-1]}


def measure(args: argparse.Namespace, tracking: str, path: Path, mode: str, out: Path) -> dict:
    """One job on a fresh cluster: a node's store keeps the copies an earlier job pulled until
    it needs the room, and they would count as this job's."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": args.store_mib * MiB})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=args.store_mib * MiB)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    head = next(n["NodeID"] for n in nodes if n["Resources"].get("CPU", 0) == 0)
    try:
        with StoreSampler(nodes) as sampler:
            r = job(cluster.address, tracking, path, mode, out, args.epochs)
    finally:
        ray.shutdown()
        cluster.shutdown()
    workers = [k for k in sampler.peak if k != head]
    r.update(node_peak=max(sampler.peak[k] for k in workers),
             node_primary=max(sampler.primary[k] for k in workers),
             head_peak=sampler.peak[head], spilled_mib=sum(sampler.spilled.values()) / MiB,
             cpu_s=sampler.cpu_s(), rank_thread_s=sampler.rank_thread_s(),
             steady=statistics.median(r["samples_per_s"][1:] or r["samples_per_s"]))
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--scale", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--store-mib", type=int, default=1500, help="each node's object store")
    ap.add_argument("--modes", nargs="+", default=["object_store", "streaming"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the modes, alternating")
    ap.add_argument("--out", default=str(RESULTS / "streaming.json"))
    args = ap.parse_args()

    from tests.servers import free_port, start_mlflow_server, stop_mlflow_server

    root = Path(tempfile.mkdtemp(prefix="bench-streaming-"))
    port = free_port()  # several nodes need a tracking server, not a local store
    (root / "mlflow").mkdir()
    server = start_mlflow_server(root / "mlflow", port)
    tracking = f"http://127.0.0.1:{port}"
    rows_out = []
    try:
        for scale in args.scale:
            path, data_bytes = dataset(args.rows * scale, args.width, root)
            for rnd in range(args.rounds):
                for mode in args.modes[:: 1 if rnd % 2 == 0 else -1]:
                    r = measure(args, tracking, path, mode, root / f"{mode}-{scale}-{rnd}")
                    r.update(mode=mode, scale=scale, round=rnd, rows=args.rows * scale,
                             data_mib=data_bytes / MiB)
                    for key in ("node_peak", "node_primary", "head_peak"):
                        r[key + "_share"] = r.pop(key) / data_bytes
                    rows_out.append(r)
                    print(f"{mode:12s} {scale:>3d}x round {rnd}: node peak "
                          f"{r['node_peak_share']:.2f} of the data, {r['steady']:.0f} samples/s, "
                          f"waited {r['data_wait_s']} s, CPU s {r['cpu_s']}; the ranks' "
                          "threads' CPU s: " + ", ".join(
                              f"{k} {v:.1f}" for k, v in list(r["rank_thread_s"].items())[:6]),
                          flush=True)
    finally:
        stop_mlflow_server(server)

    def runs(mode: str, scale: int) -> list[dict]:
        return [r for r in rows_out if r["mode"] == mode and r["scale"] == scale]

    print(f"\n{'mode':12s} {'scale':>5s} {'round':>5s} {'data MiB':>9s} {'node peak':>9s} "
          f"{'primary':>7s} {'head peak':>9s} {'spilled MiB':>11s} {'fetched/epoch MiB':>24s} "
          f"{'wait s/epoch':>12s} {'rank0 RSS':>9s} {'samples/s':>9s}")
    for r in rows_out:
        print(f"{r['mode']:12s} {r['scale']:>4d}x {r['round']:>5d} {r['data_mib']:>9.1f} "
              f"{r['node_peak_share']:>9.2f} {r['node_primary_share']:>7.2f} "
              f"{r['head_peak_share']:>9.2f} {r['spilled_mib']:>11.1f} "
              f"{' / '.join(f'{v:.1f}' for v in r['data_fetched_mib']):>24s} "
              f"{statistics.median(r['data_wait_s']):>12.2f} "
              f"{r['worker_rss_mib']:>9.0f} {r['steady']:>9.0f}")
    summary: dict[str, float] = {}
    for scale in args.scale:
        if len(args.modes) < 2:
            break
        ratios = [s["steady"] / o["steady"] for s, o in zip(
            runs("streaming", scale), runs("object_store", scale), strict=True)]
        summary[f"throughput_ratio_{scale}x"] = statistics.median(ratios)  # target >= 0.9
        summary[f"throughput_ratio_{scale}x_min"] = min(ratios)
        summary[f"throughput_ratio_{scale}x_max"] = max(ratios)
        for mode in args.modes:
            summary[f"node_peak_share_{mode}_{scale}x"] = max(
                r["node_peak_share"] for r in runs(mode, scale))  # target (streaming) <= 0.6
    lo, hi = min(args.scale), max(args.scale)
    if hi > lo:
        growth = runs(args.modes[0], hi)[0]["data_mib"] - runs(args.modes[0], lo)[0]["data_mib"]
        for mode in args.modes:
            rss = (statistics.median(r["worker_rss_mib"] for r in runs(mode, hi))
                   - statistics.median(r["worker_rss_mib"] for r in runs(mode, lo)))
            summary[f"rss_growth_share_{mode}"] = rss / growth  # target (streaming) <= 0.5
    print("\n" + "\n".join(f"{k}: {v:.2f}" for k, v in summary.items()))
    out = Path(args.out)
    save(out, {"measured": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args),
               "runs": rows_out, "summary": summary})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
