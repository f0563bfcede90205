"""Pieces of the streaming mode (`pipeline/blocks.py`) run in this process, their Ray actors
and calls played by stand-ins (no cluster): `BlockKeeper.current` when reading a lost node's
blocks again fails (the keeper keeps its state, so the next restart tries again and then hands
out a consistent view), and `BlockFetch` gathering a rank's rows from two nodes' real
`BlockServer`s, none included; and which single block the object-store mode joins."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pyarrow as pa
import pytest

import pipeline.blocks as blocks


class Call:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return lambda: self.fn(*args)


class Server:
    def __init__(self, node: str, fails: int = 0):
        self.node, self.fails, self.up, self.loaded, self.dropped = node, fails, True, [], []
        self.load = Call(self._load)
        self.drop = Call(self.dropped.extend)

    def _load(self, uri, ids, starts, rows, columns, files):
        if self.fails:
            self.fails -= 1
            raise OSError("read failed (a storage error)")
        self.loaded += ids


def test_a_failed_reread_leaves_the_keeper_as_it_was_and_the_next_one_succeeds(monkeypatch):
    made, killed = [], []

    def servers(nodes):  # the replacement node's first read fails
        new = {n: Server(n, fails=1 if not made else 0) for n in nodes}
        made.append(new)
        return new

    monkeypatch.setattr(blocks, "training_nodes", lambda cfg: [{"NodeID": "a"}, {"NodeID": "c"}])
    monkeypatch.setattr(blocks, "_servers", servers)
    monkeypatch.setattr(blocks, "_small_columns",
                        lambda where, srv, cfg, ids: ([f"small@{w}" for w in where], None))
    monkeypatch.setattr(blocks, "_kill", killed.append)
    monkeypatch.setattr(blocks.ray, "get", lambda calls: [c() for c in calls])
    monkeypatch.setattr(blocks.ray, "wait", lambda calls, **_: (calls, []))  # (all ran)
    monkeypatch.setattr(blocks.Config, "model_validate", staticmethod(lambda d: d))
    monkeypatch.setattr(blocks, "used_columns", lambda cfg: ["x"])
    a, b = Server("a"), Server("b")
    keeper = blocks.BlockKeeper("uri", {}, [10, 10, 10, 10], ["a", "b", "a", "b"],
                                {"a": a, "b": b}, ["s0", "s1", "s2", "s3"])
    monkeypatch.setattr(keeper, "lost", lambda: [n for n, s in keeper.servers.items() if not s.up])
    b.up = False  # node b is lost

    with pytest.raises(OSError):
        keeper.current()
    assert keeper.servers == {"a": a, "b": b} and keeper.nodes == ["a", "b", "a", "b"]
    assert keeper.small == ["s0", "s1", "s2", "s3"]
    assert killed == [made[0]["c"]]  # the replacement's server that failed is not left running

    servers_now, nodes, small, line = keeper.current()  # the next restart: b still lost
    assert servers_now == {"a": a, "c": made[1]["c"]} and nodes == ["a", "c", "a", "c"]
    assert made[1]["c"].loaded == [1, 3] and small == ["s0", "small@c", "s2", "small@c"]
    assert line.startswith("data: 2 block(s) of 1 lost node(s) read again")
    assert killed[-1] is b  # a server called lost is killed: one that only stopped answering
    # would otherwise hold its share beside the copy read again
    assert keeper.current()[3] is None  # nothing lost any more
    # a lost node that held no block (it joined and went before any was spread to it): its
    # server goes, nothing is read, and no training node is needed for it
    keeper.servers["d"] = d = Server("d")
    d.up = False
    monkeypatch.setattr(blocks, "training_nodes", lambda cfg: [])
    servers_now, nodes, small, line = keeper.current()
    assert line is None and "d" not in servers_now and killed[-1] is d
    assert nodes == ["a", "c", "a", "c"] and small == ["s0", "small@c", "s2", "small@c"]


def test_a_failed_reread_lets_go_of_what_the_surviving_servers_read_for_it(monkeypatch):
    """Node b's four blocks go to the replacement c and the survivor a; c's read fails (all
    reads run at once, as Ray's): a lets go of the blocks it read for this attempt (they were
    kept to the end of the job, uncounted, the next attempt placing them elsewhere), and
    keeps its own."""
    made = []

    def servers(nodes):
        new = {n: Server(n, fails=1) for n in nodes}
        made.append(new)
        return new

    def get(calls, timeout=None):  # every call runs, then the first error is raised
        results, errors = [], []
        for call in calls if isinstance(calls, list) else [calls]:
            try:
                results.append(call())
            except Exception as err:
                errors.append(err)
        if errors:
            raise errors[0]
        return results if isinstance(calls, list) else results[0]

    monkeypatch.setattr(blocks, "training_nodes", lambda cfg: [{"NodeID": "a"}, {"NodeID": "c"}])
    monkeypatch.setattr(blocks, "_servers", servers)
    monkeypatch.setattr(blocks, "_kill", lambda actor: None)
    monkeypatch.setattr(blocks.ray, "get", get)
    monkeypatch.setattr(blocks.ray, "wait", lambda calls, **_: (calls, []))  # (all ran)
    monkeypatch.setattr(blocks.Config, "model_validate", staticmethod(lambda d: d))
    monkeypatch.setattr(blocks, "used_columns", lambda cfg: ["x"])
    a, b = Server("a"), Server("b")
    keeper = blocks.BlockKeeper("uri", {}, [10] * 5, ["a", "b", "b", "b", "b"],
                                {"a": a, "b": b}, ["s0", "s1", "s2", "s3", "s4"])
    monkeypatch.setattr(keeper, "lost", lambda: [n for n, s in keeper.servers.items() if not s.up])
    b.up = False
    with pytest.raises(OSError):
        keeper.current()
    assert a.loaded and sorted(a.dropped) == sorted(a.loaded)  # (its own block 0 untouched)
    assert 0 not in a.dropped and made[0]["c"].loaded == []


class Actor:
    """A BlockServer in this process: `server.take.remote(...)` returns a ref whose
    `future()` is already done."""

    def __init__(self, server: blocks.BlockServer):
        self.server = server

    def __getattr__(self, name):
        method = getattr(self.server, name)

        class Ref:
            def __init__(self, value):
                self.value = value

            def future(self):
                f = Future()
                f.set_result(self.value)
                return f

        class Remote:
            @staticmethod
            def remote(*args):
                return Ref(method(*args))

        return Remote


@pytest.mark.parametrize("positions", [[], [0, 2, 3, 5], [4], list(range(7))])
def test_block_fetch_gathers_the_rows_of_both_nodes_in_order_and_none(positions):
    """Blocks of 3, 2 and 2 rows on nodes a, b, a: the rows at `positions` as the whole
    table's `take` gives them; no positions (a rank with no validation rows) gives the columns,
    empty -- a table without them failed the rank's window with a KeyError."""
    table = pa.table({"tokens": [[i] * (i + 1) for i in range(7)],
                      "x": [float(i) for i in range(7)]})
    parts = [table.slice(0, 3), table.slice(3, 2), table.slice(5, 2)]
    servers = {"a": blocks.BlockServer(), "b": blocks.BlockServer()}
    servers["a"].hold([0, 2], parts[0], parts[2])
    servers["b"].hold([1], parts[1])
    held = blocks.Blocks(mode="streaming", refs=[], rows=[3, 2, 2], nodes=["a", "b", "a"],
                         servers={n: Actor(s) for n, s in servers.items()})
    fetch = blocks.BlockFetch(held, ["tokens", "x"])
    got = fetch.result(fetch.submit(np.array(positions, dtype=np.int64)))
    assert got.schema == table.schema
    assert got.to_pydict() == table.take(pa.array(positions, type=pa.int64())).to_pydict()


def test_streaming_with_no_training_node_up_is_refused_in_one_line(monkeypatch):
    """A cold cluster (cluster.yaml's GPU workers start at 0; a CPU-only head trains nothing in
    a GPU job): the streaming mode has no node to spread the blocks over. One line naming
    data.mode (a ConfigError: exit 2, never retried), before any read, instead of a division
    by zero in `plan_moves`; auto keeps to the object store then."""
    from pipeline.config import ConfigError, load_config
    from pipeline.data.datasets import resolve

    monkeypatch.setattr(blocks, "training_nodes", lambda cfg: [])  # as on a cold cluster
    read = []
    monkeypatch.setattr(blocks.ray.data, "read_parquet", lambda *a, **k: read.append(a))
    cfg, info = resolve(load_config(None, ["data.mode=streaming", "scaling.use_gpu=true"]))
    with pytest.raises(ConfigError, match=r"^config error: data\.mode=streaming: no node .* "
                                          r"\(1 CPU and a GPU each\)"):
        blocks.ingest(info, cfg)
    assert read == []
    assert blocks.choose_mode("auto", 10**12, []) == "object_store"


def test_only_the_columns_a_job_names_are_read_and_sized(tmp_path):
    """A column nothing in the config names (raw text here) is neither sized for the `auto`
    mode's choice nor read into the object store (`ingest` reads `used_columns`)."""
    import pyarrow.parquet as pq

    from pipeline.config import load_config

    n = 1000
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": pa.array(np.arange(n, dtype=np.float64)),
                             "y": pa.array(np.arange(n) % 3),
                             "raw": pa.array([f"{i}: raw text " * 40 for i in range(n)])}), path)
    cfg = load_config(None, [f"data.path={path}", "data.feature_column=x", "data.label_column=y"])
    assert blocks.used_columns(cfg) == ["x", "y"]
    named = blocks.parquet_bytes(str(path), blocks.used_columns(cfg))
    assert named == n * 8 + n * 8  # two 8-byte columns: the value counts times their widths
    assert blocks.parquet_bytes(str(path)) > named + n * 400  # the text counts when all do
    dotted = tmp_path / "dotted.parquet"  # a name with a dot: not the first part of a path
    pq.write_table(pa.table({"a.b": pa.array(np.arange(n)),
                             "a": pa.array(np.arange(n, dtype=np.int32))}), dotted)
    assert blocks.parquet_bytes(str(dotted), ["a.b"]) == n * 8
    assert blocks.parquet_bytes(str(dotted), ["a"]) == n * 4


def test_an_unused_extension_type_column_is_sized_by_its_storage(tmp_path):
    """An extension type is stored as its storage type: Ray Data's variable-shaped tensors (raw
    images of several sizes) as a struct of two lists, two Parquet leaves. Counted as one, the
    leaves' owners came out one short and every job on such files failed with an IndexError
    (exit 1). A registered extension type of the same storage stands in for Ray's here."""
    import pyarrow.parquet as pq

    class Images(pa.ExtensionType):
        def __init__(self) -> None:
            super().__init__(pa.struct([("data", pa.list_(pa.uint8())),
                                        ("shape", pa.list_(pa.int64()))]), "test.images")

        def __arrow_ext_serialize__(self) -> bytes:
            return b""

        @classmethod
        def __arrow_ext_deserialize__(cls, storage_type, serialized):
            return cls()

    storage = pa.array([{"data": [0] * 6, "shape": [2, 3]}, {"data": [0] * 4, "shape": [4, 1]}],
                       Images().storage_type)
    path = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": pa.ExtensionArray.from_storage(Images(), storage),
                             "label": pa.array([0, 1]),
                             "x": pa.array([[1.0, 2.0], [3.0, 4.0]])}), path)
    pa.register_extension_type(Images())  # (Ray Data registers its own when imported)
    try:
        assert blocks.parquet_bytes(str(path), ["label", "x"]) == 2 * 8 + 4 * 8
        assert blocks.parquet_bytes(str(path)) > 2 * 8 + 4 * 8
    finally:
        pa.unregister_extension_type("test.images")


def test_a_lost_nodes_blocks_are_read_again_only_from_the_files_ingest_read(tmp_path,
                                                                             monkeypatch):
    """A block is the rows from a dataset position on. Read again after a file was added in
    front (ids 40..89 came back for block [50, 100)) or cut short (an IndexError on every
    restart, then "data lost"), it is refused as the input error it is, saying what changed."""
    import pyarrow.parquet as pq

    from pipeline.config import ConfigError

    pq.write_table(pa.table({"id": pa.array(np.arange(100))}), tmp_path / "b.parquet")
    files = blocks.data_files(str(tmp_path))
    server = blocks.BlockServer()
    assert server.load(str(tmp_path), [1], [50], [50], ["id"], files) == 1
    assert server.blocks[1].column("id").to_pylist() == list(range(50, 100))
    pq.write_table(pa.table({"id": pa.array(np.arange(40))}), tmp_path / "a.parquet")
    with pytest.raises(ConfigError, match=r"changed since the job started: its files are "
                                          r".*a.parquet, .*b.parquet \(.*b.parquet at the start"):
        server.load(str(tmp_path), [1], [50], [50], ["id"], files)
    (tmp_path / "a.parquet").unlink()
    pq.write_table(pa.table({"id": pa.array(np.arange(60))}), tmp_path / "b.parquet")
    with pytest.raises(ConfigError, match=r"b.parquet is \d+ bytes and 60 rows \(\d+ bytes and "
                                          r"100 rows at the start\)"):
        server.load(str(tmp_path), [1], [50], [50], ["id"], files)
    # written again in place with other values, the same bytes and rows: a store's object has
    # one modification time (here a local folder taken for a store's)
    uri = str(tmp_path)
    pq.write_table(pa.table({"id": pa.array(np.arange(100))}), tmp_path / "b.parquet")
    assert blocks.data_files(uri)[0][3] is None  # (a local file: each node's copy its own)
    assert blocks.data_files(f"file://{tmp_path}")[0][3] is None
    monkeypatch.setattr(blocks, "_one_modified_time", lambda fs: True)
    files = blocks.data_files(uri)
    swapped = np.arange(100)
    swapped[[60, 61]] = [61, 60]
    pq.write_table(pa.table({"id": pa.array(swapped)}), tmp_path / "b.parquet")
    import os

    assert blocks.data_files(uri)[0][1:3] == files[0][1:3]  # the same size and rows
    os.utime(tmp_path / "b.parquet", ns=(files[0][3] + 10**9, files[0][3] + 10**9))
    with pytest.raises(ConfigError, match=r"b.parquet was written again \(the same bytes and rows "
                                          r"as at the start\)"):
        server.load(uri, [1], [50], [50], ["id"], files)


def test_a_servers_blocks_are_read_again_in_one_pass_in_any_order(tmp_path, monkeypatch):
    """Several blocks of a lost node, asked out of row order and spanning files and row groups:
    each block gets exactly its rows, and each file is opened once (not once per block)."""
    import pyarrow.parquet as pq

    from pipeline.data import datasets

    for name, lo, hi in [("a", 0, 70), ("b", 70, 130)]:
        pq.write_table(pa.table({"id": pa.array(np.arange(lo, hi)), "x": pa.array(
            np.arange(lo, hi) * 2.0)}), tmp_path / f"{name}.parquet", row_group_size=16)
    opened, real = [], datasets._parquet_files

    def counted(ds):
        opened.append(ds)
        yield from real(ds)

    monkeypatch.setattr(datasets, "_parquet_files", counted)
    server = blocks.BlockServer()
    files = blocks.data_files(str(tmp_path))
    assert server.load(str(tmp_path), [7, 2, 5], [100, 10, 60], [30, 5, 20], ["id", "x"],
                       files) == 3
    assert len(opened) == 1
    for b, start, count in [(7, 100, 30), (2, 10, 5), (5, 60, 20)]:
        assert server.blocks[b].column("id").to_pylist() == list(range(start, start + count))
        assert server.blocks[b].column("x").to_pylist() == [2.0 * i for i in
                                                            range(start, start + count)]


def test_read_rows_keeps_the_order_asked_sorted_or_not(tmp_path):
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from pipeline.data.datasets import read_rows

    pq.write_table(pa.table({"id": pa.array(np.arange(50))}), tmp_path / "t.parquet",
                   row_group_size=7)
    ds = pads.dataset(tmp_path / "t.parquet")
    for positions in ([3, 3, 10, 49], [49, 3, 10, 3], [0], list(range(50))[::-1]):
        assert read_rows(ds, np.array(positions), ["id"]).column("id").to_pylist() == positions


def test_ray_data_is_given_the_files_with_rows_only(tmp_path):
    """Ray Data takes the columns from its first file: an empty first file without the label
    column (which the checks, reading the files with rows, accept) made every block lack it.
    The files without rows are left out of its list; no row position moves."""
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": pa.array([], pa.float32())}), tmp_path / "0.parquet")
    pq.write_table(pa.table({"x": [1.0, 2.0], "label": [0, 1]}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"x": pa.array([], pa.float32()), "label": pa.array([], pa.int64())}),
                   tmp_path / "2.parquet")
    pq.write_table(pa.table({"x": [3.0], "label": [1]}), tmp_path / "3.parquet")
    files, _ = blocks.parquet_files(str(tmp_path))
    assert [f.rsplit("/", 1)[1] for f in files] == ["1.parquet", "3.parquet"]
    assert [rows for _, _, rows, _ in blocks.data_files(str(tmp_path))] == [0, 2, 0, 1]


def test_a_block_is_joined_only_where_a_rank_could_not_map_it_without_a_copy():
    """`one_block` leaves one block as it is only where each column is one chunk and the
    features are already float32 lists (or are no numeric list: nothing to cast)."""
    f32 = pa.array([[1.0, 2.0]], pa.list_(pa.float32(), 2))
    f64 = pa.array([[1.0, 2.0]], pa.list_(pa.float64(), 2))
    ints = pa.array([[1, 2]], pa.large_list(pa.int64()))
    words = pa.array([["a", "b"]], pa.list_(pa.string()))
    label = pa.array([0])
    assert not blocks._to_join("x", pa.table({"x": f32, "label": label}))
    assert blocks._to_join("x", pa.table({"x": f64, "label": label}))
    assert blocks._to_join("x", pa.table({"x": ints, "label": label}))
    assert not blocks._to_join("x", pa.table({"x": words, "label": label}))
    assert not blocks._to_join(None, pa.table({"x": f64, "label": label}))
    assert not blocks._to_join("tokens", pa.table({"x": f64, "label": label}))
    chunked = pa.table({"x": pa.chunked_array([f32, f32]), "label": pa.chunked_array([label, label])})
    assert blocks._to_join("x", chunked) and blocks._to_join(None, chunked)
    assert blocks.float32_values(ints).type == blocks.float32_type(ints.type) == pa.large_list(pa.float32())


def test_a_block_read_again_holds_its_own_rows_not_its_row_group(tmp_path):
    """A lost node's block that covers part of a Parquet row group (pyarrow writes a file of
    a million rows as one) is kept as a copy of its rows: a slice of the read kept the whole
    row group alive, so a surviving node held the lost blocks' row groups in full."""
    import pyarrow.parquet as pq

    n = 400_000
    pq.write_table(pa.table({"x": pa.array(np.arange(n, dtype=np.float32))}),
                   tmp_path / "one.parquet")  # one row group
    server = blocks.BlockServer()
    files = blocks.data_files(str(tmp_path))
    assert server.load(str(tmp_path), [3], [100_000], [25_000], ["x"], files) == 1
    block = server.blocks[3]
    assert block.column("x").to_pylist()[:2] == [100_000.0, 100_001.0]
    assert block.get_total_buffer_size() < 2 * 25_000 * 4  # its own rows (was the group's 1.6 MB)
    # an empty block read of a dataset whose first file is empty and lacks the column
    pq.write_table(pa.table({"y": pa.array([], pa.int64())}), tmp_path / "0.parquet")
    assert server.load(str(tmp_path), [9], [0], [0], ["x"], blocks.data_files(str(tmp_path))) == 2
    assert server.blocks[9].num_rows == 0 and server.blocks[9].column_names == ["x"]
