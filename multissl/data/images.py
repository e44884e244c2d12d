"""Images as every image family reads them: decoded from a file or bytes, converted to 8-bit RGB
(CMYK, palettes, alpha onto white, 16-bit and float grayscale), too-large ones refused, and the
global random generators seeded per image so torchvision/timm transforms give the same result in
any DataLoader worker and after a resume."""

from __future__ import annotations

import contextlib
import io
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multissl.errors import DataError, first_line
from multissl.training.skips import skip_id


class BadImage(DataError):
    """An image that cannot be used; the collator counts and skips it (or stops, when asked)."""


def _to_8bit(img: Any) -> Any:
    """16/32-bit integer and float grayscale -> 8-bit ``L``, keeping the range the data was made for:
    ``I;16*`` spans 0..65535; ``I`` is taken as 8- or 16-bit when its values fit, else stretched;
    ``F`` as 0..1 or 0..255 when its values fit, else stretched."""
    from PIL import Image

    a = np.nan_to_num(np.asarray(img, dtype=np.float64))
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        span = (0.0, 65535.0)
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        span = (0.0, 1.0)
    elif lo >= 0 and hi <= 255:
        span = (0.0, 255.0)
    elif img.mode != "F" and lo >= 0 and hi <= 65535:
        span = (0.0, 65535.0)
    else:
        span = (lo, hi if hi > lo else lo + 1.0)
    scaled = (a - span[0]) / (span[1] - span[0]) * 255.0
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))


def to_rgb(img: Any) -> Any:
    """An 8-bit RGB copy of a loaded PIL image. Transparency (alpha, or a palette/colour-key
    ``transparency``) is composited onto white, so transparent pixels do not turn black."""
    from PIL import Image

    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # also CMYK, P, L, 1, YCbCr; a copy even when already RGB


def load_image(source: str | Path | bytes, name: str | None = None, max_pixels: int = 64_000_000) -> Any:
    """Decode to an 8-bit RGB PIL image, or raise a `BadImage` naming it.

    The pixel limit is checked from the header, before any pixel is decoded; PIL's own global guard
    is left as it is (its warning is silenced here, its error, at twice its limit, is a bad image).
    """
    from PIL import Image, UnidentifiedImageError

    embedded = isinstance(source, (bytes, bytearray, memoryview))
    name = name or ("<image bytes>" if embedded else str(source))
    try:
        if (len(source) if embedded else Path(source).stat().st_size) == 0:
            raise BadImage(f"{name}: empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if embedded else source)
            try:
                width, height = img.size
                if width * height > max_pixels:
                    raise BadImage(f"{name}: {width}x{height} = {width * height} pixels is above "
                                   f"max_image_pixels={max_pixels}")
                img.load()
                return to_rgb(img)
            finally:
                img.close()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(f"{name}: not an image, or a format PIL cannot read") from None
    except Image.DecompressionBombError as err:
        raise BadImage(f"{name}: {first_line(err)}") from None
    except FileNotFoundError:
        raise BadImage(f"{name}: no such file") from None
    except Exception as err:  # truncated data, broken chunks, unsupported modes: many exception types
        raise BadImage(f"{name}: cannot decode image ({first_line(err)})") from None


def skipped_ids(names: list[str]) -> torch.Tensor:
    """The batch entry ``skipped_ids``: `skip_id` of each bad input's name, int64, in batch order (a
    tensor, so batches stay tensors only), for the trainer to count each bad file once."""
    return torch.tensor([skip_id(n) for n in names], dtype=torch.long)


def decode_or_skip(samples: list[dict[str, Any]], on_bad_image: str = "skip",
                   max_pixels: int = 64_000_000, allow_empty: bool = False
                   ) -> tuple[list[tuple[dict[str, Any], Any]], int]:
    """``([(sample, RGB image), ...], skipped)`` for a batch's rows ``{"path", "bytes"?}``: a bad
    image is counted, warned about (the first 3) and left out, or raised with ``on_bad_image="error"``.
    A batch with no usable image is an error naming the first bad one, unless ``allow_empty`` (for
    collators whose objective takes an empty batch: the lone held-out image that is bad)."""
    kept: list[tuple[dict[str, Any], Any]] = []
    skipped, first_error = 0, None
    for sample in samples:
        try:
            kept.append((sample, load_image(sample.get("bytes") or sample["path"], sample["path"], max_pixels)))
        except BadImage as err:
            if on_bad_image == "error":
                raise
            skipped += 1
            first_error = first_error or err
            if skipped <= 3:
                print(f"warning: skipped an image: {err}", flush=True)
    if not kept and not allow_empty:
        raise DataError(f"none of the {len(samples)} images in a batch could be used; the first: {first_error}")
    return kept, skipped


class PixelPipeline:
    """PIL steps per image, then one conversion of the whole batch to a float tensor, scaled to [0, 1]
    and normalised (`finish`). Per-image ``PILToTensor``, ``ToDtype`` and ``Normalize`` calls cost more
    than the crop on small images (about 12 of 23 ms for 128 views of 32 pixels); on the stacked batch
    they are one op each, with the same values. Called on one image, it is the whole transform."""

    def __init__(self, steps: list[Any], mean: tuple[float, ...] | list[float], std: tuple[float, ...] | list[float]
                 ) -> None:
        from torchvision.transforms import v2

        self.per_image = v2.Compose(steps) if steps else (lambda img: img)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]

    def __call__(self, img: Any) -> torch.Tensor:
        return self.finish([self.per_image(img)])[0]

    def finish(self, images: list[Any]) -> torch.Tensor:
        """PIL images of one size -> float32 ``(B, 3, H, W)`` scaled to [0, 1], normalised by ``mean``/``std``."""
        from torchvision.transforms.v2 import functional as F

        arrays = [np.asarray(img if img.mode == "RGB" else img.convert("RGB")) for img in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return F.normalize(F.to_dtype(pixels, torch.float32, scale=True), self.mean, self.std)

    def __repr__(self) -> str:
        return f"PixelPipeline({self.per_image}, mean={self.mean}, std={self.std})"


def decode_and_transform(samples: list[dict[str, Any]], transforms: list[Any], generator: torch.Generator,
                         on_bad_image: str = "skip", max_pixels: int = 64_000_000, allow_empty: bool = False
                         ) -> tuple[list[dict[str, Any]], list[torch.Tensor], int]:
    """``(kept samples, [batch (B, ...) per transform], skipped)``: what every image collator does
    first. Bad images are skipped as `decode_or_skip` does; one seed is drawn from the batch's
    ``generator`` and every transform runs under `seeded_rngs` of it (all transforms of an image
    before the next image), so a batch is the same in any worker and after a resume. A
    `PixelPipeline` runs its per-image steps here and finishes the stacked batch once. With no
    usable image each batch has no rows (shaped as the transform's output). The generator can be
    drawn from again afterwards (MAE's mask noise)."""
    kept, skipped = decode_or_skip(samples, on_bad_image, max_pixels, allow_empty)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    steps = [t.per_image if isinstance(t, PixelPipeline) else t for t in transforms]
    outputs: list[list[Any]] = [[] for _ in transforms]
    with seeded_rngs(seed):  # once a batch: the transforms draw from the global generators
        for _, img in kept:
            for out, step in zip(outputs, steps):
                out.append(step(img))
    batches = [_stacked(out, transform) for out, transform in zip(outputs, transforms)]
    return [sample for sample, _ in kept], batches, skipped


def _stacked(outputs: list[Any], transform: Any) -> torch.Tensor:
    if not outputs:
        return blank_output(transform)[None][:0]
    return transform.finish(outputs) if isinstance(transform, PixelPipeline) else torch.stack(outputs)


def blank_output(transform: Any) -> torch.Tensor:
    """Zeros shaped like ``transform``'s output, for a row whose image was bad (or an empty batch's
    shape): the transform is run once on a black image, under a fixed seed that leaves the global
    generators as they were."""
    from PIL import Image

    with seeded_rngs(0):
        return torch.zeros_like(transform(Image.new("RGB", (32, 32))))


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's, Python's and numpy's global generators for the block, then put them back.

    Transforms draw from the global generators (torchvision from torch's, timm's from Python's);
    seeding them per image from the batch generator makes a batch the same in any DataLoader
    worker and after a resume, and leaves the trainer's own random stream (dropout) untouched.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def image_cell(value: Any, row_name: str, column: str) -> tuple[bytes | None, str | None]:
    """``(bytes, path)`` of an image cell: undecoded ``Image`` dicts, bytes, paths or PIL images."""
    if isinstance(value, dict):
        blob, where = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        blob, where = bytes(value), None
    elif isinstance(value, (str, Path)):
        blob, where = None, str(value)
    elif hasattr(value, "save") and hasattr(value, "mode"):  # a decoded PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        blob, where = buf.getvalue(), None
    else:
        raise DataError(f"{row_name}: column {column!r} holds {type(value).__name__}, not an image, bytes or a path")
    if blob is None and not where:
        raise DataError(f"{row_name}: column {column!r} holds neither bytes nor a path")
    return blob, where
