"""Bad inputs counted once each over a whole run: in every epoch, DataLoader worker, process and resume.

An objective's ``count`` reports a ``skipped_*`` unit either as a number (added as it comes) or as
`BadInputs`, the stable ids of a batch's bad files. The trainer owns distinctness: `DistinctTally`
keeps the ids already counted (in the trainer state, so a resume remembers them) and, at each sync,
takes the union of every process's new ids, so one bad file that the per-epoch shuffle deals to two
processes counts once, not once per process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

GatherObjects = Callable[[Any], list[Any]]
"""Every process's object, in rank order (a collective); one process: ``[obj]``."""


def skip_id(name: str) -> int:
    """A stable 63-bit id of a bad input's name (its path): the same in every worker and process."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class BadInputs:
    """A ``count`` value for a ``skipped_*`` unit: the ids (`skip_id`) of the batch's bad inputs,
    counted or not before; the trainer counts each id once per run."""

    ids: tuple[int, ...] = ()

    @classmethod
    def of(cls, batch: dict[str, Any]) -> BadInputs | int:
        """A batch's ``skipped_ids`` (a tensor of `skip_id`) as `BadInputs`; a batch that does not
        name its bad inputs reports its ``skipped`` count, added as is."""
        ids = batch.get("skipped_ids")
        if ids is None:
            return int(batch.get("skipped", 0))
        return cls(tuple(int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)))


class DistinctTally:
    """The ids counted so far per unit, and this process's ids not yet synced."""

    def __init__(self, counted: dict[str, list[int]] | None = None) -> None:
        self.counted: dict[str, set[int]] = {u: {int(i) for i in ids} for u, ids in (counted or {}).items()}
        self.pending: dict[str, set[int]] = {}

    def add(self, unit: str, bad: BadInputs) -> None:
        new = set(bad.ids) - self.counted.get(unit, set())
        if new:
            self.pending.setdefault(unit, set()).update(new)

    def pending_count(self) -> int:
        return sum(len(ids) for ids in self.pending.values())

    def sync(self, gather: GatherObjects) -> dict[str, int]:
        """New distinct ids per unit over every process (a collective: every process calls it,
        with or without pending ids)."""
        mine = {u: sorted(ids) for u, ids in sorted(self.pending.items())}
        self.pending = {}
        new: dict[str, int] = {}
        for part in gather(mine):
            for unit, ids in part.items():
                known = self.counted.setdefault(unit, set())
                fresh = set(ids) - known
                known |= fresh
                new[unit] = new.get(unit, 0) + len(fresh)
        return new

    def state(self) -> dict[str, list[int]]:
        """For the trainer state: the counted ids, sorted (JSON-able, the same on every process)."""
        return {u: sorted(ids) for u, ids in sorted(self.counted.items())}
