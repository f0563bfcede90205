"""One rank's batch feed: the epoch's plan -> optimizer steps -> this rank's rows -> micro-batches
-> collated arrays (pure numpy).

The Ray Train worker trains on it (`pipeline/worker.py`) and `inspect-batches` records it
(`pipeline/inspect.py`): both walk an epoch through `RankFeed.epoch` and cut a step's rows with
`FeedStep.micro`, so what is inspected is what is trained by construction -- but for what
only training knows: hard-example mining plans each epoch after the first from the losses
training measured (inspection shows uniform draws for those epochs), an `adaptive` batch-size
schedule groups unit batches into steps by the noise scale training measures (inspection
shows the unit batches), and an `auto` micro-batch shrinks on an out-of-memory. Training
collates a micro-batch (`RankFeed.collate`); inspection takes its shape from the function the
collate pads or packs to (`RankFeed.shape`). In the streaming mode (`data.mode`) the feed holds
only the small columns, and a step's rows are fetched ahead (`pipeline/data/rows.py`); the
plans, and so the batches, are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.config import Config
from pipeline.data.batches import SampleTable, micro_slices
from pipeline.data.epochs import EpochBatches, epoch_batches
from pipeline.data.padding import batch_shape
from pipeline.data.plan import rank_slice
from pipeline.data.rows import StreamedRows, Window
from pipeline.data.views import make_views
from pipeline.engine.batch_schedule import group_units


def image_shape(model_name: str) -> tuple[int, int] | None:
    """The image a row's features form, for contrastive views (`make_views`): digits' 8 x 8."""
    return (8, 8) if model_name == "digits_cnn" else None


def collate(cfg: Config, part: np.ndarray, key: tuple[int, ...], rows: SampleTable | Window,
            image_shape: tuple[int, int] | None) -> dict[str, np.ndarray]:
    """The micro-batch `part` (table positions) as arrays, gathered from `rows` and padded (or
    packed); for a contrastive loss, `batching.num_views` augmented views per sample keyed by
    (seed, epoch, sample, view), so they do not depend on how the batch is split. Training and
    `find-batch-size` both collate with it."""
    b = cfg.batching
    nb = rows.gather(part, max_length=b.max_length, pad_multiple_of=b.pad_multiple_of,
                     packing=b.packing, pack_tokens=b.pack_tokens)
    if cfg.train.loss == "nt_xent":
        nb = make_views(nb, num_views=b.num_views, key=key, sample_keys=part,
                        image_shape=image_shape)
        nb["view_to_sample"] = part[nb["view_to_sample"]]  # unique across the global batch
    return nb


@dataclass(frozen=True)
class FeedStep:
    """One optimizer step as one rank takes it."""

    batch: np.ndarray  # the step's global batch (table positions, in plan order)
    units: int  # the unit batches it joins (1 for a constant batch size)
    mine: np.ndarray  # this rank's share of it (`rank_slice`)
    rows: SampleTable | Window  # where its rows are gathered from (`RankFeed.collate`)

    def micro(self, size: int) -> list[np.ndarray]:
        """This rank's rows as consecutive micro-batches of at most `size`."""
        return micro_slices(self.mine, size)


class RankFeed:
    """The batches rank `rank` of `world` trains on, epoch by epoch: a function of the data, the
    seed, the epoch and the batch sizes, never of the worker count for the global batches."""

    def __init__(self, cfg: Config, st: SampleTable, train_pos: np.ndarray, rank: int,
                 world: int, image_shape: tuple[int, int] | None = None,
                 streamed: StreamedRows | None = None) -> None:
        self.cfg, self.st, self.train_pos = cfg, st, train_pos
        self.rank, self.world = rank, world
        self.image_shape = image_shape  # contrastive views of image rows (digits: 8 x 8)
        # The streaming mode: `st` holds only the small columns; the rows of the coming steps
        # are fetched ahead by `streamed` (pipeline/data/rows.py). The object-store mode gathers
        # from `st` itself.
        self.streamed = streamed

    def epoch(self, epoch: int, units: Callable[[], int],
              sample_losses: np.ndarray | None = None,
              guess: Callable[[int], int | None] | None = None
              ) -> tuple[EpochBatches, Generator[FeedStep, None, None]]:
        """The epoch's plan and its steps. `units()` is asked before each step for how many unit
        batches it joins (a batch-size schedule; 1 for a constant batch). `guess(n)`, where the
        schedule knows it in advance, is what `units()` will say for the epoch's n-th step: the
        streaming mode fetches rows ahead for it (a wrong guess costs a fetch, never a batch)."""
        eb = epoch_batches(self.cfg, self.st, self.train_pos, epoch, self.world, sample_losses)
        return eb, self._steps(eb.batches, units, guess)

    def _steps(self, batches: list[np.ndarray], units: Callable[[], int],
               guess: Callable[[int], int | None] | None) -> Generator[FeedStep, None, None]:
        grouped = group_units(batches, units)
        if self.streamed is None:
            for batch, k in grouped:
                yield FeedStep(batch, k, rank_slice(batch, self.rank, self.world), self.st)
            return
        for batch, k, rows in self.streamed.steps(batches, grouped, guess):
            yield FeedStep(batch, k, rank_slice(batch, self.rank, self.world), rows)

    def over(self, parts: list[np.ndarray]) -> Iterator[tuple[np.ndarray, SampleTable | Window]]:
        """Each of `parts` (validation micro-batches, a scoring pass) with where to gather its
        rows from (fetched a chunk ahead in the streaming mode). An empty part (a rank's share
        of a validation split smaller than the ranks) is gathered as an empty batch. The ranks
        may run different numbers of forward passes (their shares of a validation split differ
        by a row, cut into micro-batches): a pass over them must hold no collective (evaluation
        and scoring sum after the passes; contrastive validation pads its parts alike)."""
        if self.streamed is None:
            return ((part, self.st) for part in parts)
        return self.streamed.parts(parts)

    def collate(self, part: np.ndarray, key: tuple[int, ...], rows: SampleTable | Window
                ) -> dict[str, np.ndarray]:
        """The micro-batch `part` as arrays (`collate`), gathered from `rows`: its step's, or
        its part's from `over`."""
        return collate(self.cfg, part, key, rows, self.image_shape)

    def shape(self, part: np.ndarray) -> tuple[int, int]:
        """The (rows, width) of the token arrays `collate` makes for `part` (padded: a row per
        sample, as long as the longest; packed: the packed rows); (0, 0) without sequences."""
        if self.st.lengths is None:
            return 0, 0
        b = self.cfg.batching
        return batch_shape(self.st.lengths[part], max_length=b.max_length,
                           multiple_of=b.pad_multiple_of, packing=b.packing,
                           pack_tokens=b.pack_tokens)
