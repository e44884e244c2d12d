"""Frozen-feature probes: how much a representation already knows, measured cheaply and label-efficiently.

An encoder is frozen; every example becomes one mean-pooled feature vector (text: over non-pad
tokens of the last hidden state; audio: over valid frames; images: open_clip's ``encode_image``).
Two classifiers are fit on the training examples' features and scored on held-out ones:

- linear: multinomial logistic regression on standardised features, full-batch L-BFGS from zero
  weights (a convex problem: deterministic, no learning rate to tune);
- kNN: cosine similarity, the k nearest training examples vote with weights exp(sim / 0.07)
  (the weighted kNN of Wu et al. 2018, as DINO evaluates).

Tasks: the embedded ones (``text-topics``: Python documentation chapter, 5 classes; ``keywords``:
spoken command words, whole speakers held out; ``shapes``: 36 coloured shapes) or labelled files
(``files``). Nothing here consumes torch's global random state, so a probe during pretraining does
not change the training run it observes.

Entry points: `probe_encoder` (any features function: an objective's during training, through
`multissl.callbacks.ProbeCallback`), `probe_output` (a saved run or model folder; ``multissl probe``).
Features come from `multissl.models` (in-memory objectives and saved folders alike).
"""

from __future__ import annotations

import contextlib
import difflib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from multissl.data.labels import LabelMap, class_label_names, is_label_id, is_missing, sorted_names
from multissl.data.text_checks import strip_controls
from multissl.errors import ConfigError, DataError, first_line
from multissl.training.objective import Modality

if TYPE_CHECKING:  # torch and numpy load inside the functions: building the CLI's parser stays instant
    import numpy as np
    import torch
    from torch import nn

TASKS = ("text-topics", "keywords", "shapes", "digits", "files")
TASK_MODALITY: dict[str, Modality] = {"text-topics": "text", "keywords": "audio", "shapes": "image", "digits": "image"}
DEFAULT_TASK: dict[str, str] = {"text": "text-topics", "audio": "keywords", "image": "shapes"}
KNN_TEMPERATURE = 0.07  # DINO's weighted-kNN temperature
_CACHE_SIZE = 4


@dataclass
class ProbeConfig:
    """What to probe on and how; also the trainer's ``trainer.probe`` section (``task=""`` = off)."""

    task: Literal["", "text-topics", "keywords", "shapes", "digits", "files"] = ""
    """Empty = off in the trainer (``multissl probe`` then takes the model's embedded task); text-topics
    (text), keywords (audio), shapes (image), or files (labelled data in `files`)."""
    files: list[str] = field(default_factory=list)
    """task=files: .csv/.tsv/.jsonl/.parquet files or folders with a text (or audio/image path) column and a
    label column; paths are relative to the file that names them."""
    eval_files: list[str] = field(default_factory=list)
    """task=files: the eval examples; empty = hold out 20% of `files` (whole speakers when there is a
    speaker column, else by a hash of the text or path)."""
    text_column: str = "text"
    label_column: str = "label"
    """Labels as names (mapped to ids in sorted order) or integers."""
    path_column: str = "path"
    """Audio/image files: the column with their paths (imagefolder's ``file_name`` is used when absent)."""
    max_train: int = 2000
    """At most this many training examples (the first N of a seeded shuffle), to keep a probe cheap."""
    max_eval: int = 1000
    batch_size: int = 32
    """Examples per forward pass while extracting features."""
    knn_k: int = 20
    """Neighbours that vote (clipped to the number of training examples): ``knn_acc``."""
    knn_extra_k: list[int] = field(default_factory=lambda: [200])
    """More neighbour counts, each reported as ``knn<k>_acc`` (image SSL papers quote k=20 and k=200)."""
    linear_epochs: int = 100
    """Full-batch L-BFGS iterations of the linear classifier (each one pass over all training features)."""
    linear_weight_decay: float = 1e-4
    """L2 penalty weight_decay/2 * ||W||^2 on the linear classifier (on standardised features)."""
    max_seconds: float = 10.0
    """Audio longer than this is cut to its first max_seconds (bounds memory; the embedded words are ~1 s)."""
    seed: int = 0
    """Picks the capped subsets; nothing else in a probe is random."""

    def __post_init__(self) -> None:
        if self.task not in ("", *TASKS):
            close = difflib.get_close_matches(str(self.task), TASKS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"probe.task must be one of {', '.join(TASKS)} (or empty = off), got {self.task!r}{hint}")
        if self.task == "files" and not self.files:
            raise ConfigError("probe.files is required with probe.task=files")
        if (self.files or self.eval_files) and self.task != "files":
            raise ConfigError(f"probe.files/probe.eval_files are only read with probe.task=files, not {self.task!r}")
        if self.eval_files and not self.files:
            raise ConfigError("probe.eval_files needs probe.files (the training examples) too")
        for name in ("max_train", "max_eval", "batch_size", "knn_k", "linear_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"probe.{name} must be >= 1, got {getattr(self, name)}")
        if any(k < 1 for k in self.knn_extra_k):
            raise ConfigError(f"probe.knn_extra_k must hold counts >= 1, got {self.knn_extra_k}")
        if not self.linear_weight_decay >= 0:
            raise ConfigError(f"probe.linear_weight_decay must be >= 0, got {self.linear_weight_decay}")
        if not self.max_seconds > 0:
            raise ConfigError(f"probe.max_seconds must be > 0, got {self.max_seconds}")
        for name in ("text_column", "label_column", "path_column"):
            if not getattr(self, name):
                raise ConfigError(f"probe.{name} must not be empty")


# ------------------------------------------------------------------------------- classifiers
def _standardize(train_x: torch.Tensor, eval_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero mean, unit variance per dimension (train statistics), so one weight decay fits every encoder."""
    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True, unbiased=False).clamp_min(1e-6)
    return (train_x - mean) / std, (eval_x - mean) / std


def _accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred == target).float().mean()) if len(target) else float("nan")


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor,
                 num_classes: int, *, epochs: int = 100, weight_decay: float = 1e-4) -> float:
    """Eval accuracy of an L2-regularised softmax classifier fit by full-batch L-BFGS from zero weights.

    The problem is convex and the start fixed, so the result is deterministic without a seed and
    needs no learning rate; features are standardised with the training statistics first.
    """
    import torch
    from torch import nn

    with torch.inference_mode(False), torch.enable_grad():  # the trainer evaluates under no_grad
        x, xe = _standardize(train_x.detach().float().cpu().clone(), eval_x.detach().float().cpu().clone())
        y = train_y.detach().long().cpu().clone()
        weight = torch.zeros(x.shape[1], num_classes, requires_grad=True)
        bias = torch.zeros(num_classes, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=epochs, history_size=10,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            pred = (xe @ weight + bias).argmax(1)
    return _accuracy(pred, eval_y.long().cpu())


def knn_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor,
              num_classes: int, *, k: int = 20, chunk: int = 1024) -> float:
    """Eval accuracy of a cosine kNN whose k nearest neighbours vote with weights exp(sim / 0.07).

    Needs no training and no hyper-parameters beyond k, so it reads the geometry of the features as
    they are; ``k`` is clipped to the training set size, ties go to the lower class id.
    """
    import torch
    from torch import nn

    train = nn.functional.normalize(train_x.detach().float().cpu(), dim=1)
    evals = nn.functional.normalize(eval_x.detach().float().cpu(), dim=1)
    labels = train_y.detach().long().cpu()
    k = max(1, min(k, len(train)))
    preds = []
    for start in range(0, len(evals), chunk):
        sim, idx = (evals[start : start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes).scatter_add_(1, labels[idx], (sim / KNN_TEMPERATURE).exp())
        preds.append(votes.argmax(1))
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    return _accuracy(pred, eval_y.long().cpu())


def probe_features(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor,
                   num_classes: int, cfg: ProbeConfig) -> dict[str, float]:
    """``{"linear_acc", "knn_acc", "knn<k>_acc" for each extra k, "chance"}``; chance is the majority
    class's share of eval (what always answering the most common class scores), so an accuracy
    means something beside it."""
    import torch

    if len(train_x) == 0 or len(eval_x) == 0:
        raise DataError(f"a probe needs training and eval examples; got {len(train_x)} and {len(eval_x)}")
    counts = torch.bincount(eval_y.long().cpu(), minlength=num_classes)
    return {
        "linear_acc": linear_probe(train_x, train_y, eval_x, eval_y, num_classes,
                                   epochs=cfg.linear_epochs, weight_decay=cfg.linear_weight_decay),
        "knn_acc": knn_probe(train_x, train_y, eval_x, eval_y, num_classes, k=cfg.knn_k),
        **{f"knn{k}_acc": knn_probe(train_x, train_y, eval_x, eval_y, num_classes, k=k)
           for k in cfg.knn_extra_k if k != cfg.knn_k},
        "chance": float(counts.max()) / len(eval_y),
    }


# ------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ProbeData:
    """A probe task's examples: texts, or audio/image file paths, with label ids into ``classnames``."""

    task: str
    modality: Modality
    classnames: tuple[str, ...]
    train: tuple[Any, ...]
    train_labels: tuple[int, ...]
    eval: tuple[Any, ...]
    eval_labels: tuple[int, ...]


def _class_names(values: Sequence[Any]) -> tuple[list[str], Callable[[Any], int]]:
    """Sorted distinct labels (integers numerically, names alphabetically) and value -> id."""
    if all(is_label_id(v) for v in values):
        ints = sorted({int(v) for v in values})
        lookup = {v: i for i, v in enumerate(ints)}
        return [str(v) for v in ints], lambda v: lookup[int(v)]
    names = sorted_names(values)
    lookup_names = LabelMap(names).label2id
    return list(names), lambda v: lookup_names[str(v).strip()]


def _capped(n: int, limit: int, seed: int, salt: int) -> np.ndarray:
    """The first ``limit`` of a seeded shuffle of ``range(n)``, in index order."""
    import numpy as np

    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, salt]).permutation(n)[:limit])


def _finish(task: str, modality: Modality, train: list[tuple[Any, Any]], evals: list[tuple[Any, Any]],
            cfg: ProbeConfig, classnames: Sequence[str] | None = None, where: str = "") -> ProbeData:
    """Labels to ids, both splits capped, and the checks every task needs (two classes, both splits)."""
    if classnames is None:
        classnames, to_id = _class_names([y for _, y in train + evals])
    else:
        to_id = int
    where = where or f"probe task {task!r}"
    if not train or not evals:
        raise DataError(f"{where}: needs training and eval examples; got {len(train)} and {len(evals)}")
    train_ids = [to_id(y) for _, y in train]
    if len(set(train_ids)) < 2:
        raise DataError(f"{where}: the training examples hold {len(set(train_ids))} class; a probe needs at least 2")
    keep_t, keep_e = _capped(len(train), cfg.max_train, cfg.seed, 0), _capped(len(evals), cfg.max_eval, cfg.seed, 1)
    return ProbeData(task, modality, tuple(classnames), tuple(train[i][0] for i in keep_t),
                     tuple(train_ids[i] for i in keep_t), tuple(evals[i][0] for i in keep_e),
                     tuple(to_id(evals[i][1]) for i in keep_e))


def _split(rows: list[tuple[Any, Any]], keys: list[str], what: str) -> tuple[list[Any], list[Any]]:
    """``(train, eval)``: whole keys (speakers, texts, paths) held out by `heldout_mask`."""
    from multissl.data.demo import HELDOUT_FRACTION, heldout_mask

    held = heldout_mask(keys, HELDOUT_FRACTION)
    if held is None:
        raise DataError(f"{what}: too few distinct examples to hold out an eval split; give probe.eval_files")
    return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]


def _jsonl(path: Path, keys: Sequence[str]) -> list[dict[str, Any]]:
    """An embedded corpus's manifest rows, each checked for ``keys``."""
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {n}: not JSON ({err.msg})") from None
        missing = [k for k in keys if not isinstance(row, dict) or is_missing(row.get(k))]
        if missing:
            raise DataError(f"{path}: line {n}: no {', '.join(repr(k) for k in missing)}")
        rows.append(row)
    return rows


def _topics_data(cfg: ProbeConfig) -> ProbeData:
    """The embedded topic task; its eval paragraphs are the ones text pretraining holds out."""
    from multissl.data.demo import TOPIC_LABELS, demo_topic_splits

    train, evals = demo_topic_splits()
    pairs = lambda ds: list(zip(ds["text"], ds["label"]))  # noqa: E731
    return _finish("text-topics", "text", pairs(train), pairs(evals), cfg, TOPIC_LABELS)


def _keywords_data(cfg: ProbeConfig) -> ProbeData:
    """The embedded spoken-word task: whole speakers held out, so it measures words, not voices."""
    try:
        from multissl.data.keyword_demo import default_keyword_corpus
    except ImportError as err:
        raise ConfigError(f"probe.task='keywords' needs multissl.data.keyword_demo ({first_line(err)})") from None
    manifest = Path(default_keyword_corpus())
    rows = _jsonl(manifest, ("path", "label"))
    pairs = [(str(manifest.parent / r["path"]), r["label"]) for r in rows]
    train, evals = _split(pairs, [str(r.get("speaker", r["path"])) for r in rows], str(manifest))
    return _finish("keywords", "audio", train, evals, cfg, where=str(manifest))


def _shapes_data(cfg: ProbeConfig) -> ProbeData:
    """The embedded shapes task (36 colour x shape classes), split by file name."""
    from multissl.data.shapes_demo import default_shapes_corpus

    metadata = Path(default_shapes_corpus())
    rows = _jsonl(metadata, ("file_name", "label"))
    pairs = [(str(metadata.parent / r["file_name"]), r["label"]) for r in rows]
    train, evals = _split(pairs, [r["file_name"] for r in rows], str(metadata))
    return _finish("shapes", "image", train, evals, cfg, where=str(metadata))


def _digits_data(cfg: ProbeConfig) -> ProbeData:
    """The embedded digits (real MNIST, 10 classes), split by file name as image pretraining splits
    them, so a pretrained backbone is probed on images it never saw."""
    from multissl.data.digits_demo import default_digits_corpus

    folder = default_digits_corpus()
    paths = sorted(folder.glob("*/*.png"))
    pairs = [(str(p), p.parent.name) for p in paths]
    train, evals = _split(pairs, [p.name for p in paths], str(folder))
    return _finish("digits", "image", train, evals, cfg, where=str(folder))


def _read_table(path: Path) -> Any:
    """One labelled file as a `datasets.Dataset`, or a DataError naming it."""
    from multissl.data.files import read_files

    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    ds = read_files([path], "probe.files")
    if len(ds) == 0:
        raise DataError(f"{path}: holds no rows")
    return ds


def _column(ds: Any, path: Path, names: Sequence[str], key: str) -> str:
    for name in names:
        if name in ds.column_names:
            return name
    raise DataError(f"{path}: no column {names[0]!r} (columns: {', '.join(ds.column_names)}); set {key}")


def _file_rows(path: Path, cfg: ProbeConfig, modality: Modality) -> tuple[list[tuple[Any, Any]], list[str]]:
    """``[(text or absolute path, label)]`` of one file and each row's split key (speaker, text or path)."""
    ds = _read_table(path)
    label_col = _column(ds, path, [cfg.label_column], "probe.label_column")
    if modality == "text":
        source_col = _column(ds, path, [cfg.text_column], "probe.text_column")
    else:
        source_col = _column(ds, path, [cfg.path_column, "file_name"], "probe.path_column")
    names = class_label_names(ds.features[label_col])  # a ClassLabel column: use its names
    rows, keys, empty = [], [], 0
    for n, row in enumerate(ds, start=1):
        source, label = row[source_col], row[label_col]
        if is_missing(label):
            raise DataError(f"{path}: row {n}: empty label in column {label_col!r}")
        if modality == "text" and isinstance(source, str):  # NULs of a bad export never reach the model
            source = strip_controls(source)[0]
        if is_missing(source):
            empty += 1
            continue
        if modality != "text":
            p = Path(str(source)).expanduser()
            source = str(p if p.is_absolute() else path.parent / p)
            if not Path(source).is_file():
                raise DataError(f"{path}: row {n}: no such file: {source}")
        rows.append((source, names[label] if names else label))
        keys.append(str(row.get("speaker") or source) if modality == "audio" else str(source))
    if empty:
        print(f"warning: {path}: skipped {empty} row(s) with an empty {source_col!r}", flush=True)
    return rows, keys


def _files_data(cfg: ProbeConfig, modality: Modality) -> ProbeData:
    from multissl.data.files import TABLE_FILES, expand_files

    def read(paths: list[str], key: str) -> tuple[list[tuple[Any, Any]], list[str]]:
        rows, keys = [], []
        for f in expand_files(paths, TABLE_FILES, key):
            r, k = _file_rows(f, cfg, modality)
            rows += r
            keys += k
        return rows, keys

    train, keys = read(cfg.files, "probe.files")
    if cfg.eval_files:
        evals = read(cfg.eval_files, "probe.eval_files")[0]
    else:
        train, evals = _split(train, keys, "probe.files")
    return _finish("files", modality, train, evals, cfg, where="probe.files")


_DATA_CACHE: dict[tuple[Any, ...], ProbeData] = {}


def _stamp(paths: list[str]) -> tuple[Any, ...]:
    """Paths with size and mtime: an edited file is read again."""
    out = []
    for p in paths:
        try:
            st = Path(p).stat()
        except OSError:  # reported by the loader, which names it
            out.append((p, None, None))
        else:
            out.append((p, st.st_size, st.st_mtime_ns))
    return tuple(out)


def load_probe_data(cfg: ProbeConfig, modality: Modality) -> ProbeData:
    """The examples of ``cfg.task`` for a ``modality`` model, cached per process (the trainer probes at
    every evaluation; audio and images are decoded per probe, not kept, to bound memory)."""
    task = cfg.task or DEFAULT_TASK[modality]
    if task != "files" and TASK_MODALITY[task] != modality:
        raise ConfigError(f"probe.task={task!r} is for {TASK_MODALITY[task]} models; this is a {modality} model "
                          f"(its embedded task: {DEFAULT_TASK[modality]!r}, or use probe.task=files)")
    key = (task, modality, _stamp(cfg.files), _stamp(cfg.eval_files), cfg.text_column, cfg.label_column,
           cfg.path_column, cfg.max_train, cfg.max_eval, cfg.seed)
    if key not in _DATA_CACHE:
        loaders = {"text-topics": _topics_data, "keywords": _keywords_data, "shapes": _shapes_data,
                   "digits": _digits_data}
        data = loaders[task](cfg) if task in loaders else _files_data(cfg, modality)
        while len(_DATA_CACHE) >= _CACHE_SIZE:
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
        _DATA_CACHE[key] = data
    return _DATA_CACHE[key]


# ------------------------------------------------------------------------------- probing a model
@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode for the probe, then every submodule's own train/eval flag back (a frozen part stays
    frozen); gradients stay off."""
    import torch

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def probe_encoder(model: nn.Module, modality: Modality, features: Callable[[Sequence[Any]], torch.Tensor],
                  cfg: ProbeConfig) -> tuple[dict[str, float], ProbeData]:
    """``{"linear_acc", "knn_acc", "chance"}`` of ``features`` (inputs -> one vector each, from the
    frozen ``model``) on ``cfg.task`` ("" = the modality's embedded task), with the data it used.

    The model's train/eval flags are restored and its weights, gradients and torch's random state
    are left untouched. Runs locally (no collectives): call it on the main process only."""
    import torch

    data = load_probe_data(cfg, modality)
    with _frozen(model):
        train_x, eval_x = features(data.train), features(data.eval)
    metrics = probe_features(train_x, torch.tensor(data.train_labels), eval_x, torch.tensor(data.eval_labels),
                             len(data.classnames), cfg)
    return metrics, data


def probe_output(output_dir: str | Path, cfg: ProbeConfig, device: torch.device | str | None = None,
                 random_init: int | None = None) -> dict[str, Any]:
    """Probe a saved run (``output_dir`` with ``model/``) or model folder on ``cfg.task`` ("" = the
    model's embedded task); with ``random_init`` (a seed), its architecture with fresh weights instead.
    Returns the accuracies with what they were measured on: ``task``, ``modality``, ``model`` (the
    folder), ``random_init``, ``train_examples``, ``eval_examples``, ``classes``, ``linear_acc``,
    ``knn_acc``, ``chance``."""
    import torch

    from multissl.models.saved import load_saved_encoder

    try:
        device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError as err:
        raise ConfigError(f"device {device!r}: {first_line(err)}") from None
    saved = load_saved_encoder(output_dir, random_init)
    saved.model.to(device)
    metrics, data = probe_encoder(saved.model, saved.modality,
                                  lambda xs: saved.features(xs, cfg.batch_size, device), cfg)
    return {"task": data.task, "modality": saved.modality, "model": str(saved.folder), "random_init": random_init,
            "train_examples": len(data.train), "eval_examples": len(data.eval), "classes": len(data.classnames),
            **metrics}
