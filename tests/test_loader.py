"""Sharded, seeded, resumable batching."""

from __future__ import annotations

import pytest

from multissl.training.loader import ShardedBatchSampler


def _epoch(n: int, bs: int, world: int, drop_last: bool, epoch: int = 0, start: int = 0) -> list[list[list[tuple[int, int]]]]:
    out = []
    for rank in range(world):
        s = ShardedBatchSampler(n, bs, seed=1, shuffle=True, drop_last=drop_last, rank=rank, world_size=world)
        s.set_epoch(epoch, start)
        out.append(list(s))
        assert len(s) == len(out[-1]) + start
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_split_covers_each_sample_once(world: int) -> None:
    per_rank = _epoch(103, 10, world, drop_last=False)
    seen = [i for batches in per_rank for b in batches for i, _ in b]
    assert sorted(seen) == list(range(103))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_ranks_get_equal_disjoint_batches(world: int) -> None:
    per_rank = _epoch(103, 10, world, drop_last=True)
    assert len({len(b) for b in per_rank}) == 1
    seen = [i for batches in per_rank for b in batches for i, _ in b]
    assert len(seen) == len(set(seen)) and all(len(b) == 10 for r in per_rank for b in r)


def test_epochs_reshuffle_and_seeds_are_per_batch() -> None:
    e0, e1 = _epoch(50, 5, 1, True, 0)[0], _epoch(50, 5, 1, True, 1)[0]
    assert [i for b in e0 for i, _ in b] != [i for b in e1 for i, _ in b]
    seeds = [b[0][1] for b in e0]
    assert len(set(seeds)) == len(seeds) and all(len({s for _, s in b}) == 1 for b in e0)
    assert _epoch(50, 5, 1, True, 0)[0] == e0, "deterministic"


def test_start_batch_skips_exactly() -> None:
    full = _epoch(64, 8, 2, True)[1]
    resumed = _epoch(64, 8, 2, True, start=2)[1]
    assert resumed == full[2:]
