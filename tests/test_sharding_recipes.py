"""Every recipe family under FSDP2 on 2 CPU processes trains as DDP does, step for step: the image
family's gathered losses and EMA teachers, text and image fine-tuning, CLM, MAE, CLIP/SigLIP and the
wav2vec 2.0 family, each with sharded checkpoints and DDP's export. (The sharding machinery itself,
MLM, hybrid sharding and the launchers are in ``tests/test_sharding.py``; split so that pytest-xdist
can run the two files side by side.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from multissl.metrics import read_jsonl
from tests.test_mae import SMALL as MAE_TINY
from tests.test_sharding import BERT_LAYERS, FSDP_ENV, _torchrun, _train_records, _weights, same_steps

IMAGE_SSL = ["trainer.max_steps=4", "trainer.batch_size=16", "trainer.log_every=1", "trainer.progress_bar=false",
             "trainer.trackers=[]", "trainer.eval_max_batches=2", "trainer.eval_batch_size=16", "trainer.eval_every=2",
             "augment.size=16", "model.backbone.kwargs={layers: [1, 1, 1, 1], channels: [8, 16, 16, 32]}"]


def _sharded_run_matches_ddp(args: list[str], fsdp_env: dict[str, str], tmp_path: Path, steps: int,
                             checkpoint: int) -> tuple[Path, Path]:
    """Run ``args`` under DDP and under FSDP on 2 processes; the FSDP run must have written a sharded
    checkpoint at step ``checkpoint`` (not fallen back to DDP) and logged DDP's loss and gradient norm
    at each of its ``steps``. Returns the two output folders."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    for out, env in ((ddp, {}), (fsdp, fsdp_env)):
        proc = _torchrun(args, out, **env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (fsdp / "checkpoints" / f"step_{checkpoint:08d}" / "pytorch_model_fsdp_0").is_dir(), "sharded, not replicated"
    same_steps(ddp, fsdp, steps, loss_rel=1e-5, norm_rel=1e-4)
    return ddp, fsdp




@pytest.mark.parametrize("method", ["simclr", "barlow_twins", "vicreg"])
def test_losses_over_both_processes_batches_under_fsdp_are_ddps(method: str, tmp_path: Path) -> None:
    """NT-Xent's negatives, Barlow Twins' cross-correlation and VICReg's variance and covariance
    come from both processes' rows (gathers that carry gradients); the loss and gradient norm are
    DDP's at every step, and the online kNN probe runs on the whole model rebuilt from shards."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    args = [f"recipes/{method}.py", *IMAGE_SSL]
    for out, env in ((ddp, {}), (fsdp, FSDP_ENV)):
        proc = _torchrun(args, out, **env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(_train_records(ddp), _train_records(fsdp), strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
    probes = [r for r in map(json.loads, (fsdp / "metrics.jsonl").read_text().splitlines()) if "probe/knn_acc" in r]
    assert [r["step"] for r in probes] == [0, 2, 4] and all(r["probe/knn_acc"] > 0.15 for r in probes)  # chance 0.1
    import timm

    timm.create_model(f"local-dir:{fsdp / 'model'}", pretrained=True)


def _teacher_state(out: Path, step: int) -> dict[str, torch.Tensor]:
    """The objective's checkpointed tensors (the EMA teacher, MoCo's queue, DINO's centre) at ``step``."""
    state = torch.load(out / "checkpoints" / f"step_{step:08d}" / "custom_checkpoint_0.pkl", weights_only=True)
    return {f"{module}.{k}": v for module, tensors in state["modules"].items() for k, v in tensors.items()}


@pytest.mark.parametrize("method", ["moco", "byol", "dino"])
def test_ema_teachers_under_fsdp_follow_ddps(method: str, tmp_path: Path) -> None:
    """The teacher stays whole on every process and follows the sharded online network (its update
    gathers the online weights): DDP's loss and gradient norm at every step, DDP's teacher, queue and
    centre in the checkpoint, DDP's export (DINO's is the teacher's backbone); DINO resumes from the
    sharded checkpoint to the same weights and teacher."""
    args = [f"recipes/{method}.py", *IMAGE_SSL, "trainer.save_every=2"]
    ddp, fsdp = _sharded_run_matches_ddp(args, FSDP_ENV, tmp_path, steps=4, checkpoint=2)
    want, got = _teacher_state(ddp, 4), _teacher_state(fsdp, 4)
    assert want and got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    exported = _weights(fsdp)
    for name, tensor in _weights(ddp).items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    if method == "dino":
        shutil.rmtree(fsdp / "checkpoints" / "step_00000004")
        shutil.rmtree(fsdp / "model")
        again = _torchrun(args, fsdp, **FSDP_ENV)
        assert again.returncode == 0 and "step 2/4" in again.stdout, again.stderr[-3000:]
        assert all(torch.equal(_weights(fsdp)[k], v) for k, v in exported.items())
        assert all(torch.equal(_teacher_state(fsdp, 4)[k], v) for k, v in got.items())


FINETUNE_TEXT = ["recipes/finetune_text_classification.py", "trainer.max_steps=4", "trainer.log_every=1",
                 "trainer.batch_size=8", "trainer.progress_bar=false", "trainer.trackers=[]", "trainer.eval_every=2",
                 "trainer.save_every=2", "data.max_seq_len=32", "data.vocab_size=500", "model.hidden_size=32",
                 "model.num_layers=2", "data.label_fraction=0.1"]


def test_text_fine_tuning_under_fsdp_trains_as_ddp_does_and_exports_a_pipeline_model(tmp_path: Path) -> None:
    """Fine-tuning shards as pretraining does: the classifier's loss and gradient norm are DDP's at
    every step, evaluation runs on both processes' shards, and the export is one whole model that
    `pipeline("text-classification")` runs with DDP's predictions."""
    ddp, fsdp = _sharded_run_matches_ddp(FINETUNE_TEXT, BERT_LAYERS, tmp_path, steps=4, checkpoint=2)
    evals = {out: [r for r in read_jsonl(out / "metrics.jsonl") if "eval/accuracy" in r] for out in (ddp, fsdp)}
    assert [r["step"] for r in evals[fsdp]] == [0, 2, 4]
    for a, b in zip(evals[ddp], evals[fsdp], strict=True):
        assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-5) and b["eval/accuracy"] == a["eval/accuracy"]
    exported = _weights(fsdp)
    for name, tensor in _weights(ddp).items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(fsdp / "model"), device="cpu")
    for row in read_jsonl(ddp / "predictions.jsonl")[:4]:
        out = classify(row["text"], truncation=True, max_length=32)[0]
        assert out["label"] == row["prediction"] and out["score"] == pytest.approx(row["score"], abs=1e-4)


SHORT = ["trainer.max_steps=3", "trainer.log_every=1", "trainer.progress_bar=false", "trainer.trackers=[]",
         "trainer.eval_every=0", "trainer.save_every=3"]


@pytest.mark.parametrize("recipe, layer, extra", [
    ("clm", "GPT2Block", ["trainer.batch_size=4", "data.vocab_size=500", "data.max_seq_len=32", "model.hidden_size=32",
                          "model.intermediate_size=64"]),
    ("mae", "ViTMAELayer", ["trainer.batch_size=8", "probe.task=\"\"", *(f"{k}={v}" for k, v in MAE_TINY.items())]),
])
def test_clm_and_mae_under_fsdp_train_as_ddp_does(recipe: str, layer: str, extra: list[str], tmp_path: Path) -> None:
    """Each wrapped in its own transformer layer (`--fsdp_transformer_layer_cls_to_wrap`, as the
    README says per recipe): DDP's loss and gradient norm at every step, sharded checkpoints, DDP's export."""
    ddp, fsdp = _sharded_run_matches_ddp([f"recipes/{recipe}.py", *SHORT, *extra],
                                         {**BERT_LAYERS, "FSDP_TRANSFORMER_CLS_TO_WRAP": layer}, tmp_path,
                                         steps=3, checkpoint=3)
    exported = _weights(fsdp)
    for name, tensor in _weights(ddp).items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


CLIP = ["recipes/clip.py", "trainer.max_steps=4", "trainer.log_every=1", "trainer.progress_bar=false",
        "trainer.trackers=[]", "trainer.eval_every=2", "trainer.save_every=2", "trainer.batch_size=8",
        "trainer.eval_max_batches=2", "eval.max_images=32"]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_under_fsdp_trains_as_ddp_does_and_exports_open_clips_model(kind: str, tmp_path: Path) -> None:
    """The contrastive losses' gathers carry gradients through the sharded towers (one FSDP unit per
    ``ResidualAttentionBlock``): DDP's loss and gradient norm at every step; the temperature (and
    SigLIP's bias), scalars that train as one-element vectors, come back as scalars in an export
    open_clip loads, equal to DDP's; SigLIP resumes from the sharded checkpoint to the same weights."""
    args = [*CLIP, f"loss.kind={kind}"]
    env = {**BERT_LAYERS, "FSDP_TRANSFORMER_CLS_TO_WRAP": "ResidualAttentionBlock"}
    ddp, fsdp = _sharded_run_matches_ddp(args, env, tmp_path, steps=4, checkpoint=2)
    from safetensors.torch import load_file

    def weights(out: Path) -> dict[str, torch.Tensor]:
        return load_file(out / "model" / "open_clip_model.safetensors")

    exported, reference = weights(fsdp), weights(ddp)
    assert exported.keys() == reference.keys() and exported["logit_scale"].shape == ()
    for name, tensor in reference.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    import open_clip

    model = open_clip.create_model(f"local-dir:{fsdp / 'model'}")
    assert float(model.logit_scale) == float(exported["logit_scale"])
    if kind == "siglip":
        assert exported["logit_bias"].shape == ()
        shutil.rmtree(fsdp / "checkpoints" / "step_00000004")
        shutil.rmtree(fsdp / "model")
        again = _torchrun(args, fsdp, **env)
        assert again.returncode == 0 and "step 2/4" in again.stdout, again.stderr[-3000:]
        assert all(torch.equal(weights(fsdp)[k], v) for k, v in exported.items())


SPEECH = ["trainer.log_every=1", "trainer.progress_bar=false", "trainer.trackers=[]", "trainer.warmup_steps=1"]
STABLE_LAYERS = {**BERT_LAYERS, "FSDP_TRANSFORMER_CLS_TO_WRAP": "Wav2Vec2EncoderLayerStableLayerNorm"}


def test_the_wav2vec2_family_under_fsdp_trains_as_ddp_does(tmp_path: Path) -> None:
    """Pretraining (its contrastive loss, quantiser and masking), then speech recognition and keyword
    spotting from its export: DDP's loss and gradient norm at every step, DDP's eval metrics and
    export. (transformers' encoder zeroes padded frames in place on its input, which under FSDP is a
    view autograd protects: the recipes hand it a copy, `multissl.models.encoder_input`.)"""
    from multissl.data.keyword_demo import build_keyword_corpus
    from multissl.data.speech_demo import build_speech_corpus

    speech = build_speech_corpus(tmp_path / "speech_corpus", 48, seed=0)
    keywords = build_keyword_corpus(tmp_path / "keyword_corpus", speakers=("en+m1", "en+f1", "en-us+m3", "en-us+f4",
                                                                     "en-gb-x-rp+m2", "en-gb-x-rp+f1"))
    runs = {
        "pretrain": (["recipes/wav2vec2.py", f"data.manifest={speech}", "trainer.max_steps=3", "trainer.eval_every=3",
                      "trainer.save_every=3", "data.max_seconds=3.0", "data.max_batch_samples=100000",
                      "loss.num_negatives=20", "data.validation_fraction=0.2"], 3, 3),
        "ctc": (["recipes/finetune_speech_recognition.py", f"data.manifest={speech}", "trainer.max_steps=4",
                 "trainer.eval_every=2", "trainer.save_every=2", "data.max_seconds=3.0", "data.max_batch_samples=100000",
                 "data.validation_fraction=0.2"], 4, 2),
        "keywords": (["recipes/finetune_audio_classification.py", f"data.manifest={keywords}", "trainer.max_steps=4",
                      "trainer.eval_every=2", "trainer.save_every=2", "data.validation_fraction=0.25",
                      "data.max_seconds=2", "data.max_batch_samples=160000"], 4, 2),
    }
    pretrained = None
    for name, (args, steps, checkpoint) in runs.items():
        (tmp_path / name).mkdir()
        init = [f"model.init_from={pretrained}"] if pretrained else []
        ddp, fsdp = _sharded_run_matches_ddp([*args, *SPEECH, *init], STABLE_LAYERS, tmp_path / name, steps, checkpoint)
        evals = {out: [r for r in read_jsonl(out / "metrics.jsonl") if "eval/loss" in r] for out in (ddp, fsdp)}
        assert len(evals[fsdp]) >= 2 and evals[fsdp][-1]["step"] == steps, name
        for a, b in zip(evals[ddp], evals[fsdp], strict=True):
            for key, value in a.items():
                if key.startswith("eval/") and isinstance(value, float):
                    assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
        exported = _weights(fsdp)
        for key, tensor in _weights(ddp).items():
            torch.testing.assert_close(exported[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
        pretrained = pretrained or ddp / "model"


FINETUNE_IMAGE = ["recipes/finetune_image_classification.py", "trainer.max_steps=4", "trainer.log_every=1",
                  "trainer.batch_size=16", "trainer.progress_bar=false", "trainer.trackers=[]", "trainer.eval_every=0",
                  "trainer.save_every=2", "data.label_fraction=0.1"]


def test_image_fine_tuning_under_fsdp_trains_as_ddp_does(tmp_path: Path) -> None:
    """The new tiny ResNet on the embedded digits, one FSDP unit (``NO_WRAP``): DDP's training loss
    and gradient norm at every step, sharded checkpoints, and DDP's weights in an export timm loads.
    (Batch-norm running statistics are each process's own under FSDP, so only parameters are compared.)"""
    ddp, fsdp = _sharded_run_matches_ddp(FINETUNE_IMAGE, FSDP_ENV, tmp_path, steps=4, checkpoint=2)
    import timm

    net = timm.create_model(f"local-dir:{fsdp / 'model'}", pretrained=True)
    exported, reference = _weights(fsdp), _weights(ddp)
    params = {name for name, _ in net.named_parameters()}
    assert params and params <= set(exported)
    for name in params:
        torch.testing.assert_close(exported[name], reference[name], rtol=1e-5, atol=1e-6, msg=name)
