"""Where a rank's rows come from (pure: no Ray): the whole table, or rows streamed from blocks.

In the object-store mode every rank holds the whole `SampleTable` and gathers from it. In the
streaming mode (`data.mode`, `pipeline/blocks.py`) a rank holds only the small columns the
planners need (ids, labels, lengths, difficulty) for every row, and the large ones (features,
tokens, targets) for the rows of its next steps: `StreamedRows` asks a `Fetch` for them a chunk
of steps at a time and asks for the next chunks before the current one is trained, so the step
need not wait (but for an epoch's first: nothing is asked for across an epoch's end). Either
way a batch is gathered from table positions with `.gather(positions)`, so both modes give the
same arrays for the same positions.

A step's rows are known only when the batch-size schedule says how many unit batches it joins
(`group_units`). The next chunks are asked for on the schedule's own forecast where it has one
(a constant batch, a warmup ramp: a function of the step, `BatchSchedule.planned`), else on the
guess that the steps keep the current size; a step the guess missed (where an adaptive schedule
changes the batch) is fetched when it comes, and the chunks asked for ahead are dropped.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import ConfigError
from pipeline.data.batches import SampleTable
from pipeline.data.plan import rank_slice


def take_rows(column: pa.ChunkedArray, rows: np.ndarray) -> pa.ChunkedArray:
    """`column.take(rows)` chunk by chunk, the parts left unjoined when `rows` are sorted (a
    server's are: the caller joins them once, with the other nodes' answers). Arrow's own take
    on a column of many chunks (a block Ray Data read may hold several) joins them first, a
    copy of the whole column per call: 3.8 ms for 512 rows of a 37 MiB block in 38 chunks,
    0.6 ms chunk by chunk (pyarrow 25).

    >>> col = pa.chunked_array([[0, 1, 2], [3, 4], [5]])
    >>> take_rows(col, np.array([1, 3, 4, 5])).num_chunks
    3
    >>> take_rows(col, np.array([5, 1, 3, 4])).to_pylist()
    [5, 1, 3, 4]
    """
    bounds = np.cumsum([0] + [len(c) for c in column.chunks])
    which = np.searchsorted(bounds, rows, side="right") - 1
    order = np.argsort(which, kind="stable")  # rows by chunk (already so when rows are sorted)
    parts = [column.chunk(c).take(pa.array(rows[order[which[order] == c]] - bounds[c]))
             for c in np.unique(which)]
    if np.all(order[1:] > order[:-1]):
        return pa.chunked_array(parts, type=column.type)
    joined = pa.concat_arrays(parts)
    return pa.chunked_array([joined.take(pa.array(np.argsort(order)))], type=column.type)


def _chunks(piece: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return piece.chunks if isinstance(piece, pa.ChunkedArray) else [piece]


def scatter_rows(pieces: list[pa.Array | pa.ChunkedArray], where: list[np.ndarray],
                 n: int) -> pa.Array:
    """One array of `n` rows, piece i's rows at positions `where[i]` (together the `where`s
    hold each of 0..n-1 once): a rank's chunk put together from the nodes' answers. Numbers
    and fixed-size lists of numbers take one numpy copy, written chunk by chunk; other types
    (token lists) Arrow's take, which copies twice (join, then take).

    >>> scatter_rows([pa.array([10, 30]), pa.array([20])], [np.array([0, 2]), np.array([1])], 3
    ...              ).to_pylist()
    [10, 20, 30]
    """
    parts = [_chunks(p) for p in pieces]
    kind = pieces[0].type
    fixed = pa.types.is_fixed_size_list(kind)
    inner = kind.value_type if fixed else kind
    if ((pa.types.is_integer(inner) or pa.types.is_floating(inner))
            and all(a.null_count == 0 and (not fixed or a.flatten().null_count == 0)
                    for chunks in parts for a in chunks)):
        width = kind.list_size if fixed else 1
        out = np.empty((n, width), dtype=inner.to_pandas_dtype())
        for chunks, rows in zip(parts, where, strict=True):
            start = 0
            for a in chunks:
                values = (a.flatten() if fixed else a).to_numpy(zero_copy_only=False)
                out[rows[start:start + len(a)]] = values.reshape(len(a), width)
                start += len(a)
        flat = pa.array(out.reshape(-1), type=inner)
        return pa.FixedSizeListArray.from_arrays(flat, width) if fixed else flat
    arrays = [a for chunks in parts for a in chunks]
    if not arrays:
        return pa.array([], type=kind)
    joined = pa.concat_arrays(arrays)
    return joined.take(pa.array(np.argsort(np.concatenate(where))))


class Fetch:
    """How a rank gets the large columns of some rows: `submit(positions)` (sorted, unique
    table positions) asks for them and returns at once; `result(handle)` waits for them, one
    Arrow table of the large columns in that order. `pipeline/blocks.py` fetches from the
    blocks on their nodes, `TableFetch` from a local table."""

    def submit(self, positions: np.ndarray) -> Any:
        raise NotImplementedError

    def result(self, handle: Any) -> pa.Table:
        raise NotImplementedError


class TableFetch(Fetch):
    """Rows of a local Arrow table (the reference the streamed rows are tested against)."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table

    def submit(self, positions: np.ndarray) -> Any:
        return self.table.take(pa.array(positions))

    def result(self, handle: Any) -> pa.Table:
        return handle


@dataclass(frozen=True)
class LargeColumns:
    """The config's large columns (what a rank fetches per row in the streaming mode)."""

    feature: str | None
    sequence: str | None
    target: str | None
    feature_width: int | None = None  # the features' D, for a window of no rows (plain lists)

    def names(self) -> list[str]:
        return [c for c in (self.feature, self.sequence, self.target) if c]


@dataclass
class Window:
    """Some rows of the table (sorted unique positions) with their large columns; gathers by
    table position like `SampleTable.gather`. `release` drops the rows when the feed moves on
    to the next chunk: its consumers take steps and parts one after another, and every step or
    part before still holds a reference to its window (a loop variable, a closure), which
    would otherwise keep a chunk's rows alive beside the next one's."""

    positions: np.ndarray
    rows: SampleTable | None  # ids, labels... of exactly those positions, in that order

    def release(self) -> None:
        self.rows = None

    def gather(self, positions: np.ndarray, **collate: Any) -> dict[str, np.ndarray]:
        if self.rows is None:  # a bug (a consumer that looks back), never bad input
            raise RuntimeError("rows of a window the feed has moved past")
        local = np.searchsorted(self.positions, positions)
        if len(positions) and (local.max() >= len(self.positions)
                               or not np.array_equal(self.positions[local], positions)):
            raise KeyError("rows outside the fetched window")  # a bug, never bad input
        return self.rows.gather(local, **collate)


def window(small: SampleTable, positions: np.ndarray, large: pa.Table,
           cols: LargeColumns) -> Window:
    """The rows at `positions` (sorted, unique): the small columns from `small`, the large
    ones from `large` (their rows, in that order)."""
    def at(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[positions]

    fetched = SampleTable.from_table(large, feature_column=cols.feature, label_column=None,
                                     sequence_column=cols.sequence, target_column=cols.target,
                                     feature_width=cols.feature_width)
    rows = dataclasses.replace(fetched, ids=small.ids[positions], labels=at(small.labels),
                               difficulty=at(small.difficulty),
                               lengths=fetched.lengths if fetched.lengths is not None
                               else at(small.lengths))
    return Window(positions, rows)


class StreamedRows:
    """A rank's rows, fetched ahead: for an epoch's steps (`steps`), and for any list of parts
    (validation, hard-mining scoring: `parts`), in chunks of about `chunk_rows` rows (at least
    one step). The steps' next `ahead` chunks are asked for while one is trained, so at most
    `ahead + 1` are held or on their way for the steps; a validation in mid-epoch
    (`train.eval_every`) reads through `parts`, two chunks more meanwhile."""

    def __init__(self, small: SampleTable, fetch: Fetch, cols: LargeColumns, rank: int,
                 world: int, chunk_rows: int = 2048, ahead: int = 2) -> None:
        self.small, self.fetch, self.cols = small, fetch, cols
        self.rank, self.world, self.chunk_rows = rank, world, chunk_rows
        self.ahead = max(1, ahead)
        self.fetched_bytes = 0  # what this rank received, for the data_fetched_mib metric
        self.wait_s = 0.0  # how long it waited for rows (data_wait_s)
        # Called with the rows of every chunk fetched, to raise on rows the model cannot take
        # (the data changed since the driver's checks: the worker's `data_outside_model`)
        self.check: Callable[[SampleTable], None] | None = None

    def _get(self, handle: Any, positions: np.ndarray) -> Window:
        start = time.perf_counter()
        large = self.fetch.result(handle)
        self.wait_s += time.perf_counter() - start
        self.fetched_bytes += large.nbytes
        try:
            win = window(self.small, positions, large, self.cols)
        except ConfigError:  # the table's own checks name the culprit
            raise
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError, ValueError, TypeError) as err:
            # as a whole table's load (pipeline/worker.py): the rows changed since the checks
            raise ConfigError(f"data error: rows fetched in the streaming mode: {err}") from None
        if self.check is not None:
            self.check(win.rows)
        return win

    def steps(self, batches: list[np.ndarray], steps: Iterable[tuple[np.ndarray, int]],
              guess: Callable[[int], int | None] | None = None
              ) -> Iterator[tuple[np.ndarray, int, Window]]:
        """Each step of `steps` (its global batch, its unit batches; from `group_units` over
        `batches`) with a window holding this rank's rows of it. `guess(n)` forecasts the unit
        batches of the epoch's n-th step (0-based) for the chunks asked for ahead; None, or
        no `guess`, for the size of the step they are asked from. A forecast that missed is
        not asked again this epoch (each of its chunks would miss)."""
        trusted = guess is not None

        def size(m: int, k: int) -> int:  # the forecast of step m, asked from a step of k
            forecast = guess(m) if trusted and guess is not None else None
            return k if forecast is None else forecast

        start = 0  # the unit batch the step begins with
        n = 0  # the epoch's step
        cur: dict[tuple[int, int], np.ndarray] = {}  # (start, k) -> my rows, the chunk in use
        cur_end = 0  # the unit batch after the chunk in use
        cur_window: Window | None = None
        # chunks asked for ahead: (their steps, positions, handle, the unit batch and the
        # epoch's step after their last)
        asked: deque[tuple[dict[tuple[int, int], np.ndarray], np.ndarray, Any, int, int]] = deque()
        try:
            for batch, k in steps:
                key = (start, k)
                if key not in cur:
                    if start < cur_end or (asked and key not in asked[0][0]):
                        asked.clear()  # the guess of the steps' size missed
                        trusted = False
                    if asked:
                        cur, pos, handle, end, after = asked.popleft()
                    else:  # the epoch's first chunk, or after a miss
                        cur, pos, end, after = self._chunk(
                            batches, start, n, lambda m, n=n, k=k: k if m == n else size(m, k))
                        handle = self.fetch.submit(pos)
                    cur_end = end
                    # ask on from the last chunk asked for
                    end, after = (asked[-1][3], asked[-1][4]) if asked else (end, after)
                    while len(asked) < self.ahead and end < len(batches):
                        nxt, nxt_pos, nxt_end, nxt_after = self._chunk(
                            batches, end, after, lambda m, k=k: size(m, k))
                        asked.append((nxt, nxt_pos, self.fetch.submit(nxt_pos), nxt_end,
                                      nxt_after))
                        end, after = nxt_end, nxt_after
                    if cur_window is not None:
                        cur_window.release()  # its steps are done: not held beside the next
                    cur_window = self._get(handle, pos)
                    handle = None  # the nodes' answers, joined into the window: not held too
                yield batch, k, cur_window
                start, n = start + k, n + 1
        finally:  # also when the consumer stops early (train.max_steps) or fails: the chunks
            asked.clear()  # asked for ahead and the one in use are not kept by this generator
            if cur_window is not None:
                cur_window.release()

    def _chunk(self, batches: list[np.ndarray], start: int, n: int, size: Callable[[int], int]
               ) -> tuple[dict[tuple[int, int], np.ndarray], np.ndarray, int, int]:
        """The steps from unit batch `start` (the epoch's n-th step) on, step m of `size(m)`
        unit batches, about `chunk_rows` of this rank's rows in all: {(start, k): my rows},
        their positions (sorted, unique), the unit batch and the epoch's step after the last."""
        steps: dict[tuple[int, int], np.ndarray] = {}
        rows = 0
        while start < len(batches) and (not steps or rows < self.chunk_rows):
            group = batches[start : start + max(1, size(n))]
            mine = rank_slice(group[0] if len(group) == 1 else np.concatenate(group),
                              self.rank, self.world)
            steps[(start, len(group))] = mine
            rows += len(mine)
            start, n = start + len(group), n + 1
        pos = np.unique(np.concatenate(list(steps.values()))) if steps else np.zeros(0, np.int64)
        return steps, pos, start, n

    def parts(self, parts: list[np.ndarray]) -> Iterator[tuple[np.ndarray, Window]]:
        """Each part with a window holding its rows, fetched in chunks, one chunk ahead."""
        chunks: list[list[np.ndarray]] = []
        for p in parts:
            if not chunks or sum(len(q) for q in chunks[-1]) >= self.chunk_rows:
                chunks.append([])
            chunks[-1].append(p)

        def ask(chunk: list[np.ndarray]) -> tuple[np.ndarray, Any]:
            pos = np.unique(np.concatenate(chunk))
            return pos, self.fetch.submit(pos)

        pending = ask(chunks[0]) if chunks else None
        win: Window | None = None
        try:
            for i, chunk in enumerate(chunks):
                pos, handle = pending
                pending = ask(chunks[i + 1]) if i + 1 < len(chunks) else None
                if win is not None:
                    win.release()
                win = self._get(handle, pos)
                handle = None  # (as in `steps`)
                for p in chunk:
                    yield p, win
        finally:  # also when the consumer stops early or fails
            pending = None
            if win is not None:
                win.release()
