"""Typed recipe configuration: dataclass defaults <- YAML file <- ``key=value`` overrides.

Every value is checked against the dataclass field's type, and an unknown key is an error that
names the key and its closest matches, so a typo never silently trains with a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from multissl.errors import ConfigError

T = TypeVar("T")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if get_origin(tp) in (list, tuple):
        return f"{get_origin(tp).__name__}[{', '.join(_type_name(a) for a in get_args(tp) if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise a ConfigError naming ``key``.

    Only lossless conversions happen: an int is accepted for a float, a list for a tuple.
    """
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            with contextlib.suppress(ConfigError):
                return coerce(value, option, key)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no / off / yes / on as a boolean
            spelled = [a for a in get_args(tp) if a is value or (isinstance(a, str) and yaml.safe_load(a) is value)]
            if len(spelled) == 1:
                return spelled[0]
        elif value in get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}{hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {value!r}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _unknown_key(key: str, known: list[str], where: str, segment: str | None = None) -> ConfigError:
    close = difflib.get_close_matches(segment or key.rsplit(".", 1)[-1], known, n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r}{where}{hint}")


def _field_default(cls: type, name: str, base: Any) -> Any:
    """A field's value before the config file: the enclosing default's (a recipe's
    ``TrainerConfig(lr=..., adam_betas=...)``), else the field's own default."""
    if base is not None:
        return getattr(base, name)
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _build(cls: type[T], values: dict[str, Any], prefix: str = "", base: T | None = None) -> T:
    """``cls`` from ``values``; fields not given keep ``base``'s values (or the class defaults), and a
    nested section keeps the enclosing default's values for the keys it does not set."""
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in types_:
            raise _unknown_key(key, list(types_), f" in section {prefix!r}" if prefix else "")
        tp = types_[name]
        default = _field_default(cls, name, base) if _is_dataclass_type(tp) and isinstance(value, dict) else None
        if default is not None and isinstance(default, tp):
            kwargs[name] = _build(tp, value, key, base=default)
        else:
            kwargs[name] = coerce(value, tp, key)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or cls.__name__}: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (tuples become lists so YAML stays readable)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, _Whole):
            out[k] = dict(v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    empty = ConfigError(f"config file {p} is empty (it sets no keys); put config keys in it, "
                        "or leave out --config to run the recipe's preset")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not a YAML text file (byte {err.start} is not UTF-8)") from None
    if not text.strip():  # before YAML, which calls a tab-only line a syntax error
        raise empty
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{p}{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:  # comments only: training the bare defaults (not the preset) would be a silent surprise
        raise empty
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3); the value is read as YAML so ``[1,2]``/``null``/``true`` work."""
    if "=" not in text:
        raise ConfigError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"empty key in override {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_dotted(tree: dict[str, Any], cls: type, path: list[str], value: Any) -> None:
    """Set one override, validating every segment of its path against the schema."""
    types_ = _field_types(cls)
    head, rest = path[0], path[1:]
    if head not in types_:
        raise _unknown_key(".".join(path), list(types_), "", segment=head)
    tp = types_[head]
    if rest:
        if not _is_dataclass_type(tp):
            raise ConfigError(f"{head} is a {_type_name(tp)}, it has no key {'.'.join(rest)!r}")
        sub = tree.setdefault(head, {})
        try:
            _set_dotted(sub, tp, rest, value)
        except ConfigError as err:
            # name the full key; the hint stays the innermost section's (trainer.hub.repo -> repo_id)
            unknown = re.match(r"unknown config key ('[^']*'|\"[^\"]*\")(.*)$", str(err))
            if unknown:
                raise ConfigError(f"unknown config key {'.'.join(path)!r}{unknown.group(2)}") from None
            raise
    else:
        tree[head] = _Whole(value) if isinstance(value, dict) and not _is_dataclass_type(tp) else value


class _Whole(dict):
    """An override's value for a mapping field (``model.backbone.kwargs={...}``): it replaces the
    file's mapping instead of merging into it, so an override can drop keys."""


MOVED_SECTIONS = {"trainer.hub": "hub", "trainer.probe": "probe"}
"""Sections that moved (old prefix -> new): named in the error instead of a bare unknown key."""


def _check_moved(key: str, where: str = "") -> None:
    for old, new in MOVED_SECTIONS.items():
        if key == old or key.startswith(old + "."):
            raise ConfigError(f"config key {key!r}{where} moved to {new + key[len(old):]!r}")


def build(cls: type[T], file: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Resolve ``cls`` defaults <- ``file`` <- ``overrides`` into a validated instance."""
    tree: dict[str, Any] = read_yaml(file) if file else {}
    for section, value in tree.items():
        for name in value if isinstance(value, dict) else ():
            _check_moved(f"{section}.{name}", f" in {file}")
    for item in overrides or []:
        path, value = parse_override(item)
        _check_moved(".".join(path))
        patch: dict[str, Any] = {}
        _set_dotted(patch, cls, path, value)
        tree = _merge(tree, patch)
    return _build(cls, tree)


def save(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def load(cls: type[T], argv: list[str] | None, default_config: str | Path | None = None) -> T:
    """Parse recipe arguments: ``[--config FILE] [key=value ...]``.

    With no ``--config`` the recipe's ``default_config`` (its tiny preset) is used; ``--config NAME``
    takes a config shipped beside it (``small``, ``base``).
    """
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    file: str | Path | None = default_config
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c"):
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file path")
            file = args[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            file = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}; use --config FILE and key=value overrides")
        else:
            overrides.append(arg)
        i += 1
    return build(cls, shipped_config(file, default_config), overrides)


def shipped_config(file: str | Path | None, default_config: str | Path | None) -> str | Path | None:
    """``--config small`` (or ``small.yaml``) names a config shipped beside the recipe's default
    preset, wherever the package is installed; anything that exists as a path is taken as it is."""
    if file is None or default_config is None or Path(file).exists() or len(Path(file).parts) != 1:
        return file
    name = str(file) if str(file).endswith((".yaml", ".yml")) else f"{file}.yaml"
    candidate = Path(default_config).parent / name
    if candidate.is_file():
        return candidate
    shipped = sorted(p.stem for p in Path(default_config).parent.glob("*.yaml"))
    raise ConfigError(f"config file not found: {file} (shipped configs: {', '.join(shipped)})")
