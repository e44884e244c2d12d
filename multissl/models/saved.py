"""Saved models as encoders: a folder is loaded as its ecosystem does (open_clip ``local-dir:``,
transformers ``AutoModel``) and paired with the feature function of its modality.

The kinds are tried in order (``SAVED_ENCODERS``); a folder none of them takes (a Swin saved by
transformers, say) is a one-line error naming its model type, never a text model asked for a tokenizer."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from multissl.errors import ConfigError, first_line
from multissl.models import features as F
from multissl.run_folder import find_model_folder

if TYPE_CHECKING:
    import torch
    from torch import nn

    from multissl.training.objective import Modality

AUDIO_MODEL_TYPES = ("wav2vec2", "wav2vec2-conformer", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat")
OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
VISION_MODEL_TYPES = ("vit", "vit_mae", "deit", "dinov2")
"""transformers image encoders with a CLS token in front of their patch tokens (``*ForImageClassification``
folders of these types too). ``vit_mae`` is recognised only to be refused (see `check_vision_folder`)."""
PREPROCESSOR_FILE = "preprocessor_config.json"
TEXT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "deberta", "deberta-v2",
                    "gpt2", "llama", "mistral", "qwen2", "gpt_neox", "opt", "modernbert", "albert", "mpnet")


@dataclass
class SavedEncoder:
    """A saved model and how to turn inputs (texts, audio, images or their paths) into features."""

    modality: Modality
    folder: Path
    model: nn.Module
    featurize: Callable[[nn.Module, Sequence[Any], int, Any], torch.Tensor]

    def features(self, inputs: Sequence[Any], batch_size: int = 32, device: Any = None) -> torch.Tensor:
        return self.featurize(self.model, inputs, batch_size, device)


def _open_clip(folder: Path, config: dict[str, Any] | None, fresh: bool) -> SavedEncoder | None:
    if not all((folder / f).is_file() for f in OPEN_CLIP_FILES):
        return None
    import open_clip

    from multissl.logs import quiet_root_logger

    with quiet_root_logger():
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", load_weights=not fresh)
    return SavedEncoder("image", folder, model, lambda m, xs, bs, dev: F.image_features(m, preprocess, xs, bs, dev))


def is_timm_config(config: dict[str, Any] | None) -> bool:
    """A timm Hub-format config.json: ``architecture`` and no transformers ``model_type``."""
    return config is not None and "architecture" in config and not config.get("model_type")


def is_vision_config(config: dict[str, Any] | None) -> bool:
    """A transformers config.json of one of the `VISION_MODEL_TYPES`."""
    return config is not None and config.get("model_type") in VISION_MODEL_TYPES


def check_vision_folder(folder: Path, model_type: str, where: str = "") -> None:
    """A one-line error (prefixed by ``where``) unless ``folder`` can be used as a frozen or fine-tuned
    encoder: ViT-MAE's ``ViTMAEModel`` drops and shuffles patches at random on every forward, inference
    too, so its features would be neither complete nor repeatable; and every image model needs the image
    processor it was trained with (``preprocessor_config.json``), or nothing says how to feed it."""
    if model_type == "vit_mae":
        raise ConfigError(f"{where}{folder} holds a 'vit_mae' model, which masks patches at random even at "
                          "inference; save its encoder as a ViTModel (as multissl's MAE recipe does) and use that")
    if not (folder / PREPROCESSOR_FILE).is_file():
        raise ConfigError(f"{where}{folder} has no {PREPROCESSOR_FILE}: a transformers {model_type!r} image model "
                          "needs the image processor it was trained with saved beside it (processor.save_pretrained)")


def _model_dir(path: str | Path, key: str) -> Path:
    try:
        return find_model_folder(path).model_dir
    except ConfigError as err:
        raise ConfigError(f"{key}={str(path)!r}: {err}") from None


def _not_an_image_model(path: str | Path, key: str, folder: Path, config: dict[str, Any] | None,
                        wanted: str) -> ConfigError:
    if config is not None and config.get("model_type"):
        what = f"a transformers {config['model_type']!r} model"
    elif (folder / OPEN_CLIP_FILES[0]).is_file():
        what = "an open_clip model"
    else:
        what = "a config.json without 'architecture'"
    return ConfigError(f"{key}={str(path)!r}: {folder} holds {what}, not {wanted}")


_TIMM_WANTED = "a timm image model (a config.json with 'architecture', as timm's save_for_hf writes)"


def find_timm_folder(path: str | Path, key: str = "model.init_from") -> Path:
    """The timm folder of a run's output_dir (its ``model/``) or the folder itself; a missing folder
    or one holding another kind of model is a one-line error naming ``key``."""
    folder = _model_dir(path, key)
    config = _read_config(folder)
    if not is_timm_config(config):
        raise _not_an_image_model(path, key, folder, config, _TIMM_WANTED)
    return folder


def find_image_folder(path: str | Path, key: str = "model.init_from") -> tuple[Path, Literal["timm", "transformers"]]:
    """``(folder, library)``: the image model of a run's output_dir (its ``model/``) or of a folder, a
    timm folder or a transformers one of the `VISION_MODEL_TYPES` (checked by `check_vision_folder`);
    anything else is a one-line error naming ``key``."""
    folder = _model_dir(path, key)
    config = _read_config(folder)
    if is_timm_config(config):
        return folder, "timm"
    if config is not None and is_vision_config(config):
        check_vision_folder(folder, config["model_type"], f"{key}={str(path)!r}: ")
        return folder, "transformers"
    types = ", ".join(t for t in VISION_MODEL_TYPES if t != "vit_mae")
    raise _not_an_image_model(path, key, folder, config, f"{_TIMM_WANTED} nor a transformers {types} image model")


def _timm(folder: Path, config: dict[str, Any] | None, fresh: bool) -> SavedEncoder | None:
    """A timm Hub-format folder (config.json with ``architecture``): rebuilt by timm, with its own eval transform.
    A fine-tuned classifier is rebuilt without its classifier (``num_classes=0``): probes take features."""
    if not is_timm_config(config):
        return None
    import timm

    model = timm.create_model(f"local-dir:{folder}", pretrained=not fresh, num_classes=0)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    return SavedEncoder("image", folder, model,
                        lambda m, xs, bs, dev: F.image_features(m, transform, xs, bs, dev, pooled=True))


def _vision_transformers(folder: Path, config: dict[str, Any] | None, fresh: bool) -> SavedEncoder | None:
    """A transformers ViT, DeiT or DINOv2 (an encoder or a ``*ForImageClassification``, of which ``AutoModel``
    loads the encoder): features are the mean of its patch tokens, after its own image processor."""
    if config is None or not is_vision_config(config):
        return None
    check_vision_folder(folder, config["model_type"])
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder)
    return SavedEncoder("image", folder, _auto_model(folder, fresh),
                        lambda m, xs, bs, dev: F.vit_features(m, processor, xs, bs, dev))


def _audio(folder: Path, config: dict[str, Any] | None, fresh: bool) -> SavedEncoder | None:
    if config is None or config.get("model_type") not in AUDIO_MODEL_TYPES:
        return None
    from transformers import AutoFeatureExtractor

    fe = AutoFeatureExtractor.from_pretrained(folder) if (folder / "preprocessor_config.json").is_file() else None
    kwargs = {"sample_rate": getattr(fe, "sampling_rate", 16000), "normalize": getattr(fe, "do_normalize", True),
              "attention_mask": getattr(fe, "return_attention_mask", None)}
    return SavedEncoder("audio", folder, _auto_model(folder, fresh),
                        lambda m, xs, bs, dev: F.audio_features(m, xs, bs, dev, **kwargs))


def _text(folder: Path, config: dict[str, Any] | None, fresh: bool) -> SavedEncoder | None:
    if config is None or config.get("model_type") not in TEXT_MODEL_TYPES:
        return None
    from transformers import AutoTokenizer

    model = _auto_model(folder, fresh)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{folder}: a text model needs its tokenizer saved beside it ({first_line(err)})") from None
    return SavedEncoder("text", folder, model, lambda m, xs, bs, dev: F.text_features(m, tokenizer, xs, bs, dev))


def _auto_model(folder: Path, fresh: bool) -> nn.Module:
    """transformers' ``AutoModel`` of ``folder``: its weights, or (``fresh``) its config's architecture
    initialised as transformers initialises a new model, as fine-tuning's ``model.random_init`` does."""
    from transformers import AutoConfig, AutoModel

    return AutoModel.from_config(AutoConfig.from_pretrained(folder)) if fresh else AutoModel.from_pretrained(folder)


SAVED_ENCODERS: list[Callable[[Path, dict[str, Any] | None, bool], SavedEncoder | None]] = [
    _open_clip, _timm, _vision_transformers, _audio, _text]
"""Each returns an encoder for a folder it recognises, else None; image families add theirs here.
The flag asks for the folder's architecture and preprocessing with fresh weights (a probe's random-init arm)."""


def _read_config(folder: Path) -> dict[str, Any] | None:
    """``folder/config.json``, or None when there is none; unreadable JSON is a one-line error."""
    if not (folder / "config.json").is_file():
        return None
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{folder / 'config.json'}: not readable JSON ({first_line(err)})") from None


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """torch's generator seeded with ``seed`` inside, and the caller's stream restored after (no-op for None)."""
    if seed is None:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def load_saved_encoder(path: str | Path, random_init: int | None = None) -> SavedEncoder:
    """The encoder saved in a run's output_dir (its ``model/``) or a model folder. With ``random_init``
    (a seed): the same architecture, tokenizer or processor and features, with the weights a new model
    of it gets under that seed: the baseline a pretrained encoder's probe is read against."""
    folder = find_model_folder(path).model_dir
    config = _read_config(folder)
    if config is not None and not config.get("model_type") and "architecture" not in config:
        raise ConfigError(f"{folder}: cannot load the model (its config.json names no model_type)")
    with _seeded(random_init):
        for kind in SAVED_ENCODERS:
            try:
                encoder = kind(folder, config, random_init is not None)
            except ConfigError:
                raise
            except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as err:
                raise ConfigError(f"{folder}: cannot load the model ({first_line(err)})") from None
            if encoder is not None:
                return encoder
    model_type = (config or {}).get("model_type", "unknown")
    raise ConfigError(f"{folder}: no feature extractor for a {model_type!r} model yet (multissl takes features of "
                      f"open_clip and timm models, transformers {'/'.join(t for t in VISION_MODEL_TYPES if t != 'vit_mae')} "
                      f"image models, {AUDIO_MODEL_TYPES[0]}-style audio models and text models)")
