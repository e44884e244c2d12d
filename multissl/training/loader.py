"""Deterministic, resumable, sharded batching.

Every batch carries a seed derived from ``(seed, split, epoch, batch number)``; collators draw all
their randomness (masks, negatives, crops) from a generator made from that seed. So a batch is the
same whether it is built in the main process or a worker, on one process or many, in a straight
run or after a resume — which is what makes "resume exactly" true for masking objectives.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler


def batch_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0]) >> 1


class ShardedBatches(Sampler[list[tuple[int, int]]]):
    """Sharding, resume and batch seeds shared by every batch sampler; subclasses only say what
    the epoch's global batches are (``_make_batches``).

    Global batch ``b`` goes to process ``b % world_size``. Training (``drop_last``) drops the last
    few batches so that every process gets the same count (DDP needs the same number of steps
    everywhere); eval keeps every sample exactly once. Each batch yields ``(index, batch_seed)``.
    """

    def __init__(self, *, seed: int, shuffle: bool, drop_last: bool, rank: int = 0, world_size: int = 1,
                 split_tag: int = 0) -> None:
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.rank, self.world_size, self.split_tag = rank, world_size, split_tag
        self.epoch = 0
        self.start_batch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _make_batches(self) -> list[list[int]]:
        raise NotImplementedError

    def global_batches(self) -> list[list[int]]:
        """Every process's batches for the current epoch, in order (cached per epoch)."""
        if self._cache is None or self._cache[0] != self.epoch:
            batches = self._make_batches()
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % self.world_size]
            self._cache = (self.epoch, batches)
        return self._cache[1]

    def __len__(self) -> int:
        return len(range(self.rank, len(self.global_batches()), self.world_size))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self.global_batches()
        for local_i, b in enumerate(range(self.rank, len(batches), self.world_size)):
            if local_i < self.start_batch:
                continue
            s = batch_seed(self.seed, self.split_tag, self.epoch, b)
            yield [(i, s) for i in batches[b]]


class ShardedBatchSampler(ShardedBatches):
    """Fixed-size batches of a permutation seeded by ``(seed, epoch)``."""

    def __init__(self, num_samples: int, batch_size: int, **kwargs: Any) -> None:
        if num_samples <= 0:
            raise ValueError("cannot batch an empty dataset")
        super().__init__(**kwargs)
        self.num_samples, self.batch_size = num_samples, batch_size

    def _make_batches(self) -> list[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(batch_seed(self.seed, self.split_tag, self.epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        batches = [order[i : i + self.batch_size] for i in range(0, self.num_samples, self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches


class DatasetView:
    """A `datasets.Dataset` wrapped with what its modality adds (a batch sampler, class names);
    indexing and length go to the dataset."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: Any) -> Any:
        return self.data[key]

    @property
    def column_names(self) -> list[str]:
        return self.data.column_names


class KeyedDataset(Dataset):
    """Fetches a whole batch at once (one Arrow read for `datasets`) and passes its seed along."""

    def __init__(self, data: Sequence[Any]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[dict[str, Any]], int]:
        return self.__getitems__([key])

    def __getitems__(self, keys: list[tuple[int, int]]) -> tuple[list[dict[str, Any]], int]:
        indices = [k[0] for k in keys]
        return rows(self.data, indices), keys[0][1]


def rows(data: Any, indices: list[int]) -> list[dict[str, Any]]:
    """Rows of a `datasets.Dataset` (read as one columnar slice) or any indexable sequence."""
    if hasattr(data, "column_names"):
        cols = data[indices]
        names = list(cols)
        return [dict(zip(names, vals)) for vals in zip(*(cols[n] for n in names))]
    return [data[i] for i in indices]


class SeededCollate:
    """Builds a ``torch.Generator`` from the batch seed and calls the objective's collator."""

    def __init__(self, collate: Callable[[list[dict[str, Any]], torch.Generator], Any]) -> None:
        self.collate = collate

    def __call__(self, item: tuple[list[dict[str, Any]], int]) -> Any:
        samples, seed = item
        return self.collate(samples, torch.Generator().manual_seed(seed))


def split_by_node(source: Any, rank: int, world_size: int) -> Any:
    """This process's part of a `datasets` stream (``split_dataset_by_node``: whole shards when the
    shard count divides by ``world_size``, else every ``world_size``-th row); the stream itself on one
    process. Every streamed modality shards here, so all of them split a source the same way."""
    if world_size <= 1:
        return source
    from datasets.distributed import split_dataset_by_node

    return split_dataset_by_node(source, rank=rank, world_size=world_size)


Cut = Callable[[list[dict[str, Any]], "np.random.Generator | None"], list[list[int]]]
"""How a buffer of rows becomes batches: ``(rows, rng) -> batches of indices into rows``; ``rng`` is
None when not shuffling (eval), else seeded by the buffer's position."""


class FixedSizeBatches:
    """A `Cut` into batches of ``batch_size`` rows, of a permutation of the buffer when shuffling.
    ``drop_last`` drops a short batch (only the stream's last buffer has one when the buffer is a
    multiple of the batch size, see `fixed_size_buffer`), as `ShardedBatchSampler` does for training."""

    def __init__(self, batch_size: int, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.drop_last = batch_size, drop_last

    def __call__(self, rows: list[dict[str, Any]], rng: np.random.Generator | None) -> list[list[int]]:
        order = rng.permutation(len(rows)).tolist() if rng is not None else list(range(len(rows)))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches


def fixed_size_buffer(buffer_rows: int, batch_size: int) -> int:
    """``buffer_rows`` rounded down to a whole number of batches (at least one), so that buffers cut
    into full batches and no short batch appears mid-epoch."""
    return max(1, buffer_rows // batch_size) * batch_size


class BufferedStream(IterableDataset):
    """``(rows, batch_seed)`` batches of a stream, cut buffer by buffer: what every streamed source
    shares (audio cuts its buffers by duration, images and image-text into fixed-size batches).

    Rows are read ``buffer_size`` at a time and ``cut`` into batches; with ``shuffle`` the cut gets a
    generator seeded by ``(seed, split, epoch, buffer number, rank)``, so a buffer's batches depend
    only on its rows and its position. Batch ``b`` of the epoch carries ``batch_seed(seed, split,
    epoch, b, rank)``. Streams cannot seek, so resume (``set_epoch(epoch, start_batch)``) reads and
    cuts the stream again and drops the first ``start_batch`` batches: the replayed batches and their
    seeds are those of an unbroken run. ``set_epoch`` reaches the source too (a `datasets` stream
    reshuffles its shards by epoch).
    """

    def __init__(self, source: Any, cut: Cut, *, buffer_size: int, seed: int, shuffle: bool, split_tag: int = 0,
                 rank: int = 0) -> None:
        self.source, self.cut, self.buffer_size = source, cut, max(1, buffer_size)
        self.seed, self.shuffle, self.split_tag, self.rank = seed, shuffle, split_tag, rank
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[list[dict[str, Any]], int]]:
        it = iter(self.source)
        b = 0
        for chunk_index in itertools.count():
            chunk = list(itertools.islice(it, self.buffer_size))
            if not chunk:
                return
            rng = (np.random.default_rng(batch_seed(self.seed, self.split_tag, self.epoch, chunk_index, self.rank))
                   if self.shuffle else None)
            for batch in self.cut(chunk, rng):
                if b >= self.start_batch:
                    yield [chunk[i] for i in batch], batch_seed(self.seed, self.split_tag, self.epoch, b, self.rank)
                b += 1


class SeededStream(BufferedStream):
    """A stream grouped in order into batches of ``batch_size`` (the last may be short): a
    `BufferedStream` whose buffer is one batch, for iterables without a batching of their own."""

    def __init__(self, source: Any, batch_size: int, *, seed: int, split_tag: int = 0, rank: int = 0) -> None:
        super().__init__(source, FixedSizeBatches(batch_size), buffer_size=batch_size, seed=seed, shuffle=False,
                         split_tag=split_tag, rank=rank)


def make_loader(
    data: Any,
    batch_size: int,
    collate: Callable[[list[dict[str, Any]], torch.Generator], Any],
    *,
    seed: int,
    shuffle: bool,
    drop_last: bool,
    rank: int,
    world_size: int,
    split_tag: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
) -> tuple[DataLoader, Any]:
    """A DataLoader over ``data`` and the object whose ``set_epoch(epoch, start_batch)`` positions it.

    A dataset with a ``make_batch_sampler(batch_size=, seed=, shuffle=, drop_last=, rank=, world_size=,
    split_tag=)`` method brings its own batch sampler (same protocol as `ShardedBatchSampler`); one
    with ``make_stream(...)`` (same arguments) its own iterable of ``(samples, seed)`` batches,
    usually a `BufferedStream`. Streams are read in this process (``num_workers`` is ignored for
    them): a `datasets` stream iterated inside DataLoader workers hands each worker only some of its
    shards, which would make the batches depend on the worker count.
    """
    common: dict[str, Any] = {
        "collate_fn": SeededCollate(collate),
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "persistent_workers": False,
        # Its own generator: creating an iterator must not draw from the global RNG, or a resumed
        # run (which starts an iterator mid-epoch) would shift dropout masks against a straight run.
        "generator": torch.Generator().manual_seed(seed),
    }
    if num_workers > 0:
        common["prefetch_factor"] = 4
        common["multiprocessing_context"] = multiprocessing_context
    kw = {"seed": seed, "shuffle": shuffle, "drop_last": drop_last, "rank": rank, "world_size": world_size, "split_tag": split_tag}
    # Streams run in this process: no workers, hence none of the worker-only options either.
    in_process = {k: v for k, v in common.items() if k not in ("prefetch_factor", "multiprocessing_context")}
    in_process["num_workers"] = 0
    if hasattr(data, "make_stream"):  # streamed audio, images, image-text: their own batching of the stream
        stream = data.make_stream(batch_size=batch_size, **kw)
        return DataLoader(stream, batch_size=None, **in_process), stream
    if isinstance(data, torch.utils.data.IterableDataset) or not hasattr(data, "__len__"):
        stream = SeededStream(data, batch_size, seed=seed, split_tag=split_tag, rank=rank)
        return DataLoader(stream, batch_size=None, **in_process), stream
    if hasattr(data, "make_batch_sampler"):  # e.g. audio: batches by duration under a samples budget
        sampler = data.make_batch_sampler(batch_size=batch_size, **kw)
    else:
        sampler = ShardedBatchSampler(len(data), batch_size, **kw)
    return DataLoader(KeyedDataset(data), batch_sampler=sampler, **common), sampler
