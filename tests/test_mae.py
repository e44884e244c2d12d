"""MAE on transformers' ViTMAEForPreTraining at tiny sizes: the loss against a slow reference and
transformers' own, seeded masks, exact resume, and the exported encoder as users load it
(``AutoModel``, ``pipeline("image-feature-extraction")``) with features identical to the recipe's."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from multissl.errors import ConfigError
from multissl.losses.masked_pixels import masked_patch_mse
from multissl.metrics import read_jsonl

SMALL = {"augment.size": 16,
         "model.config": "{patch_size: 4, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
                         "intermediate_size: 64, decoder_hidden_size: 32, decoder_num_hidden_layers: 1, "
                         "decoder_num_attention_heads: 2, decoder_intermediate_size: 64}"}
"""A 16 px ViT of 16 patches, 2 blocks of width 32, and a one-block decoder."""


def _small_config() -> dict[str, int]:
    import yaml

    return yaml.safe_load(SMALL["model.config"])


def _args(out: Path, steps: int, **extra: object) -> list[str]:
    args = {"trainer.output_dir": out, "trainer.max_steps": steps, "trainer.batch_size": 16, "trainer.log_every": 1,
            "trainer.progress_bar": "false", "trainer.trackers": "[]", "trainer.eval_max_batches": 1,
            "trainer.eval_batch_size": 16, "probe.task": '""', **SMALL, **extra}
    return [f"{k}={v}" for k, v in args.items()]


def _main(argv: list[str]):  # noqa: ANN202 - the recipe's FitResult
    from multissl_recipes.mae import main

    return main(argv)


def _reference_loss(pred: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """One patch at a time, as the paper describes it."""
    total, hidden = 0.0, 0
    for b in range(pred.shape[0]):
        for i in range(pred.shape[1]):
            if mask[b, i] < 0.5:
                continue
            target = patches[b, i].double()
            if norm_pix:
                mean = sum(target.tolist()) / len(target)
                var = sum((v - mean) ** 2 for v in target.tolist()) / (len(target) - 1)
                target = (target - mean) / math.sqrt(var + 1e-6)
            total += float(((pred[b, i].double() - target) ** 2).mean())
            hidden += 1
    return torch.tensor(total / hidden, dtype=torch.float64)


@pytest.mark.parametrize(("batch", "patches", "dim"), [(1, 4, 3), (3, 16, 48), (2, 49, 12)])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_patch_mse_matches_a_slow_reference(batch: int, patches: int, dim: int, norm_pix: bool) -> None:
    g = torch.Generator().manual_seed(batch * patches + dim)
    pred, target = torch.randn(batch, patches, dim, generator=g), torch.rand(batch, patches, dim, generator=g)
    mask = (torch.rand(batch, patches, generator=g) < 0.75).float()
    mask[0, 0] = 1.0
    got = masked_patch_mse(pred, target, mask, norm_pix)
    torch.testing.assert_close(got.double(), _reference_loss(pred, target, mask, norm_pix), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_equals_transformers_own_and_only_hidden_patches_count(norm_pix: bool) -> None:
    from multissl.objectives.mae import MAELossConfig, MAEModelConfig, build_mae

    cfg = MAEModelConfig(config={"patch_size": 4, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "intermediate_size": 64, "decoder_hidden_size": 32, "decoder_num_hidden_layers": 1,
                                 "decoder_num_attention_heads": 2, "decoder_intermediate_size": 64})
    model = build_mae(cfg, MAELossConfig(norm_pix=norm_pix), 16).eval()
    x = torch.randn(3, 3, 16, 16)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(pixel_values=x, noise=noise)
    assert out.mask.sum(1).tolist() == [12.0, 12.0, 12.0]  # 75% of 16 patches
    # the hidden patches are the 12 with the highest noise
    torch.testing.assert_close(out.mask, (noise.argsort(1).argsort(1) >= 4).float())
    ours = masked_patch_mse(out.logits, model.patchify(x), out.mask, norm_pix)
    torch.testing.assert_close(ours, out.loss)
    # the objective trains on the model's own loss: under bf16 autocast it stays float32 and the same
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(pixel_values=x, noise=noise)
    assert half.loss.dtype == torch.float32
    torch.testing.assert_close(half.loss, masked_patch_mse(half.logits, model.patchify(x), half.mask, norm_pix))


def test_collator_masks_come_from_the_batch_generator() -> None:
    from PIL import Image

    from multissl.data.views import AugmentConfig, view_transform
    from multissl.objectives.mae import MaskedImageCollator

    img = Image.new("RGB", (20, 20), (200, 10, 10))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    samples = [{"path": f"{i}.png", "bytes": buf.getvalue(), "label": i} for i in range(4)]
    collate = MaskedImageCollator(view_transform(AugmentConfig(size=16, jitter=0.0, grayscale=0.0)), 16)
    a = collate(samples, torch.Generator().manual_seed(7))
    b = collate(samples, torch.Generator().manual_seed(7))
    c = collate(samples, torch.Generator().manual_seed(8))
    assert a["noise"].shape == (4, 16) and a["pixel_values"].shape == (4, 3, 16, 16)
    torch.testing.assert_close(a["noise"], b["noise"])
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    assert not torch.equal(a["noise"], c["noise"])
    assert a["labels"].tolist() == [0, 1, 2, 3]


def test_mae_trains_and_exports_a_vit_that_transformers_loads_with_identical_features(tmp_path: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, pipeline

    out = tmp_path / "mae"
    result = _main(_args(out, 3, **{"trainer.eval_every": 3}))
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    assert len(train) == 3 and all(math.isfinite(r["train/loss"]) for r in train)
    assert any("eval/loss" in r for r in records)
    folder = out / "model"
    config = (folder / "config.json").read_text()
    assert '"model_type": "vit"' in config
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "reconstructions.png" in card
    assert Image.open(folder / "reconstructions.png").size[1] > 3 * 64  # three rows of enlarged cells

    from multissl.data.digits_demo import default_digits_corpus
    from multissl.data.views import AugmentConfig
    from multissl.objectives.mae import MAE, MAELossConfig, MAEModelConfig

    paths = sorted(str(p) for p in default_digits_corpus().rglob("*.png"))[:5]
    objective = MAE(MAEModelConfig(config=_small_config()), MAELossConfig(),
                    AugmentConfig(size=16))
    ours = objective.features(result.model, paths, batch_size=2)  # what the online probe scores
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    assert type(model).__name__ == "ViTModel"
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        hidden = model(**processor(images=images, return_tensors="pt")).last_hidden_state
    users = hidden[:, 1:].mean(1)
    torch.testing.assert_close(ours, users, rtol=1e-4, atol=1e-5)
    extractor = pipeline("image-feature-extraction", model=str(folder))
    piped = torch.tensor(extractor(images[0]))[0]  # (tokens, hidden)
    torch.testing.assert_close(piped, hidden[0], rtol=1e-4, atol=1e-5)


def test_mae_resumes_exactly(tmp_path: Path) -> None:
    from tests.conftest import assert_resume_is_exact

    out = tmp_path / "run"
    assert_resume_is_exact(_main, _args(out, 4, **{"trainer.save_every": 2, "trainer.eval_every": 0}), out, 4)


def test_mae_learns_to_reconstruct_held_out_digits(tmp_path: Path) -> None:
    """The tiny preset's ViT (32 px, 64 patches) for 40 steps of 32 images: measured held-out loss
    1.02 -> 0.55 (per-patch normalised targets: 1.0 is predicting each patch's mean)."""
    out = tmp_path / "learn"
    args = {"trainer.output_dir": out, "trainer.max_steps": 40, "trainer.batch_size": 32, "trainer.eval_every": 40,
            "trainer.eval_batch_size": 64, "trainer.eval_max_batches": 2, "trainer.progress_bar": "false",
            "trainer.trackers": "[]", "probe.task": '""'}
    _main([f"{k}={v}" for k, v in args.items()])
    evals = [r["eval/loss"] for r in read_jsonl(out / "metrics.jsonl") if "eval/loss" in r]
    assert evals[-1] < 0.75 * evals[0], evals


@pytest.mark.parametrize(("override", "message"), [
    ("model.config={image_size: 64}", "set augment.size instead"),
    ("model.config={patch_sise: 4}", "unknown ViTMAEConfig key 'patch_sise'"),
    ("model.config={patch_size: 5}", "not a multiple of model.config.patch_size=5"),
    ("loss.mask_ratio=1.0", "loss.mask_ratio must be in"),
    ("model.attn_implementation=flash", "attn_implementation"),
])
def test_bad_model_configs_are_one_line_errors(override: str, message: str, tmp_path: Path) -> None:
    args = [a for a in _args(tmp_path / "bad", 1) if not a.startswith(override.split("=")[0] + "=")]
    with pytest.raises(ConfigError, match=message):
        _main([*args, override])


def test_the_attention_kernel_is_the_configs_and_changes_no_arithmetic() -> None:
    """The tiny preset pretrains with the plain attention path (faster on CPU at its token counts):
    the choice reaches the model, and loss and gradients equal SDPA's."""
    import transformers.models.vit_mae.modeling_vit_mae as vit_mae

    from multissl.objectives.mae import MAELossConfig, MAEModelConfig, build_mae

    models = {}
    for kernel in ("sdpa", "eager"):
        torch.manual_seed(0)
        models[kernel] = build_mae(MAEModelConfig(config=_small_config(), attn_implementation=kernel), MAELossConfig(), 16)
        assert models[kernel].config._attn_implementation == kernel
    pixels, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    calls: list[int] = []
    eager = vit_mae.eager_attention_forward
    vit_mae.eager_attention_forward = lambda *a, **k: (calls.append(1), eager(*a, **k))[1]
    try:
        losses = {}
        for kernel, model in models.items():
            before = len(calls)
            losses[kernel] = model(pixel_values=pixels, noise=noise).loss
            losses[kernel].backward()
            assert (len(calls) > before) == (kernel == "eager")  # 3 blocks, encoder and decoder
    finally:
        vit_mae.eager_attention_forward = eager
    torch.testing.assert_close(losses["eager"], losses["sdpa"])
    for (name, a), (_, b) in zip(models["eager"].named_parameters(), models["sdpa"].named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_mae_encoder_fine_tunes_into_a_classifier_that_pipeline_runs(tmp_path: Path) -> None:
    """pretrain mae -> finetune image-classification -> transformers' pipeline, no multissl code at the end."""
    from multissl_recipes.finetune_image_classification import main as finetune
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    from multissl.data.digits_demo import default_digits_corpus

    pretrained = tmp_path / "mae"
    _main(_args(pretrained, 2, **{"trainer.eval_every": 0}))
    out = tmp_path / "tuned"
    finetune([f"trainer.output_dir={out}", f"model.init_from={pretrained}", "trainer.max_steps=3",
              "trainer.batch_size=16", "trainer.eval_max_batches=1", "trainer.eval_batch_size=16",
              "trainer.progress_bar=false", "trainer.trackers=[]", "trainer.eval_every=0", "trainer.save_every=0"])
    folder = out / "model"
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(model).__name__ == "ViTForImageClassification" and len(model.config.id2label) == 10
    image = Image.open(sorted(default_digits_corpus().rglob("*.png"))[0]).convert("RGB")
    with torch.no_grad():
        probs = model(**AutoImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt")).logits.softmax(-1)[0]
    best = pipeline("image-classification", model=str(folder))(image)[0]
    assert best["label"] == model.config.id2label[int(probs.argmax())]
    assert abs(best["score"] - float(probs.max())) < 1e-5
