"""SimCLR: NT-Xent against a hand-written reference, the image data and views, and the recipe end to
end on the embedded digits (learns, resumes exactly, exports a timm folder timm loads)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from multissl.data.image_data import ImageDataConfig, prepare_images
from multissl.data.views import AugmentConfig, ViewsCollator, view_transform
from multissl.errors import DataError
from multissl.losses.nt_xent import nt_xent
from multissl.training.loader import rows


def _reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """Eq. 1 of the SimCLR paper, anchor by anchor, in plain Python floats."""
    z = [v / v.norm() for v in torch.cat([z1, z2]).double()]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -(float(z[i] @ z[pos]) / t - math.log(denom))
    return total / (2 * n)


@pytest.mark.parametrize(("n", "dim", "t"), [(2, 3, 0.5), (5, 8, 0.1), (7, 4, 1.0)])
def test_nt_xent_matches_the_reference(n: int, dim: int, t: float) -> None:
    g = torch.Generator().manual_seed(n * dim)
    z1, z2 = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    loss, correct = nt_xent(z1, z2, t)
    assert float(loss) == pytest.approx(_reference_nt_xent(z1, z2, t), rel=1e-5)
    assert 0 <= int(correct) <= 2 * n
    same, ok = nt_xent(z1, z1 + 1e-3, t)  # each positive is almost its anchor: every anchor right
    assert int(ok) == 2 * n and float(same) < float(loss)


def test_nt_xent_split_over_processes_equals_the_whole_batch() -> None:
    """Two 'processes' holding halves, scoring their anchors against the gathered views, average to
    the loss of the whole batch (the gather is stood in for by the whole, normalised views)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    whole, whole_correct = nt_xent(z1, z2, 0.2)
    halves, correct = [], 0
    for r in (0, 1):
        gathered = iter([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])  # nt_xent gathers view 1, then view 2
        loss, ok = nt_xent(z1[r * 3:(r + 1) * 3], z2[r * 3:(r + 1) * 3], 0.2, gather=lambda x, it=gathered: next(it), rank=r)
        halves.append(float(loss))
        correct += int(ok)
    assert sum(halves) / 2 == pytest.approx(float(whole), rel=1e-6) and correct == int(whole_correct)


def _folder(root: Path) -> Path:
    for label, value in (("cat", 40), ("dog", 200)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            Image.new("L", (20, 20), value + i).save(root / label / f"{label}{i}.png")
    (root / "notes.txt").write_text("not an image")
    Image.new("RGB", (20, 20)).save(root / "unlabelled.png")
    return root


def test_image_folders_take_labels_from_subfolders(tmp_path: Path) -> None:
    train, held = prepare_images(ImageDataConfig(files=[str(_folder(tmp_path / "imgs"))], validation_fraction=0.25))
    assert train.classnames == held.classnames == ["cat", "dog"]
    paths = train.paths() + held.paths()
    assert len(paths) == 13 and not set(train.paths()) & set(held.paths())
    by_name = dict(zip((Path(p).name for p in paths), train.labels() + held.labels()))
    assert by_name["cat3.png"] == 0 and by_name["dog0.png"] == 1 and by_name["unlabelled.png"] == -1
    again = prepare_images(ImageDataConfig(files=[str(tmp_path / "imgs")], validation_fraction=0.25))[1]
    assert again.paths() == held.paths(), "the split is a hash of the file name: stable"


def test_views_are_seeded_per_batch_and_bad_images_counted(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "imgs")
    (folder / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    train, _ = prepare_images(ImageDataConfig(files=[str(folder)], validation_fraction=0.0))
    collate = ViewsCollator([view_transform(AugmentConfig(size=16))] * 2)
    samples = rows(train.data, list(range(len(train))))
    a = collate(samples, torch.Generator().manual_seed(1))
    b = collate(samples, torch.Generator().manual_seed(1))
    c = collate(samples, torch.Generator().manual_seed(2))
    assert a["skipped"] == 1 and a["views"][0].shape == (13, 3, 16, 16) and len(a["labels"]) == 13
    assert torch.equal(a["views"][0], b["views"][0]) and torch.equal(a["views"][1], b["views"][1])
    assert not torch.equal(a["views"][0], a["views"][1]), "two different views of each image"
    assert not torch.equal(a["views"][0], c["views"][0])
    with pytest.raises(DataError, match="none of the 1 images in a batch could be used"):
        collate([s for s in samples if s["path"].endswith("broken.png")], torch.Generator().manual_seed(0))


def test_a_batch_is_finished_once_with_the_values_of_the_per_image_transform(tmp_path: Path) -> None:
    """The collator converts and normalises the stacked uint8 batch once; that must give exactly what
    the whole transform gives image by image under the same seeds, and a view leaves out every step
    whose probability is 0 (one fewer random draw and call per image)."""
    from torchvision.transforms import v2

    from multissl.data.images import decode_and_transform, load_image, seeded_rngs

    folder = _folder(tmp_path / "imgs")
    train, _ = prepare_images(ImageDataConfig(files=[str(folder)], validation_fraction=0.0))
    samples = rows(train.data, list(range(len(train))))
    cfg = AugmentConfig(size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), blur=0.5, solarize=0.3)
    transform = view_transform(cfg)
    g = torch.Generator().manual_seed(3)
    _, (batch,), _ = decode_and_transform(samples, [transform], g)
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(3)))
    whole = v2.Compose([*transform.per_image.transforms, v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                        v2.Normalize(list(cfg.mean), list(cfg.std))])
    with seeded_rngs(seed):
        one_by_one = torch.stack([whole(load_image(s["path"])) for s in samples])
    assert batch.dtype == torch.float32 and torch.equal(batch, one_by_one)
    with seeded_rngs(seed):
        assert torch.equal(transform(load_image(samples[0]["path"])), one_by_one[0])
    plain = view_transform(AugmentConfig(size=16, flip=0.0, jitter=0.0, grayscale=0.0))
    assert [type(t).__name__ for t in plain.per_image.transforms] == ["RandomResizedCrop"]
    assert len(transform.per_image.transforms) == 6


def _recipe_args(out: Path, steps: int, **extra: object) -> list[str]:
    args = [f"trainer.output_dir={out}", f"trainer.max_steps={steps}", "trainer.batch_size=64", "trainer.log_every=5",
            "trainer.progress_bar=false", "trainer.trackers=[]", "probe.max_train=500", "probe.max_eval=300",
            "trainer.eval_max_batches=2"]
    return args + [f"{k}={v}" for k, v in extra.items()]


def test_simclr_exports_a_timm_backbone_that_probes_the_same(tmp_path: Path) -> None:
    """The recipe end to end: the backbone (no projector) loads with timm alone and gives the same
    features; `multissl probe` on the saved folder measures what the online probe measured."""
    import timm
    from multissl_recipes import simclr

    from multissl.metrics import read_jsonl
    from multissl.probe import ProbeConfig, probe_output

    out = tmp_path / "run"
    result = simclr.main(_recipe_args(out, 4))
    last = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/loss" in r][-1]
    assert {"eval/contrastive_accuracy", "probe/linear_acc", "probe/knn_acc", "probe/chance"} <= set(last)
    model = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True).eval()
    assert model.num_classes == 0 and model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in result.model.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model.eval()(x))
    card = (out / "model" / "README.md").read_text()
    assert "library_name: timm" in card and f'timm.create_model("local-dir:{out / "model"}"' in card
    saved = probe_output(out, ProbeConfig(task="digits", max_train=500, max_eval=300), device="cpu")
    assert saved["modality"] == "image"
    assert (saved["linear_acc"], saved["knn_acc"]) == pytest.approx((last["probe/linear_acc"], last["probe/knn_acc"]),
                                                                   abs=1e-6)


def test_simclr_resume_is_exact(tmp_path: Path) -> None:
    from multissl_recipes import simclr

    from tests.conftest import assert_resume_is_exact

    out = tmp_path / "run"
    assert_resume_is_exact(simclr.main, _recipe_args(out, 6, **{"trainer.save_every": 3, "probe.task": '""'}), out, 6)
