"""The batches ranks draw in the streaming mode, through the real fetch (`pipeline/blocks.py`):
joined to the cluster at ADDRESS, ingest the digits in the streaming mode, run WORLD ranks as
Ray tasks spread over the nodes, and print, as JSON, every step's global batch as the ranks
collated it (sample ids in rank order) with a digest of each row's features as gathered, and
the nodes the ranks ran on. `tests/test_nodes_ray.py` compares 1 and 2 ranks on 1 and 2 nodes.

    python -m tests.stream_probe ADDRESS WORLD [MODE]   (MODE: data.mode, streaming by default)
"""

from __future__ import annotations

import json
import sys

import numpy as np
import ray

SETS = ["batching.strategy=stratified", "train.global_batch_size=64",
        "train.micro_batch_size=16", "train.epochs=2"]


def row_digest(features: np.ndarray) -> str:
    """A row's features, as float32 bytes, digested: each id's own row, not a step's sum."""
    import hashlib

    return hashlib.blake2b(np.ascontiguousarray(features, np.float32).tobytes(),
                           digest_size=8).hexdigest()


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def rank_batches(cfg_dict: dict, blocks, rank: int, world: int) -> dict:
    from pipeline.blocks import load_rows
    from pipeline.config import Config
    from pipeline.data.batches import split_train_val
    from pipeline.data.feed import RankFeed

    cfg = Config.model_validate(cfg_dict)
    st, streamed, _ = load_rows(cfg, blocks, rank, world)
    train, _ = split_train_val(len(st), st.labels, cfg.data.val_fraction, cfg.data.split_seed)
    feed = RankFeed(cfg, st, train, rank, world, streamed=streamed)
    steps = []
    for epoch in range(cfg.train.epochs):
        _, it = feed.epoch(epoch, lambda: 1)
        for step in it:
            ids, rows = [], []
            for part in step.micro(16):
                nb = feed.collate(part, (0, epoch, 0), step.rows)
                ids += nb["sample_id"].tolist()
                rows += [row_digest(r) for r in np.asarray(nb["features"]).reshape(len(part), -1)]
            steps.append({"ids": ids, "rows": rows})
    return {"node": ray.get_runtime_context().get_node_id(), "steps": steps,
            "fetched": streamed.fetched_bytes if streamed is not None else 0}


def file_reads_elsewhere() -> list[str]:
    """The tasks that read a Parquet file (Ray Data's reads and its file sampling) on another
    node than this driver's: the embedded dataset's file is on the driver's machine alone."""
    from ray.util.state import list_tasks

    here = ray.get_runtime_context().get_node_id()
    return sorted({t.name for t in list_tasks(detail=True, limit=10_000)
                   if ("ReadParquet" in t.name or "parquet_file_info" in t.name)
                   and t.node_id not in (None, here)})


def main(address: str, world: int, mode: str = "streaming") -> None:
    from pipeline.blocks import ingest
    from pipeline.config import load_config
    from pipeline.data.datasets import resolve

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    cfg, info = resolve(load_config(None, [*SETS, f"scaling.num_workers={world}",
                                           f"data.mode={mode}"]))
    blocks = ingest(info, cfg)
    ranks = ray.get([rank_batches.remote(cfg.to_dict(), blocks, r, world) for r in range(world)])
    steps = [{"ids": [i for r in ranks for i in r["steps"][s]["ids"]],
              "rows": [d for r in ranks for d in r["steps"][s]["rows"]]}
             for s in range(len(ranks[0]["steps"]))]
    print(json.dumps({"steps": steps, "nodes": [r["node"] for r in ranks],
                      "file_reads_elsewhere": file_reads_elsewhere(),
                      "block_nodes": sorted(set(blocks.nodes) - {None}),
                      "fetched": [r["fetched"] for r in ranks], "rows": info.num_rows}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
