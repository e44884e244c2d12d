"""Recipes and fine-tuning tasks, found through Python entry points.

multissl's own are declared in its pyproject (groups ``multissl.recipes`` and ``multissl.finetune``,
modules of the ``multissl_recipes`` package); any installed package can add its own the same way,
and ``multissl pretrain THEIRS`` runs it. An entry point names a module with ``main(argv)`` (and,
optionally, ``DEFAULT_CONFIG``: the path of its default preset, whose folder holds its shipped
configs) or a ``main`` callable itself. The library never imports a recipe by name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Literal

from multissl.errors import MultiSSLError, first_line

Kind = Literal["pretrain", "finetune"]
GROUPS: dict[Kind, str] = {"pretrain": "multissl.recipes", "finetune": "multissl.finetune"}
WHAT: dict[Kind, str] = {"pretrain": "recipe", "finetune": "fine-tuning task"}


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: Kind
    entry_point: EntryPoint

    @property
    def source(self) -> str:
        """The installed distribution that declares it (``multissl``, or a plug-in's)."""
        dist = getattr(self.entry_point, "dist", None)
        return dist.name if dist is not None else "?"

    def load(self) -> Any:
        try:
            return self.entry_point.load()
        except Exception as err:  # a broken plug-in must not take the CLI down with a traceback
            raise MultiSSLError(f"{WHAT[self.kind]} {self.name!r} ({self.entry_point.value}, from {self.source}) "
                                f"cannot be loaded: {type(err).__name__}: {first_line(err)}") from None

    @property
    def main(self) -> Callable[[list[str] | None], Any]:
        target = self.load()
        main = target if callable(target) else getattr(target, "main", None)
        if not callable(main):
            raise MultiSSLError(f"{WHAT[self.kind]} {self.name!r} ({self.entry_point.value}) has no main(argv)")
        return main

    def configs(self) -> list[str]:
        """The shipped config files beside its default preset (package data), by name."""
        default = getattr(self.load(), "DEFAULT_CONFIG", None)
        if default is None:
            return []
        return sorted(p.name for p in Path(default).parent.glob("*.yaml"))


def available(kind: Kind) -> dict[str, Recipe]:
    """Every installed recipe (or task) of ``kind`` by name; a name two packages declare is an error."""
    found: dict[str, Recipe] = {}
    for ep in entry_points(group=GROUPS[kind]):
        recipe = Recipe(ep.name, kind, ep)
        if ep.name in found and found[ep.name].entry_point.value != ep.value:
            raise MultiSSLError(f"two installed packages declare the {WHAT[kind]} {ep.name!r}: "
                                f"{found[ep.name].entry_point.value} ({found[ep.name].source}) and {ep.value} "
                                f"({recipe.source}); uninstall one")
        found[ep.name] = recipe
    return dict(sorted(found.items()))


def find(kind: Kind, name: str) -> Recipe:
    """The recipe (or task) called ``name``, or an error naming the closest installed one."""
    known = available(kind)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        listed = ", ".join(known) or "none installed (reinstall multissl)"
        raise MultiSSLError(f"unknown {WHAT[kind]} {name!r}{hint}; available: {listed}")
    return known[name]
