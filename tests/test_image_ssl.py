"""The image-SSL family end to end on the embedded digits, at tiny sizes: every method trains through
the shared trainer, exports a timm backbone timm loads with identical features, and resumes exactly
(teachers, queues, centres and schedules included); plus the pieces the family shares (heads, EMA,
collapse diagnostics, views)."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

from multissl.data.views import AugmentConfig
from multissl.metrics import read_jsonl
from multissl.models.ema import cosine_momentum, ema_update, momentum_copy
from multissl.models.heads import DINOHead, mlp
from multissl.objectives.joint_embedding import collapse_metrics, effective_rank

METHODS = ["simclr", "moco", "byol", "simsiam", "barlow_twins", "vicreg", "dino"]
SMALL = {"augment.size": 16, "model.backbone.kwargs": "{layers: [1, 1, 1, 1], channels: [8, 16, 16, 32]}"}
"""Even smaller than the tiny presets: 16 px, a ResNet of 8-32 channels."""
LOCAL_16 = {"local.count": 2, "local.augment.size": 8}


def _args(out: Path, steps: int, method: str, **extra: object) -> list[str]:
    args = {"trainer.output_dir": out, "trainer.max_steps": steps, "trainer.batch_size": 16, "trainer.log_every": 1,
            "trainer.progress_bar": "false", "trainer.trackers": "[]", "trainer.eval_max_batches": 1,
            "trainer.eval_batch_size": 16, "probe.task": '""', **SMALL, **(LOCAL_16 if method == "dino" else {}),
            **extra}
    return [f"{k}={v}" for k, v in args.items()]


def _recipe(method: str):  # noqa: ANN202 - a module
    return importlib.import_module(f"multissl_recipes.{method}")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_exports_a_timm_backbone(method: str, tmp_path: Path) -> None:
    import timm

    out = tmp_path / method
    result = _recipe(method).main(_args(out, 3, method))
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    assert len(train) == 3 and all(math.isfinite(r["train/loss"]) for r in train)
    assert {"train/embedding_std", "train/effective_rank", "throughput/samples_per_s"} <= set(train[-1])
    assert any("eval/loss" in r and "eval/embedding_std" in r for r in records)
    model = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True).eval()
    assert model.num_classes == 0 and model.pretrained_cfg["input_size"] == (3, 16, 16)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model.eval()(x))
    card = (out / "model" / "README.md").read_text()
    assert "library_name: timm" in card and method in card
    if method == "simclr":  # transformers' timm wrapper loads the same folder, with no multissl code
        from transformers import AutoModel

        wrapped = AutoModel.from_pretrained(out / "model").eval()
        with torch.no_grad():
            torch.testing.assert_close(wrapped(pixel_values=x).pooler_output, model(x))


@pytest.mark.parametrize("method", ["moco", "byol", "dino"])
def test_methods_with_teachers_resume_exactly(method: str, tmp_path: Path) -> None:
    """MoCo's key encoder and queue, BYOL's target, DINO's teacher, centre and temperature schedule
    all come back from a checkpoint: the resumed run's losses and weights equal an unbroken run's."""
    from tests.conftest import assert_resume_is_exact

    out = tmp_path / "run"
    extra = {"trainer.save_every": 2, "trainer.eval_every": 0}
    if method == "moco":
        extra["loss.queue_size"] = 40  # wraps within the run
    if method == "dino":
        extra["model.freeze_last_layer_epochs"] = 0.01
    assert_resume_is_exact(_recipe(method).main, _args(out, 4, method, **extra), out, 4)


def test_moco_queue_holds_the_newest_keys_and_v3_runs(tmp_path: Path) -> None:
    from multissl.objectives.moco import MoCo

    recipe = _recipe("moco")
    from multissl import config

    cfg = config.load(recipe.MoCoConfig, _args(tmp_path / "q", 2, "moco", **{"loss.queue_size": 24}), recipe.DEFAULT_CONFIG)
    objective = MoCo(cfg.model, cfg.loss, augment=cfg.augment)
    assert isinstance(objective, MoCo) and objective.queue is not None
    before = objective.queue.keys.clone()
    keys = torch.nn.functional.normalize(torch.randn(16, cfg.model.projector.out), dim=1)
    objective.queue.push(keys)
    torch.testing.assert_close(objective.queue.keys[:16], keys)
    assert torch.equal(objective.queue.keys[16:], before[16:])
    objective.queue.push(keys[:10])  # rows 16-23, then wraps to 0-1
    assert int(objective.queue.ptr) == 2
    torch.testing.assert_close(objective.queue.keys[16:24], keys[:8])
    torch.testing.assert_close(objective.queue.keys[:2], keys[8:10])
    snapshot = objective.queue.keys.clone()
    assert not objective.queue.push(torch.full((4, cfg.model.projector.out), float("nan")))
    assert torch.equal(objective.queue.keys, snapshot) and int(objective.queue.ptr) == 2, "NaN keys are not enqueued"
    result = recipe.main(_args(tmp_path / "v3", 2, "moco", **{"model.version": 3, "model.projector.hidden": "[32]",
                                                              "model.projector.out": 16, "model.predictor.hidden": "[32]",
                                                              "model.predictor.out": 16, "loss.temperature": 1.0}))
    assert result.final_metrics["contrastive_accuracy"] >= 0


def test_dino_freezes_the_last_layer_then_trains_it_and_exports_the_teacher(tmp_path: Path) -> None:
    from multissl import config
    from multissl.objectives.dino import DINO

    recipe = _recipe("dino")
    cfg = config.load(recipe.DINOConfig, _args(tmp_path, 2, "dino", **{"loss.teacher_temperature_final": 0.07}),
                      recipe.DEFAULT_CONFIG)  # the tiny preset holds 0.04; the paper's warm-up is tested here
    objective = DINO(cfg.model, cfg.loss, cfg.local, augment=cfg.augment)
    assert len(objective.view_transforms()) == 2 + cfg.local.count
    assert objective.export(objective.model) is objective.target.backbone
    objective.freeze_steps = 1
    last = objective.model.projector.last_layer.weight
    last.grad = torch.ones_like(last)
    objective.before_optimizer_step(objective.model, 0)
    assert last.grad is None, "frozen in the first epoch"
    last.grad = torch.ones_like(last)
    objective.before_optimizer_step(objective.model, 1)
    assert last.grad is not None
    objective.warmup_steps, objective.step = 10, 5
    assert objective.teacher_temperature() == pytest.approx((0.04 + 0.07) / 2)


def test_simsiam_trains_its_predictor_at_a_fixed_lr(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _recipe("simsiam").main(_args(out, 3, "simsiam", **{"trainer.warmup_ratio": 0.0}))
    train = [r for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    base = [r["train/lr"] for r in train]
    assert base[-1] < base[0], "the backbone and projector follow the cosine schedule"
    predictor = [r["train/lr/predictor"] for r in train if "train/lr/predictor" in r]  # logged where it differs
    assert predictor and set(predictor) == {base[0]}, "the predictor stays at the base lr"


# --------------------------------------------------------------------------------- shared pieces
def test_heads_put_batch_norms_where_the_papers_do() -> None:
    simclr = mlp([8, 16, 4])
    assert [type(m).__name__ for m in simclr] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert simclr[0].bias is None and simclr[3].bias is not None
    simsiam = mlp([8, 16, 16, 4], last_batch_norm=True, last_affine=False)
    assert not simsiam[-1].affine and simsiam[-2].bias is None
    moco_v2 = mlp([8, 16, 4], batch_norm=False)
    assert [type(m).__name__ for m in moco_v2] == ["Linear", "ReLU", "Linear"]
    head = DINOHead(8, out_dim=32, hidden=16, bottleneck=4)
    w = head.last_layer.weight
    with torch.no_grad():
        w.mul_(5.0)  # the prototypes' norms are fixed at 1, whatever the raw weight's
        x = torch.randn(3, 8)
        expected = torch.nn.functional.normalize(head.mlp(x), dim=-1) @ torch.nn.functional.normalize(w, dim=1).T
    torch.testing.assert_close(head(x), expected)


def test_ema_follows_the_online_network_on_a_cosine() -> None:
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    online = torch.nn.Linear(3, 2)
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        online.weight.add_(1.0)
    before = target.weight.clone()
    ema_update(target, online, 0.9)
    torch.testing.assert_close(target.weight, 0.9 * before + 0.1 * online.weight)


def test_collapse_diagnostics_tell_spread_features_from_collapsed_ones() -> None:
    g = torch.Generator().manual_seed(0)
    spread = collapse_metrics(torch.randn(256, 32, generator=g))
    one_point = collapse_metrics(torch.ones(256, 32) + 1e-4 * torch.randn(256, 32, generator=g))
    assert spread["embedding_std"] > 0.9 and one_point["embedding_std"] < 0.01
    assert spread["effective_rank"] > 25 and one_point["effective_rank"] < 1.5
    line = torch.randn(256, 1, generator=g) * torch.randn(1, 32, generator=g)
    assert effective_rank(line) < 1.1


def test_collapse_warning_fires_after_warmup_and_patience() -> None:
    from multissl.objectives.joint_embedding import CollapseConfig
    from multissl.objectives.simclr import SimCLR, SimCLRLossConfig, SimCLRModelConfig

    objective = SimCLR(SimCLRModelConfig(), SimCLRLossConfig(), augment=AugmentConfig(size=16),
                       collapse=CollapseConfig(min_std=0.1, patience=2))
    low = {"embedding_std": 0.01, "effective_rank": 1.0}
    assert objective.on_log(low, step=5, warmup_steps=10) is None, "not during warm-up"
    assert objective.on_log(low, step=11, warmup_steps=10) is None
    warning = objective.on_log(low, step=12, warmup_steps=10)
    assert warning and "collapsing" in warning and "trainer.lr" in warning
    assert objective.on_log({"embedding_std": 0.8}, step=13, warmup_steps=10) is None


def test_dinos_head_batch_norm_spreads_outputs_that_share_one_direction() -> None:
    """What made the tiny DINO preset collapse: a ResNet's pooled post-ReLU features share most of
    their direction (cosine about 0.9 between digits at init), the plain head passes that on, and
    every output points one way, so the centred teacher is uniform. The batch norm removes it."""
    g = torch.Generator().manual_seed(0)
    shared = torch.rand(1, 64, generator=g) * 3
    features = (shared + 0.3 * torch.randn(256, 64, generator=g)).relu()

    def output_cosine(head: DINOHead) -> float:
        head.train()
        z = torch.nn.functional.normalize(head.mlp(features), dim=-1)
        return float((z @ z.T).mean())

    torch.manual_seed(0)
    plain = DINOHead(64, out_dim=128, hidden=128, bottleneck=32)
    torch.manual_seed(0)
    normed = DINOHead(64, out_dim=128, hidden=128, bottleneck=32, batch_norm=True)
    assert [type(m).__name__ for m in normed.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d",
                                                      "GELU", "Linear"]
    with torch.no_grad():
        assert output_cosine(plain) > 0.9
        assert output_cosine(normed) < 0.2


def test_dino_warns_when_its_teacher_turns_uniform() -> None:
    from multissl.errors import ConfigError
    from multissl.objectives import dino
    from multissl.objectives.joint_embedding import CollapseConfig

    def objective(collapse: CollapseConfig) -> dino.DINO:
        head = dino.DINOHeadConfig(out_dim=64, hidden=16, bottleneck=8)
        return dino.DINO(dino.DINOModelConfig(head=head), dino.DINOLossConfig(), dino.LocalCropsConfig(count=0),
                         augment=AugmentConfig(size=16), collapse=collapse)

    watched = objective(CollapseConfig(patience=2))
    uniform = {"teacher_entropy": math.log(64) - 0.01, "embedding_std": 0.5}
    peaked = {"teacher_entropy": 2.0, "embedding_std": 0.5}
    assert watched.on_log(uniform, step=5, warmup_steps=10) is None, "not during warm-up"
    assert watched.on_log(uniform, step=11, warmup_steps=10) is None, "not before its patience"
    warning = watched.on_log(uniform, step=12, warmup_steps=10)
    assert warning and "uniform" in warning and "model.head.batch_norm=true" in warning and "4.16" in warning
    assert watched.on_log(uniform, step=13, warmup_steps=10) is None, "once per patience window"
    assert watched.on_log(peaked, step=14, warmup_steps=10) is None
    assert watched.on_log(uniform, step=15, warmup_steps=10) is None, "a peaked log restarts the count"
    quiet = objective(CollapseConfig(patience=1, max_entropy_share=0.0))
    assert quiet.on_log(uniform, step=20, warmup_steps=10) is None, "0 turns it off"
    with pytest.raises(ConfigError, match="max_entropy_share"):
        CollapseConfig(max_entropy_share=1.5)


def test_second_view_overrides_blur_and_solarize_only() -> None:
    cfg = AugmentConfig(blur=1.0, second_view_blur=0.1, second_view_solarize=0.2)
    assert (cfg.view(0).blur, cfg.view(0).solarize) == (1.0, 0.0)
    assert (cfg.view(1).blur, cfg.view(1).solarize, cfg.view(1).size) == (0.1, 0.2, cfg.size)
    assert AugmentConfig(blur=0.3).view(1).blur == 0.3


def test_two_processes_keep_queue_teacher_and_centre_identical(tmp_path: Path) -> None:
    """Under torchrun with 2 processes, each seeing its own batches: MoCo's queue (keys of both
    processes, in rank order), key encoder and DINO's teacher and centre end equal on both ranks."""
    from tests.conftest import BIN, run

    for method in ("moco", "dino"):
        proc = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "tests/dist_image_ssl.py",
                    str(tmp_path), method], timeout=600, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
        assert proc.returncode == 0, proc.stderr[-3000:]
        ranks = [torch.load(tmp_path / f"{method}_rank{r}.pt") for r in (0, 1)]
        assert not torch.equal(ranks[0]["first_image"], ranks[1]["first_image"]), "each rank sees its own images"
        for module, state in ranks[0]["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(ranks[1]["state"][module][key], value, rtol=0, atol=0, msg=f"{method} {module}.{key}")
    moco = [torch.load(tmp_path / f"moco_rank{r}.pt") for r in (0, 1)]
    assert moco[0]["shuffles"] == moco[1]["shuffles"] == 3, "the key encoder saw batches shuffled across processes"
    # 3 steps x 2 processes x 16 keys were enqueued into 48 rows: the pointer wrapped back to 0
    assert int(moco[0]["state"]["queue"]["ptr"]) == (3 * 2 * 16) % 48


def test_dino_trains_a_vit_on_crops_of_two_sizes(tmp_path: Path) -> None:
    """A timm ViT with dynamic image size takes the 16 px global and 8 px local crops; the teacher
    it exports loads in timm and gives the same features."""
    import timm

    out = tmp_path / "vit"
    vit = "{img_size: 16, patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2, dynamic_img_size: true}"
    result = _recipe("dino").main(_args(out, 2, "dino", **{"model.backbone.name": "vit_tiny_patch16_224",
                                                           "model.backbone.kwargs": vit}))
    assert math.isfinite(result.final_metrics["loss"])
    model = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model.eval()(x))


def test_a_non_finite_teacher_leaves_dinos_centre_alone(tmp_path: Path) -> None:
    from multissl import config
    from multissl.objectives.dino import DINO

    recipe = _recipe("dino")
    cfg = config.load(recipe.DINOConfig, _args(tmp_path, 2, "dino"), recipe.DEFAULT_CONFIG)
    objective = DINO(cfg.model, cfg.loss, cfg.local, augment=cfg.augment)
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    batch = {"views": views, "labels": torch.zeros(4, dtype=torch.long)}
    objective.model.train()
    objective.compute(objective.model, batch)
    good = objective.center.center.clone()
    assert torch.isfinite(good).all() and good.abs().sum() > 0, "a finite step moves the centre"
    with torch.no_grad():
        next(objective.target.parameters()).fill_(float("nan"))
    out = objective.compute(objective.model, batch)
    assert not torch.isfinite(out["loss"].value), "the trainer's guard then skips this step"
    assert torch.equal(objective.center.center, good)
