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

Entry points: `probe_module` (the trainer's eval hook, on the in-memory model), `probe_output`
(a saved run or model folder), `add_probe_parser` + `run_probe_command` (``multissl probe``).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from multissl.data.labels import LabelMap, class_label_names, is_label_id, is_missing, sorted_names
from multissl.errors import ConfigError, DataError, first_line

if TYPE_CHECKING:  # torch and numpy load inside the functions: building the CLI's parser stays instant
    import numpy as np
    import torch
    from torch import nn

Modality = Literal["text", "audio", "image"]
TASKS = ("text-topics", "keywords", "shapes", "files")
TASK_MODALITY: dict[str, Modality] = {"text-topics": "text", "keywords": "audio", "shapes": "image"}
DEFAULT_TASK: dict[str, str] = {modality: task for task, modality in TASK_MODALITY.items()}
KNN_TEMPERATURE = 0.07  # DINO's weighted-kNN temperature
HELDOUT_FRACTION = 0.2  # eval share when a task has no eval split of its own
AUDIO_MODEL_TYPES = ("wav2vec2", "wav2vec2-conformer", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat")
OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
_CACHE_SIZE = 4


@dataclass
class ProbeConfig:
    """What to probe on and how; also the trainer's ``trainer.probe`` section (``task=""`` = off)."""

    task: Literal["", "text-topics", "keywords", "shapes", "files"] = ""
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
    """Neighbours that vote (clipped to the number of training examples)."""
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
    """``{"linear_acc", "knn_acc", "chance"}``; chance is the majority class's share of eval (what
    always answering the most common class scores), so an accuracy means something beside it."""
    import torch

    if len(train_x) == 0 or len(eval_x) == 0:
        raise DataError(f"a probe needs training and eval examples; got {len(train_x)} and {len(eval_x)}")
    counts = torch.bincount(eval_y.long().cpu(), minlength=num_classes)
    return {
        "linear_acc": linear_probe(train_x, train_y, eval_x, eval_y, num_classes,
                                   epochs=cfg.linear_epochs, weight_decay=cfg.linear_weight_decay),
        "knn_acc": knn_probe(train_x, train_y, eval_x, eval_y, num_classes, k=cfg.knn_k),
        "chance": float(counts.max()) / len(eval_y),
    }


# ------------------------------------------------------------------------------- features
def _unwrap(model: nn.Module) -> nn.Module:
    """The user-facing model inside training wrappers: DDP's ``module``, torch.compile's ``_orig_mod``,
    and the MLM recipe's ``MaskedPositionsOnly`` (``mlm``)."""
    from torch import nn

    for attr in ("module", "_orig_mod", "mlm"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return model


def _encoder(model: nn.Module) -> nn.Module:
    """A transformers model's encoder without task head (``*ForMaskedLM`` -> ``BertModel``,
    ``Wav2Vec2ForPreTraining`` -> ``Wav2Vec2Model``); an encoder is its own ``base_model``."""
    model = _unwrap(model)
    return getattr(model, "base_model", model)


def _device_of(model: nn.Module) -> torch.device:
    import torch

    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> Iterator[np.ndarray]:
    """Index batches of similar lengths (longest first): little padding, and with a group-norm audio
    encoder (which is fed no mask) a feature barely depends on its batch-mates."""
    import numpy as np

    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float().cpu()


def _in_order(parts: list[tuple[np.ndarray, torch.Tensor]], n: int) -> torch.Tensor:
    """Reassemble per-batch features (computed in length order) in the examples' order."""
    import torch

    if not parts:
        return torch.zeros(0, 0)
    out = torch.zeros(n, parts[0][1].shape[1])
    for idx, feats in parts:
        out[torch.from_numpy(idx)] = feats
    return out


def _position_limit(config: Any) -> int | None:
    """How many tokens the model's position table holds (RoBERTa-style tables start after the pad id)."""
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if limit and getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


def text_features(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int,
                  device: torch.device | str | None = None, max_length: int = 128) -> torch.Tensor:
    """``(len(texts), hidden)``: the mean over non-pad tokens of the encoder's last hidden state.

    Padding is done here (right side, attention mask), so tokenizers without a pad token (GPT-2
    style) work unchanged; texts are cut to what both the tokenizer and the position table allow.
    """
    import torch

    encoder = _encoder(model)
    device = torch.device(device) if device is not None else _device_of(encoder)
    limits = [max_length, getattr(tokenizer, "model_max_length", None), _position_limit(encoder.config)]
    length = min(v for v in limits if isinstance(v, int) and v > 0)
    ids = tokenizer(list(texts), truncation=True, max_length=length)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    parts = []
    with torch.no_grad():
        for idx in _batches_by_length([len(x) for x in ids], batch_size):
            longest = max(len(ids[i]) for i in idx)
            batch = torch.full((len(idx), longest), pad, dtype=torch.long)
            mask = torch.zeros(len(idx), longest, dtype=torch.long)
            for row, i in enumerate(idx):
                batch[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            hidden = encoder(input_ids=batch.to(device), attention_mask=mask.to(device)).last_hidden_state
            parts.append((idx, _masked_mean(hidden, mask.to(device))))
    return _in_order(parts, len(ids))


def _waveform(source: np.ndarray | str | Path, sample_rate: int, normalize: bool, max_samples: int) -> np.ndarray:
    """Decoded (when a path), cut to ``max_samples``, and normalised to zero mean / unit variance
    as the pretraining collator and Wav2Vec2FeatureExtractor do."""
    import numpy as np

    from multissl.data.audio import load_audio

    x = source if isinstance(source, np.ndarray) else load_audio(source, sample_rate)
    x = np.asarray(x, dtype=np.float64)[:max_samples]
    if normalize:
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    return x.astype(np.float32)


def audio_features(model: nn.Module, waveforms: Sequence[np.ndarray | str | Path], batch_size: int,
                   device: torch.device | str | None = None, *, sample_rate: int = 16000, normalize: bool = True,
                   max_seconds: float = 10.0, attention_mask: bool | None = None) -> torch.Tensor:
    """``(len(waveforms), hidden)``: the mean over valid frames of a wav2vec2-style encoder's last
    hidden state; ``waveforms`` are arrays at ``sample_rate`` or audio file paths.

    ``attention_mask=None`` follows transformers' advice: a mask for layer-norm feature encoders,
    zero padding without a mask for group-norm ones (BASE). Valid frames come from the model's own
    ``_get_feat_extract_output_lengths``.
    """
    import torch

    encoder = _encoder(model)
    device = torch.device(device) if device is not None else _device_of(encoder)
    dtype = next((p.dtype for p in encoder.parameters()), torch.float32)
    use_mask = encoder.config.feat_extract_norm == "layer" if attention_mask is None else attention_mask
    waves = [_waveform(w, sample_rate, normalize, int(max_seconds * sample_rate)) for w in waveforms]
    parts = []
    with torch.no_grad():
        for idx in _batches_by_length([len(w) for w in waves], batch_size):
            lengths = torch.tensor([len(waves[i]) for i in idx])
            values = torch.zeros(len(idx), int(lengths.max()))
            for row, i in enumerate(idx):
                values[row, : len(waves[i])] = torch.from_numpy(waves[i])
            mask = (torch.arange(values.shape[1])[None, :] < lengths[:, None]).long().to(device)
            hidden = encoder(values.to(device, dtype), attention_mask=mask if use_mask else None).last_hidden_state
            frames = encoder._get_feat_extract_output_lengths(lengths).to(device)
            valid = torch.arange(hidden.shape[1], device=device)[None, :] < frames[:, None]
            parts.append((idx, _masked_mean(hidden, valid)))
    return _in_order(parts, len(waves))


def image_features(model: nn.Module, preprocess: Callable[[Any], torch.Tensor], images: Sequence[Any],
                   batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(len(images), embed_dim)``: open_clip's ``encode_image`` (unnormalised) of PIL images or image
    paths, after the model's own eval transform."""
    import torch
    from PIL import Image

    model = _unwrap(model)
    device = torch.device(device) if device is not None else _device_of(model)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)

    def load(item: Any) -> torch.Tensor:
        if isinstance(item, (str, Path)):
            try:
                with Image.open(item) as img:
                    item = img.convert("RGB")
            except OSError as err:
                raise DataError(f"{item}: cannot read image ({first_line(err)})") from None
        return preprocess(item.convert("RGB"))

    feats = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([load(x) for x in images[start : start + batch_size]])
            feats.append(model.encode_image(batch.to(device, dtype)).float().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, 0)


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
    from multissl.data.demo import heldout_mask

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
        loaders = {"text-topics": _topics_data, "keywords": _keywords_data, "shapes": _shapes_data}
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


def _featurize(model: nn.Module, modality: Modality, cfg: ProbeConfig, device: torch.device, tokenizer: Any,
               preprocess: Any, feature_extractor: Any) -> Callable[[Sequence[Any]], torch.Tensor]:
    """The modality's feature function, with what it needs bound."""
    if modality == "text":
        if tokenizer is None:
            raise ConfigError("a text probe needs the model's tokenizer")
        return lambda xs: text_features(model, tokenizer, xs, cfg.batch_size, device)
    if modality == "audio":
        fe = feature_extractor
        kwargs = {"sample_rate": getattr(fe, "sampling_rate", 16000), "normalize": getattr(fe, "do_normalize", True),
                  "attention_mask": getattr(fe, "return_attention_mask", None), "max_seconds": cfg.max_seconds}
        return lambda xs: audio_features(model, xs, cfg.batch_size, device, **kwargs)
    if modality == "image":
        if preprocess is None:
            raise ConfigError("an image probe needs the model's eval transform (preprocess)")
        return lambda xs: image_features(model, preprocess, xs, cfg.batch_size, device)
    raise ConfigError(f"unknown probe modality {modality!r}; use text, audio or image")


def _probe(model: nn.Module, modality: Modality, cfg: ProbeConfig, *, tokenizer: Any = None, preprocess: Any = None,
           feature_extractor: Any = None, device: torch.device | str | None = None) -> tuple[dict[str, float], ProbeData]:
    import torch

    data = load_probe_data(cfg, modality)
    device = torch.device(device) if device is not None else _device_of(model)
    featurize = _featurize(model, modality, cfg, device, tokenizer, preprocess, feature_extractor)
    with _frozen(model):
        train_x, eval_x = featurize(data.train), featurize(data.eval)
    metrics = probe_features(train_x, torch.tensor(data.train_labels), eval_x, torch.tensor(data.eval_labels),
                             len(data.classnames), cfg)
    return metrics, data


def probe_module(model: nn.Module, modality: Modality, cfg: ProbeConfig, *, tokenizer: Any = None,
                 preprocess: Any = None, feature_extractor: Any = None,
                 device: torch.device | str | None = None) -> dict[str, float]:
    """``{"linear_acc", "knn_acc", "chance"}`` of the in-memory ``model`` on ``cfg.task``; ``{}`` when the
    task is "" (off), so the trainer can call it unconditionally at each evaluation.

    ``model`` may be a ``*ForMaskedLM``/``*LMHeadModel`` (+ ``tokenizer``), a ``Wav2Vec2ForPreTraining``
    (``feature_extractor`` optional: its sampling rate, normalisation and mask use; default 16 kHz,
    normalised, mask iff layer-norm encoder) or an open_clip model (+ ``preprocess``, its eval
    transform), possibly inside DDP/compile wrappers. Its train/eval flags are restored and its
    weights, gradients and torch's random state are left untouched. Runs locally (no collectives):
    call it on the main process only.
    """
    if not cfg.task:
        return {}
    return _probe(model, modality, cfg, tokenizer=tokenizer, preprocess=preprocess,
                  feature_extractor=feature_extractor, device=device)[0]


@dataclass
class SavedModel:
    """A saved model with what its probe needs."""

    modality: Modality
    folder: Path
    model: nn.Module
    tokenizer: Any = None
    preprocess: Any = None
    feature_extractor: Any = None


def find_model_dir(path: str | Path) -> Path:
    """The model folder of a run's output_dir (its ``model/``) or of a model folder itself."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"no such run or model folder: {path}")
    if not path.is_dir():
        raise ConfigError(f"{path} is a file; give a run's output_dir (with model/) or a model folder")
    folder = path / "model" if (path / "model").is_dir() else path
    if not (folder / "config.json").is_file() and not all((folder / f).is_file() for f in OPEN_CLIP_FILES):
        raise ConfigError(f"no model in {folder}: expected a run's output_dir (with model/) or a model folder "
                          f"(with config.json, or {' + '.join(OPEN_CLIP_FILES)})")
    return folder


def load_saved_model(path: str | Path) -> SavedModel:
    """Load the folder's model as its ecosystem does: open_clip ``local-dir:``, a wav2vec2-style
    ``AutoModel`` + feature extractor, or a transformers text ``AutoModel`` + tokenizer."""
    folder = find_model_dir(path)
    try:
        if all((folder / f).is_file() for f in OPEN_CLIP_FILES):
            import open_clip

            from multissl.objectives.clip import _quiet_root_logger

            with _quiet_root_logger():
                model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
            return SavedModel("image", folder, model, preprocess=preprocess)
        config = json.loads((folder / "config.json").read_text())
        from transformers import AutoModel

        if config.get("model_type") in AUDIO_MODEL_TYPES:
            from transformers import AutoFeatureExtractor

            extractor = (AutoFeatureExtractor.from_pretrained(folder)
                         if (folder / "preprocessor_config.json").is_file() else None)
            return SavedModel("audio", folder, AutoModel.from_pretrained(folder), feature_extractor=extractor)
        model = AutoModel.from_pretrained(folder)
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{folder}: cannot load the model ({first_line(err)})") from None
    return SavedModel("text", folder, model, tokenizer=_load_tokenizer(folder))


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{folder}: a text model needs its tokenizer saved beside it ({first_line(err)})") from None


def probe_output(output_dir: str | Path, cfg: ProbeConfig, device: torch.device | str | None = None) -> dict[str, Any]:
    """Probe a saved run (``output_dir`` with ``model/``) or model folder on ``cfg.task`` ("" = the
    model's embedded task). Returns the accuracies with what they were measured on: ``task``,
    ``modality``, ``model`` (the folder), ``train_examples``, ``eval_examples``, ``classes``,
    ``linear_acc``, ``knn_acc``, ``chance``."""
    import torch

    try:
        device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError as err:
        raise ConfigError(f"device {device!r}: {first_line(err)}") from None
    saved = load_saved_model(output_dir)
    saved.model.to(device)
    metrics, data = _probe(saved.model, saved.modality, cfg, tokenizer=saved.tokenizer, preprocess=saved.preprocess,
                           feature_extractor=saved.feature_extractor, device=device)
    return {"task": data.task, "modality": saved.modality, "model": str(saved.folder),
            "train_examples": len(data.train), "eval_examples": len(data.eval), "classes": len(data.classnames),
            **metrics}


# ------------------------------------------------------------------------------- command line
def add_probe_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``multissl probe OUTPUT_DIR [options]`` to an argparse sub-parser set; it dispatches to
    `run_probe_command` (also set as the parser's ``func`` default)."""
    d = ProbeConfig()
    p = subparsers.add_parser(
        "probe", help="linear and kNN probes of a trained model's frozen features",
        description="Freeze a trained model, mean-pool one feature vector per example, fit a linear and a kNN "
        "classifier on the training examples and report their accuracy on held-out ones, beside chance.")
    p.add_argument("output_dir", help="a run's output_dir (with model/), or a model folder")
    p.add_argument("--task", choices=TASKS, default="",
                   help="default: the model's embedded task (text-topics, keywords or shapes), or files with --files")
    p.add_argument("--files", nargs="+", default=[], help="labelled .csv/.tsv/.jsonl/.parquet files (task files)")
    p.add_argument("--eval-files", nargs="+", default=[], help="eval examples (default: hold out 20%% of --files)")
    p.add_argument("--text-column", default=d.text_column)
    p.add_argument("--label-column", default=d.label_column)
    p.add_argument("--path-column", default=d.path_column, help="audio/image manifests: the file path column")
    for name in ("max_train", "max_eval", "batch_size", "knn_k", "linear_epochs", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--linear-weight-decay", type=float, default=d.linear_weight_decay)
    p.add_argument("--max-seconds", type=float, default=d.max_seconds, help="audio: cut longer files to this")
    p.add_argument("--device", default="", help="default: cuda when available, else cpu")
    p.add_argument("--json", default="", metavar="FILE", help="also write the results as JSON to FILE")
    p.set_defaults(func=run_probe_command)
    return p


def _config_from_args(ns: argparse.Namespace) -> ProbeConfig:
    task = ns.task or ("files" if ns.files else "")
    return ProbeConfig(
        task=task, files=list(ns.files), eval_files=list(ns.eval_files), text_column=ns.text_column,
        label_column=ns.label_column, path_column=ns.path_column, max_train=ns.max_train, max_eval=ns.max_eval,
        batch_size=ns.batch_size, knn_k=ns.knn_k, linear_epochs=ns.linear_epochs,
        linear_weight_decay=ns.linear_weight_decay, max_seconds=ns.max_seconds, seed=ns.seed)


def format_probe_table(result: dict[str, Any], cfg: ProbeConfig) -> str:
    """The results as a short two-column table."""
    k = min(cfg.knn_k, result["train_examples"])
    rows = [
        ("model", f"{result['model']} ({result['modality']})"),
        ("task", result["task"]),
        ("examples", f"{result['train_examples']} train / {result['eval_examples']} eval"),
        ("classes", str(result["classes"])),
        ("linear accuracy", f"{result['linear_acc']:.3f}"),
        (f"kNN accuracy (k={k})", f"{result['knn_acc']:.3f}"),
        ("chance", f"{result['chance']:.3f} (majority class)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name.ljust(width)}  {value}" for name, value in rows)


def run_probe_command(ns: argparse.Namespace) -> int:
    """``multissl probe``: print the results table (and write JSON when asked); returns 0. Input errors
    are raised as `multissl.errors.MultiSSLError` for the CLI to print as one line."""
    cfg = _config_from_args(ns)
    result = probe_output(ns.output_dir, cfg, device=ns.device or None)
    print(f"frozen-feature probe of {result['model']}")
    print(format_probe_table(result, cfg), flush=True)
    if ns.json:
        from multissl.config import to_dict

        out = Path(ns.json).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result, "config": to_dict(cfg)}, indent=2) + "\n")
    return 0
