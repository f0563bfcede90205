"""The dataset in Ray's object store, and how a rank gets its rows from it (Ray lives here).

Ray Data reads the Parquet data into Arrow blocks (`ingest`). Then, by `data.mode`:

- **object_store** (data that fits): the blocks are joined into one table at ingest
  (`one_block`); every rank `ray.get`s it (zero-copy from its node's object store) and gathers
  its batches from it, its columns mapped without a copy. Fastest for many epochs over a small
  table; on N nodes every node pulls the whole dataset.
- **streaming** (data that outgrows a node): the blocks are spread evenly over the nodes that
  train (a block a node holds beyond its share is moved to the node holding least), and each
  rank holds only the small columns the planners need (`small_columns`: ids, labels, lengths,
  difficulty). The large columns of the rows of its next steps come from `BlockFetch`: one call
  to the `BlockServer` actor of each node holding some of them takes the rows from its blocks,
  so a node holds its share of the dataset and receives only its ranks' rows (the next two
  chunks are asked for while one trains: `pipeline/data/rows.py`).
- **auto**: streaming on a cluster of several nodes that train when the data (Parquet's
  uncompressed size) fills more than a quarter of the smallest one's object store.

A node lost in the streaming mode takes its blocks and its server with it. A `BlockKeeper` (an
actor of no CPU on the head node) knows where every block is served from and which rows of
the Parquet data it holds; when a rank starts (the worker group Ray Train restarts after the
loss) it asks the keeper, which has the lost blocks read again from the Parquet data on the nodes
that train, each block to the one holding fewest (a replacement node first), before it
answers -- from the same files (`data_files`: paths, sizes and row counts as at ingest, and
a store's modification times), or a data error saying what changed.

Both modes build the same plans from the same small columns, and gather the same rows: the
batches, hence the training, are the same (`tests/test_nodes_ray.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import console
from pipeline.config import Config, ConfigError
from pipeline.data.batches import SampleTable, one_array
from pipeline.data.datasets import DatasetInfo, embedded_name, files_changed
from pipeline.data.rows import Fetch, LargeColumns, StreamedRows, scatter_rows, take_rows
from pipeline.redact import redact_text

CHUNK_BYTES = 6 << 20  # the streaming mode's fetches: about this much per call (bench/README.md)
STREAM_SHARE = 0.25  # auto: stream when the data fills more than this share of a node's store
LENGTH = "__length"  # the small columns' token count per sequence


@contextmanager
def config_errors_as_raised() -> Iterator[None]:
    """A ConfigError raised in a Ray task or actor call re-raised as itself: its one line, not
    Ray's traceback (whose RayTaskError is a ConfigError too)."""
    try:
        yield
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, ConfigError):
            raise err.cause from None
        raise


class DataLostError(RuntimeError):
    """A node holding part of the dataset in the streaming mode is gone: its blocks and its
    server with it. Raised in the rank, which fails; Ray Train restarts the worker group (up to
    `scaling.max_failures`), whose ranks find the lost blocks read again (`BlockKeeper`)."""


DATA_LOST = "data lost: a node holding part of the dataset is gone"


def _lost(err: Exception) -> DataLostError:
    return DataLostError(f"{DATA_LOST} (data.mode=streaming; {type(err).__name__})")


@contextmanager
def _servers_kept() -> Iterator[None]:
    """Reading what a BlockServer made: its loss is the dataset's (DataLostError)."""
    try:
        yield
    except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as err:
        raise _lost(err) from None


@dataclass
class Blocks:
    """What a job's ranks receive: the blocks (in row order) and, in the streaming mode, where
    each one is, its row count and its small columns."""

    mode: str
    refs: list[Any]
    size_bytes: int = 0
    rows: list[int] = field(default_factory=list)
    nodes: list[str | None] = field(default_factory=list)
    small: list[Any] = field(default_factory=list)
    servers: dict[str, Any] = field(default_factory=dict)  # node -> its BlockServer actor
    moved: int = 0  # blocks moved at ingest to even the nodes out
    keeper: Any = None  # the BlockKeeper actor (streaming mode): servers, nodes, small, now
    feature_width: int | None = None  # the features' D (streaming mode: `LargeColumns`)

    def current(self) -> Blocks:
        """These blocks as they are served now: the keeper's view, after it has read again
        the blocks of any node lost since (the object-store mode: as they are)."""
        if self.keeper is None:
            return self
        with _servers_kept():  # the keeper lives on the head node
            with config_errors_as_raised():  # (the data changed since ingest)
                servers, nodes, small, note = ray.get(self.keeper.current.remote())
        if note:
            console.say(note)
        return dataclasses.replace(self, servers=servers, nodes=nodes, small=small)

    def release(self) -> None:
        """End the streaming mode's actors -- the keeper and every server it holds -- and with
        them the dataset's share each node kept (the object-store mode has none: its blocks go
        with the last reference). For whoever ingested, once its job or sweep is over: a
        submitted job's driver takes them along when it exits, a notebook's would not."""
        if self.keeper is None or not ray.is_initialized():  # (Ray shut down: gone with it)
            return
        servers = list(self.servers.values())
        try:
            servers += ray.get(self.keeper.serving.remote(), timeout=3)  # (`ray job stop`
            # kills 3 s after its SIGTERM; the keeper's own servers go with it anyway)
        except Exception:  # the keeper gone (its node), or not answering: those known here
            pass
        for actor in [*servers, self.keeper]:
            _kill(actor)

    def lost_nodes(self, timeout_s: float = 60) -> list[str]:
        """The nodes whose part of the dataset is gone now (none in the object-store mode); a
        server that does not answer within `timeout_s` counts as gone."""
        if self.keeper is None:
            return []
        try:
            return ray.get(self.keeper.lost.remote(timeout_s), timeout=timeout_s + 5)
        except ray.exceptions.GetTimeoutError:  # the keeper itself not answering
            return []
        except ray.exceptions.RayActorError:  # the keeper's own node (the head) is gone
            return list(self.servers)


def can_host_a_rank(resources: dict[str, float], cpus_per_worker: float, use_gpu: bool) -> bool:
    """Whether a node with these resources can run a rank (`scaling.cpus_per_worker` CPUs, and a
    GPU under `scaling.use_gpu`): a CPU-only head trains nothing in a GPU job, so it holds no
    streamed blocks and does not count towards the nodes that decide `auto`.

    >>> head, gpu_node = {"CPU": 4.0}, {"CPU": 8.0, "GPU": 1.0}
    >>> can_host_a_rank(head, 1, True), can_host_a_rank(gpu_node, 1, True)
    (False, True)
    >>> can_host_a_rank(head, 1, False), can_host_a_rank({"CPU": 0.0}, 0.5, False)
    (True, False)
    """
    cpus = resources.get("CPU", 0)
    return cpus > 0 and cpus >= cpus_per_worker and (resources.get("GPU", 0) >= 1 or not use_gpu)


def training_nodes(cfg: Config) -> list[dict[str, Any]]:
    """The alive nodes a rank of `cfg` can run on (`can_host_a_rank`)."""
    return [n for n in ray.nodes() if n.get("Alive") and can_host_a_rank(
        n["Resources"], cfg.scaling.cpus_per_worker, cfg.scaling.use_gpu)]


WIDTH = {"BOOLEAN": 1, "INT32": 4, "FLOAT": 4, "INT64": 8, "DOUBLE": 8, "INT96": 12}


def used_columns(cfg: Config) -> list[str]:
    """The columns a job of `cfg` reads: what ingest takes into the object store (a column
    nothing names -- raw text, images -- stays in the files)."""
    return list(dict.fromkeys([*large_columns(cfg).names(), *_small_names(cfg)]))


def parquet_files(uri: str) -> tuple[list[str], Any]:
    """The dataset's files with rows as the driver's checks list them (pyarrow's discovery:
    every file but `_` and `.` names, in its order), and their filesystem. Ray Data reads
    exactly these: its own listing keeps only `*.parquet` files and skips `_` names at the top
    alone, so it read other rows than the driver checked and the keeper reads again on a lost
    node. Files without rows are left out (they hold no row, so no position moves): Ray Data
    takes the columns from its first file, and an empty first file without a column the
    checks found in the files with rows made every block lack it."""
    ds = pads.dataset(uri, format="parquet")
    with_rows = [f.path for f in ds.get_fragments() if f.metadata.num_rows]
    return with_rows or list(ds.files), ds.filesystem


def data_files(uri: str) -> list[tuple[str, int, int, int | None]]:
    """(path, bytes, rows, modified) of each file of the dataset, from the listing and the
    footers: what the streaming mode's keeper compares before it reads a lost node's blocks
    again (a block is the rows from a dataset row position on: another file listed, one grown
    or cut, or one written again in place with the same size and rows would give it other
    rows). `modified` (ns) for a store's URI (s3://, gs://: one object, one time); None for a
    local file (a path or file://), which each node may hold a copy of, written at its own
    time (a rewrite in place of the same size and rows goes unseen there)."""
    return _footers(uri)[0]


def _footers(uri: str) -> tuple[list[tuple[str, int, int, int | None]], list[pq.FileMetaData]]:
    """`data_files` and each file's footer, from one listing and one read of each footer."""
    ds = pads.dataset(uri, format="parquet")
    fragments = list(ds.get_fragments())
    infos = ds.filesystem.get_file_info([f.path for f in fragments])
    metas = [f.metadata for f in fragments]
    store = _one_modified_time(ds.filesystem)
    return ([(f.path, int(info.size), int(m.num_rows), info.mtime_ns if store else None)
             for f, info, m in zip(fragments, infos, metas, strict=True)], metas)


def _one_modified_time(filesystem: Any) -> bool:
    """Whether a file's modification time is one for every node: a store's (s3://, gs://),
    not a local file's (a path or file://), which each node's copy may hold its own of."""
    import pyarrow.fs as pafs

    return not isinstance(filesystem, pafs.LocalFileSystem)


def _read(uri: str, **kwargs: Any) -> Any:
    """`ray.data.read_parquet` over the files `parquet_files` lists. An embedded dataset's
    file is on the driver's machine alone (a cluster's head, which may offer no CPU to a read
    task): the driver reads it (a few MB) and hands it to Ray Data, in `override_num_blocks`
    blocks where given."""
    if embedded_name(uri) is not None:
        ds = ray.data.from_arrow(pq.read_table(uri, columns=kwargs.get("columns")))
        blocks = kwargs.get("override_num_blocks")
        return ds.repartition(blocks) if blocks else ds
    files, fs = parquet_files(uri)
    return ray.data.read_parquet(files, filesystem=fs, file_extensions=None, **kwargs)


def parquet_bytes(uri: str, columns: list[str] | None = None) -> int:
    """The dataset's size in memory (Arrow), estimated from the Parquet footers alone: each
    column chunk's value count times its type's width (strings: their uncompressed size); only
    `columns` (top-level names) when given. Parquet's own sizes are encoded (dictionaries, run
    lengths) and can be 5x smaller."""
    return _memory_bytes(_footers(uri)[1], columns)


def _memory_bytes(metas: list[pq.FileMetaData], columns: list[str] | None) -> int:
    """`parquet_bytes` of the files whose footers are `metas`."""
    total = 0
    for meta in metas:
        owner = _leaf_fields(meta.schema.to_arrow_schema())  # a leaf column's top-level field
        if len(owner) != meta.num_columns:  # (a type whose leaves this does not know: every
            owner = [None] * meta.num_columns  # column counts, more than is read, never less)
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            for j in range(group.num_columns):
                col = group.column(j)
                if columns is not None and owner[j] is not None and owner[j] not in columns:
                    continue
                width = WIDTH.get(col.physical_type)
                total += col.num_values * width if width else col.total_uncompressed_size
    return total


def _leaf_fields(schema: pa.Schema) -> list[str]:
    """The top-level field of each Parquet leaf column, in order: a list column has one leaf
    (`tokens.list.element`), a struct one per member. (A leaf's dotted path cannot say it: a
    field may be named `a.b`.)

    >>> _leaf_fields(pa.schema([("a.b", pa.int64()), ("t", pa.list_(pa.int32())),
    ...                         ("s", pa.struct([("x", pa.int8()), ("y", pa.int8())]))]))
    ['a.b', 't', 's', 's']
    """
    def leaves(t: pa.DataType) -> int:
        if isinstance(t, pa.BaseExtensionType):  # stored as its storage type (Ray Data's
            return leaves(t.storage_type)  # variable-shaped tensors: a struct of two lists)
        if pa.types.is_struct(t):
            return sum(leaves(t.field(i).type) for i in range(t.num_fields))
        if pa.types.is_map(t):
            return leaves(t.key_type) + leaves(t.item_type)
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return leaves(t.value_type)
        return 1

    return [f.name for f in schema for _ in range(leaves(f.type))]


def block_count(size_bytes: int, nodes: int) -> int:
    """How many blocks the streaming mode reads the data into: about an eighth of a node's
    share each, so that they spread and balance evenly; of 1 to 128 MiB, but one per node at
    least (a block under 100 KiB lives in its owner's memory, on no node, so tiny blocks would
    all be served from one). Left to itself Ray Data splits a read into at least 200 blocks
    (DataContext.read_op_min_num_blocks): 208 of 2.7 MiB for the 591 MiB of
    bench/streaming.py, where a chunk's rows then spanned a hundred blocks per node.

    >>> MiB = 1 << 20
    >>> block_count(591 * MiB, 2), block_count(460_000, 2), block_count(5 * MiB, 2)
    (16, 2, 5)
    >>> block_count(100 * 1024 * MiB, 2)  # 128 MiB blocks
    800
    """
    return max(nodes, min(8 * nodes, size_bytes >> 20), -(-size_bytes // (128 << 20)))


def choose_mode(configured: str, size_bytes: int, nodes: list[dict[str, Any]]) -> str:
    """`data.mode`, with auto decided by the data's size against the nodes' object stores.

    >>> node = {"Resources": {"object_store_memory": 1000.0}}
    >>> choose_mode("auto", 300, [node, node]), choose_mode("auto", 200, [node, node])
    ('streaming', 'object_store')
    >>> choose_mode("auto", 10**9, [node]), choose_mode("streaming", 1, [node])
    ('object_store', 'streaming')
    """
    if configured != "auto":
        return configured
    if len(nodes) < 2:  # one node: every rank shares its object store already
        return "object_store"
    smallest = min(n["Resources"].get("object_store_memory", float("inf")) for n in nodes)
    return "streaming" if size_bytes > STREAM_SHARE * smallest else "object_store"


def check_streaming_nodes(cfg: Config) -> None:
    """ConfigError when `data.mode=streaming` finds no node up that can train (what `ingest`
    checks too; a sweep asks before its parent run starts)."""
    if cfg.data.mode == "streaming" and not training_nodes(cfg):
        raise _no_training_node(cfg)


def _no_training_node(cfg: Config) -> ConfigError:
    sc = cfg.scaling
    return ConfigError(
        f"config error: data.mode=streaming: no node of the cluster can run a training worker "
        f"now ({sc.cpus_per_worker:g} CPU{' and a GPU' if sc.use_gpu else ''} each), and the "
        "streaming mode spreads the data over those nodes before training starts: start them "
        "first (min_workers in cluster.yaml) or set data.mode=auto")


def ingest(info: DatasetInfo, cfg: Config | None = None) -> Blocks:
    """Ray Data reads the Parquet data (parallel, local path or object-store URI) into Arrow
    blocks in the object store; in the streaming mode they are then spread over the nodes and
    their small columns taken (`cfg`: None is the object-store mode). The driver's Ray Data
    settings are put back afterwards (a notebook's own reads keep theirs)."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.use_datasource_v2
    ctx.execution_options.preserve_order = True  # row positions must agree on every worker
    # Ray 2.60's default Parquet datasource (V2) took 4.6-7.4 s per read of the embedded datasets
    # against 0.2 s for the V1 reader (bench/ingest.py), paid by every job and every sweep trial.
    # Both give the same rows in the same order.
    ctx.use_datasource_v2 = False
    try:
        return _ingest(info, cfg)
    finally:
        ctx.execution_options.preserve_order, ctx.use_datasource_v2 = saved


def _ingest(info: DatasetInfo, cfg: Config | None) -> Blocks:
    configured = cfg.data.mode if cfg is not None else "object_store"
    columns = used_columns(cfg) if cfg is not None else None  # None: every column
    size, nodes, files = 0, [], None
    if configured != "object_store":  # the footers and the nodes decide auto, and size streaming
        files, metas = _footers(info.uri)  # (before the read: a change during it shows later)
        size, nodes = _memory_bytes(metas, columns), training_nodes(cfg)
    if configured == "streaming" and not nodes:  # (auto keeps to the object store then)
        raise _no_training_node(cfg)
    if choose_mode(configured, size, nodes) == "object_store":
        refs = _read(info.uri, columns=columns).materialize().to_arrow_refs()
        features = cfg.data.feature_column if cfg is not None else None
        return Blocks("object_store", one_block(refs, features), size_bytes=size)
    count = block_count(size, len(nodes))
    refs = _read(info.uri, columns=columns, override_num_blocks=count
                 ).materialize().to_arrow_refs()
    servers = _servers([n["NodeID"] for n in nodes])
    try:
        spread, where = _spread(refs, servers)
        moved = sum(a is not b for a, b in zip(spread, refs, strict=True))
        refs = spread  # the moved blocks' first copies are freed
        anyone = next(iter(servers))  # a block too small for the object store has no node
        where = [node if node in servers else anyone for node in where]
        ray.get([servers[n].hold.remote([i for i, w in enumerate(where) if w == n],
                                        *[r for r, w in zip(refs, where, strict=True) if w == n])
                 for n in servers])
        small, rows = _small_columns(where, servers, cfg)
        keeper = ray.remote(num_cpus=0)(BlockKeeper).options(
            scheduling_strategy=on_head()).remote(info.uri, cfg.to_dict(), rows, where, servers,
                                                   small, files)
    except BaseException:  # (a notebook's traceback would keep them, and the blocks they hold)
        for server in servers.values():
            _kill(server)
        raise
    return Blocks("streaming", refs, size_bytes=size, rows=rows, nodes=where, small=small,
                  servers=servers, moved=moved, keeper=keeper,
                  feature_width=info.facts.get("input_dim"))


def mode_line(blocks: Blocks) -> str | None:
    """The console's line on the streaming mode (None in the object-store mode)."""
    if blocks.mode != "streaming":
        return None
    held: dict[str, int] = {}
    for node in blocks.nodes:
        held[node or "driver"] = held.get(node or "driver", 0) + 1
    return (f"data: streaming mode: {len(blocks.refs)} blocks ({blocks.size_bytes / 2**20:.1f} "
            f"MiB) over {len(held)} node(s) ({', '.join(map(str, held.values()))} blocks, "
            f"{blocks.moved} moved to even them out); each rank fetches the rows of its batches")


def _where(refs: list[Any]) -> list[tuple[str | None, int]]:
    """(a node holding the block, its size) per block; small blocks live in their owner's
    memory (no node) and count as nothing."""
    located = ray.experimental.get_object_locations(refs)
    out = []
    for ref in refs:
        loc = located.get(ref) or {}
        ids = loc.get("node_ids") or []
        out.append((ids[0] if ids else None, int(loc.get("object_size") or 0)))
    return out


class BlockServer:
    """One per node that trains (a Ray actor of no CPU, started at ingest), holding the blocks
    of that node's share (zero-copy from its object store) and taking rows from them. An
    actor, not tasks: the ranks hold the node's CPUs, and Ray ends a CPU-less task's process a
    second after it idles, so every fetch would start (and import) a new one; and a block
    passed once, not with every fetch (a chunk's rows span most of a node's blocks)."""

    def __init__(self) -> None:
        self.blocks: dict[int, pa.Table] = {}

    def copy(self, table: pa.Table) -> pa.Table:
        """A block moved here (the result is stored in this node's object store)."""
        return table

    def drop(self, ids: list[int]) -> None:
        """Let go of blocks read here again by a re-read that failed elsewhere."""
        for i in ids:
            self.blocks.pop(i, None)

    def hold(self, ids: list[int], *blocks: pa.Table) -> int:
        self.blocks.update(zip(ids, blocks, strict=True))
        return len(self.blocks)

    def small(self, block: int, cfg_dict: dict[str, Any]) -> tuple[pa.Table, int]:
        return _small(self.blocks[block], Config.model_validate(cfg_dict))

    def load(self, uri: str, ids: list[int], starts: list[int], counts: list[int],
             columns: list[str], files: list[tuple[str, int, int]] | None = None) -> int:
        """Blocks read again from the Parquet data (a lost node's): block `ids[i]` is the
        `counts[i]` rows from dataset row `starts[i]`, the columns ingest read -- of the same
        files (`data_files` at ingest: `files`), or a ConfigError saying what changed."""
        from pipeline.data.datasets import ensure_embedded, read_rows

        ensure_embedded(uri)  # (the embedded dataset's file: written on the driver's node alone)
        if files is not None and (change := files_changed(files, data_files(uri))):
            # A block is the rows from a position on: read now, it would hold other rows (or
            # fail on a file cut short, on every restart). Input, not a failure to retry.
            raise ConfigError(f"data error: data.path={redact_text(uri)} changed since the job started: "
                              f"{change}; the blocks of the lost node(s) cannot be read again")
        # One read of them all, in row order: each footer and row group is read once (not
        # once per block), and the rows come in the order asked (no copy to reorder them).
        order = np.argsort(starts, kind="stable")
        table = read_rows(pads.dataset(uri, format="parquet"), np.concatenate(
            [np.arange(starts[i], starts[i] + counts[i]) for i in order]), columns)
        offset = 0
        for i in order:  # each block a copy of its own rows: a slice would keep the whole
            # Parquet row group it came from alive (the rows of blocks held elsewhere too)
            block = table.slice(offset, counts[i])
            self.blocks[ids[i]] = block.take(pa.array(np.arange(block.num_rows)))
            offset += counts[i]
        return len(self.blocks)

    def alive(self) -> bool:
        return True

    def take(self, columns: list[str], ids: list[int], local: list[np.ndarray]) -> pa.Table:
        """Rows of the blocks held here: `local[i]` (sorted) of block `ids[i]`, the large
        columns only, each a column of the parts taken, unjoined: the rank joins them once."""
        return pa.table({c: pa.chunked_array(
            [part for b, i in zip(ids, local, strict=True)
             for part in take_rows(self.blocks[b].column(c), i).chunks],
            type=self.blocks[ids[0]].column(c).type) for c in columns})


def _servers(nodes: list[str]) -> dict[str, Any]:
    actor = ray.remote(num_cpus=0, max_concurrency=4)(BlockServer)
    servers = {n: actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n, soft=False)).remote() for n in nodes}
    return servers


class BlockKeeper:
    """Where each block of a streamed dataset is served from, for the whole job (an actor of no
    CPU on the head node, started at ingest; see the module's docstring)."""

    def __init__(self, uri: str, cfg_dict: dict[str, Any], rows: list[int],
                 nodes: list[str], servers: dict[str, Any], small: list[Any],
                 files: list[tuple[str, int, int]] | None = None) -> None:
        self.uri, self.cfg_dict, self.rows = uri, cfg_dict, rows
        self.files = files  # `data_files` at ingest: the blocks are rows of these
        self.starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64).tolist()
        self.nodes, self.servers, self.small = list(nodes), dict(servers), list(small)

    def serving(self) -> list[Any]:
        """Every server the keeper holds now (those it started for lost nodes included)."""
        return list(self.servers.values())

    def lost(self, timeout_s: float = 60) -> list[str]:
        """The nodes whose server is gone or does not answer within `timeout_s` (their blocks
        are read again at the next `current`)."""
        answering = _answering(list(self.servers.values()), timeout_s)
        return [n for n, ok in zip(self.servers, answering, strict=True) if not ok]

    def current(self) -> tuple[dict[str, Any], list[str], list[Any], str | None]:
        """(servers, each block's node, each block's small columns, a line on what was read
        again or None), after reading again the blocks of every server that is gone."""
        lost = self.lost()
        if not lost:
            return self.servers, self.nodes, self.small, None
        # The new state is built aside and kept only once every lost block is read again: a
        # read that fails (another node lost meanwhile, a storage error) leaves the keeper as
        # it was, so the next restart finds the same nodes lost and tries again.
        servers = {n: s for n, s in self.servers.items() if n not in lost}
        nodes, small = list(self.nodes), list(self.small)
        ids = [i for i, n in enumerate(nodes) if n in lost]
        if not ids:  # the lost nodes held no block: nothing to read again, nowhere needed
            for node in lost:
                _kill(self.servers[node])
            self.servers = servers
            return self.servers, self.nodes, self.small, None
        cfg = Config.model_validate(self.cfg_dict)
        alive = [n["NodeID"] for n in training_nodes(cfg)
                 if n["NodeID"] not in lost]  # Ray may not have called a lost node dead yet
        targets = _reload_targets(len(ids), alive, [n for n in nodes if n not in lost])
        new = _servers([t for t in set(targets) if t not in servers])
        mine = {node: [i for i, t in zip(ids, targets, strict=True) if t == node]
                for node in set(targets)}
        loads: list[Any] = []
        try:
            servers.update(new)
            loads = [servers[node].load.remote(  # every node reads its share at once
                self.uri, ii, [self.starts[i] for i in ii], [self.rows[i] for i in ii],
                used_columns(cfg), self.files) for node, ii in mine.items()]
            with config_errors_as_raised():  # the data changed: its line, to the rank
                ray.get(loads)
            for node, ii in mine.items():
                for i in ii:
                    nodes[i] = node
            refs, _ = _small_columns([nodes[i] for i in ids], servers, cfg, ids)
        except BaseException:
            for server in new.values():
                _kill(server)
            with contextlib.suppress(Exception):  # (the others' reads end first: a drop
                ray.wait(loads, num_returns=len(loads), timeout=60)  # before one stores nothing)
            for node, ii in mine.items():
                if node not in new:  # a surviving server's copies of this attempt: let go (the
                    with contextlib.suppress(Exception):  # next may place them elsewhere)
                        ray.get(servers[node].drop.remote(ii), timeout=10)
            raise
        for i, ref in zip(ids, refs, strict=True):
            small[i] = ref
        for node in lost:  # one that only stopped answering would hold its share to the end
            _kill(self.servers[node])
        self.servers, self.nodes, self.small = servers, nodes, small
        return self.servers, self.nodes, self.small, (
            f"data: {len(ids)} block(s) of {len(lost)} lost node(s) read again from the Parquet "
            f"data onto {len(set(targets))} node(s) that train")


def one_block(refs: list[Any], feature_column: str | None = None) -> list[Any]:
    """The object-store mode's blocks joined into one table of one chunk per column, made on
    the head node (a worker node may go; `on_head`), the feature column's values as float32
    (`feature_column`; what the ranks train): a rank maps its columns without a copy -- from
    several blocks (or a block of several chunks, or features of float64, as pandas writes
    them) each rank made arrays of its own, so the ranks of a node held a copy each besides
    the store's. A join that fails raises here, at ingest (not on every rank, later). One
    block that needs none of it is left as it is (where Ray Data read it)."""
    if not refs:
        return refs
    if len(refs) == 1 and not ray.get(ray.remote(num_cpus=0)(_to_join).remote(feature_column,
                                                                              refs[0])):
        return refs  # one block already as the ranks map it: not copied (twice its memory)
    join = ray.remote(num_cpus=0, num_returns=2)(_joined).options(scheduling_strategy=on_head())
    ref, rows = join.remote(feature_column, *refs)
    ray.get(rows)  # joined (or its error raised) before the blocks are let go
    return [ref]


def _to_join(feature_column: str | None, table: pa.Table) -> bool:
    """Whether a block needs `_joined` for the ranks to map it without a copy: a column of
    several chunks, or features not yet float32 (a task where the block is: nothing moves)."""
    if any(c.num_chunks > 1 for c in table.columns):
        return True
    if feature_column is None or feature_column not in table.column_names:
        return False
    return float32_type(table.column(feature_column).type) != table.column(feature_column).type


def _joined(feature_column: str | None, *tables: pa.Table) -> tuple[pa.Table, int]:
    table = pa.concat_tables(tables)
    joined = pa.table({name: float32_values(one_array(table.column(name)))
                       if name == feature_column else one_array(table.column(name))
                       for name in table.column_names})
    return joined, joined.num_rows


def float32_values(arr: pa.Array) -> pa.Array:
    """A list (or fixed-size list) column of numbers with float32 values, as the ranks train
    them (cast as NumPy's astype casts; other columns as they are).

    >>> float32_values(pa.array([[1.5, 2.0]], pa.list_(pa.float64(), 2))).type
    FixedSizeListType(fixed_size_list<item: float>[2])
    >>> float32_values(pa.array([[1, 2]])).type, float32_values(pa.array([1.0])).type
    (ListType(list<item: float>), DataType(double))
    """
    target = float32_type(arr.type)
    return arr if target == arr.type else arr.cast(target, safe=False)


def float32_type(t: pa.DataType) -> pa.DataType:
    """The type `float32_values` gives a column of type `t` (`t` itself where it casts none):
    a list of integers or floats becomes a list of float32, of the same kind and size.

    >>> float32_type(pa.large_list(pa.int64())), float32_type(pa.list_(pa.string()))
    (LargeListType(large_list<item: float>), ListType(list<item: string>))
    """
    if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t)):
        return t
    v = t.value_type
    if v == pa.float32() or not (pa.types.is_integer(v) or pa.types.is_floating(v)):
        return t
    if pa.types.is_fixed_size_list(t):
        return pa.list_(pa.float32(), t.list_size)
    return pa.large_list(pa.float32()) if pa.types.is_large_list(t) else pa.list_(pa.float32())


def on_head() -> NodeAffinitySchedulingStrategy:
    """On the head node (where the cluster's own services run: a worker node may go), or,
    without one, preferably on this process's node. A soft affinity is not enough: it put a
    CPU-less actor on a worker node half of the time here."""
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)


def _kill(actor: Any) -> None:
    """Kill an actor that may be gone already."""
    try:
        ray.kill(actor)
    except Exception:  # dead with its node, or never started
        pass


def _answering(servers: list[Any], timeout_s: float = 60) -> list[bool]:
    """Whether each BlockServer still answers, all asked at once (a dead node's actors are
    marked dead once Ray notices the node gone; one that does not answer within `timeout_s`
    counts as gone)."""
    asked = [server.alive.remote() for server in servers]
    done, _ = ray.wait(asked, num_returns=len(asked), timeout=timeout_s, fetch_local=True)
    answers = []
    for ref in asked:
        try:
            answers.append(ref in done and ray.get(ref))
        except ray.exceptions.RayActorError:
            answers.append(False)
    return answers


def _reload_targets(count: int, alive: list[str], held: list[str]) -> list[str]:
    """Where `count` lost blocks go: each to the node that trains and holds fewest at that
    moment (a replacement node holds none), so that a node ends with about its share.
    `held`: the node of every block still held.

    >>> _reload_targets(3, ["a", "c"], ["a", "a", "a"])  # c replaced the lost node
    ['c', 'c', 'c']
    >>> _reload_targets(3, ["a", "b"], ["a", "b", "b"])  # no new node: the least loaded
    ['a', 'a', 'b']
    >>> _reload_targets(8, ["a", "d"], ["a"] * 4).count("d")  # two lost, one replacement
    6
    """
    if not alive:
        raise DataLostError(f"{DATA_LOST}, and no node that trains is left to read it again on")
    load = {n: held.count(n) for n in alive}
    out = []
    for _ in range(count):
        dst = min(load, key=lambda n: (load[n], n))
        load[dst] += 1
        out.append(dst)
    return out


def plan_moves(where: list[tuple[str | None, int]], nodes: list[str]) -> dict[int, str]:
    """Which blocks to move where ({block index: destination}), so that each node holds about
    its share: a block leaves a node holding more than its share if the node keeps at least
    its share without it, for the node holding least. `where`: (node holding it, size) per
    block, in order. A block on a node that does not train moves too; one with no node (kept
    in its owner's memory, too small for the object store) stays.

    >>> plan_moves([("a", 10)] * 4, ["a", "b"])  # one file, read on one node
    {0: 'b', 1: 'b'}
    >>> plan_moves([("a", 10), ("b", 10), ("head", 10), (None, 1)], ["a", "b"])
    {2: 'a'}
    >>> plan_moves([("a", 1), ("a", 10), ("a", 10)], ["a", "b"])  # the largest first: 11 / 10
    {1: 'b'}
    """
    held = {n: 0 for n in nodes}
    for node, size in where:
        if node in held:
            held[node] += size
    share = sum(size for node, size in where if node is not None) / len(nodes)
    moves = {}
    # the largest blocks first (a small block moved first kept the larger ones where they were:
    # 20 of 21 on one node of two), in their order among equals
    for i in sorted(range(len(where)), key=lambda j: -where[j][1]):
        node, size = where[i]
        if node is None:
            continue
        if node not in held or (held[node] > share and held[node] - size >= share):
            dst = min(held, key=held.__getitem__)
            if node in held:
                held[node] -= size
            held[dst] += size
            moves[i] = dst
    return moves


def _spread(refs: list[Any], servers: dict[str, Any]) -> tuple[list[Any], list[str | None]]:
    """The blocks moved as `plan_moves` says (Ray Data reads a file in one task, so a dataset
    in one file starts on one node): each by the destination's server, which makes a copy in
    its node's store; the first copy is freed when the caller drops the old refs."""
    where = _where(refs)
    moves = plan_moves(where, list(servers))
    refs, placed = list(refs), [w for w, _ in where]
    for i, dst in moves.items():
        refs[i] = servers[dst].copy.remote(refs[i])
        placed[i] = dst
    moved = [refs[i] for i in moves]
    if moved:
        ray.wait(moved, num_returns=len(moved), fetch_local=False)
    return refs, placed


def _small_names(cfg: Config) -> list[str]:
    """The small columns a block has by name (its sequences' lengths are computed)."""
    return [c for c in (cfg.data.id_column, cfg.data.label_column,
                        cfg.batching.difficulty_column) if c is not None]


def _small(block: pa.Table, cfg: Config) -> tuple[pa.Table, int]:
    """A block's small columns (computed where the block is) and its row count. The model's
    facts of the data are the driver's checks' (`DatasetInfo.facts`), not recomputed here."""
    d = cfg.data
    keep = {name: block.column(name) for name in _small_names(cfg)}
    if d.sequence_column is not None:
        keep[LENGTH] = pc.list_value_length(block.column(d.sequence_column)).cast(pa.int64())
    return pa.table(keep) if keep else pa.table({"_": pa.nulls(block.num_rows)}), block.num_rows


def _small_columns(where: list[str], servers: dict[str, Any], cfg: Config,
                   ids: list[int] | None = None) -> tuple[list[Any], list[int]]:
    """The small columns (refs) and row counts of blocks `ids` (default: all), held at
    `where`."""
    cfg_dict = cfg.to_dict()
    pairs = [servers[node].small.options(num_returns=2).remote(i, cfg_dict)
             for i, node in zip(ids if ids is not None else range(len(where)), where,
                                strict=True)]
    return [s for s, _ in pairs], ray.get([n for _, n in pairs])


def small_table(cfg: Config, blocks: Blocks) -> SampleTable:
    """Every row's small columns, as the planners need them (the streaming mode's table)."""
    with _servers_kept():
        table = pa.concat_tables(ray.get(blocks.small))
    d = cfg.data
    st = SampleTable.from_table(table, feature_column=None, label_column=d.label_column,
                                id_column=d.id_column,
                                difficulty_column=cfg.batching.difficulty_column)
    if LENGTH in table.column_names:
        st = dataclasses.replace(st, lengths=table.column(LENGTH).to_numpy().astype(np.int64))
    return st


def large_columns(cfg: Config, feature_width: int | None = None) -> LargeColumns:
    d = cfg.data
    return LargeColumns(d.feature_column, d.sequence_column, d.target_column, feature_width)


class BlockFetch(Fetch):
    """A rank's rows from the blocks on their nodes: one call per node holding some of them,
    to its `BlockServer`, which returns only those rows."""

    def __init__(self, blocks: Blocks, columns: list[str]) -> None:
        self.blocks, self.columns = blocks, columns
        self.offsets = np.concatenate([[0], np.cumsum(blocks.rows)]).astype(np.int64)
        self.nodes = list(blocks.servers)
        self.node_of = np.array([self.nodes.index(n) for n in blocks.nodes])  # per block

    def submit(self, positions: np.ndarray) -> Any:
        if not len(positions):  # a rank with no rows here (fewer validation rows than ranks):
            # the columns, empty, from the server of block 0 (a table of no columns would not do)
            ref = self.blocks.servers[self.nodes[self.node_of[0]]].take.remote(
                self.columns, [0], [np.empty(0, dtype=np.int64)])
            return [(np.empty(0, dtype=np.int64), ref.future())]
        block = np.searchsorted(self.offsets, positions, side="right") - 1
        node = self.node_of[block]
        asks = []
        for k in np.unique(node):
            mine = np.flatnonzero(node == k)  # positions are sorted: so are their blocks
            ids, first = np.unique(block[mine], return_index=True)
            local = np.split(positions[mine] - self.offsets[block[mine]], first[1:])
            ref = self.blocks.servers[self.nodes[k]].take.remote(self.columns, ids.tolist(),
                                                                  local)
            # Ray moves a result to the caller's node only when it is asked for (ray.get), so a
            # chunk asked ahead would still cross the network while the step waits. A future
            # pulls it here as soon as the server has it (ray.wait(fetch_local=True) does so
            # only for a result already made). bench/README.md: the waits it saved.
            asks.append((mine, ref.future()))
        return asks

    def result(self, handle: Any) -> pa.Table:
        with _servers_kept():  # a resolved future holds its value: no ask to the raylet again
            tables = [future.result() for _, future in handle]
        if len(handle) == 1:
            return tables[0]
        where = [mine for mine, _ in handle]
        n = sum(len(m) for m in where)
        return pa.table({c: scatter_rows([t.column(c) for t in tables], where, n)
                         for c in self.columns})


def load_rows(cfg: Config, blocks: Blocks | list[Any], rank: int, world: int
              ) -> tuple[SampleTable, StreamedRows | None, int]:
    """A rank's table: the whole of it (object-store mode), or the small columns with the rows
    streamed to it (`StreamedRows`); and the bytes its node pulled from others to get there."""
    if isinstance(blocks, list):  # refs of the whole table (tests, older callers)
        blocks = Blocks("object_store", blocks)
    if blocks.mode == "streaming":
        blocks = blocks.current()  # a lost node's blocks read again, if any
        cols = large_columns(cfg, blocks.feature_width)
        small = small_table(cfg, blocks)
        # Chunks of about CHUNK_BYTES: fewer, larger calls cost less per row (a call's fixed
        # cost is a few ms); a rank holds up to three of them for its steps (five while a
        # mid-epoch validation reads two more: `StreamedRows`), on its node and (their rows)
        # on the serving ones. 8 MiB put a node at 0.61 of the data, 6 MiB at 0.60.
        row_bytes = blocks.size_bytes / max(len(small), 1)
        chunk = int(min(16_384, max(256, CHUNK_BYTES / max(row_bytes, 1.0))))
        return small, StreamedRows(small, BlockFetch(blocks, cols.names()), cols, rank, world,
                                   chunk_rows=chunk), 0
    here = ray.get_runtime_context().get_node_id()
    located = ray.experimental.get_object_locations(blocks.refs)
    pulled = sum(int(loc.get("object_size") or 0) for loc in located.values()
                 if loc.get("node_ids") and here not in loc["node_ids"])
    table = pa.concat_tables(ray.get(blocks.refs))
    d = cfg.data
    st = SampleTable.from_table(
        table, feature_column=d.feature_column, label_column=d.label_column,
        sequence_column=d.sequence_column, target_column=d.target_column,
        id_column=d.id_column, difficulty_column=cfg.batching.difficulty_column)
    return st, None, pulled
