"""The wav2vec 2.0 recipe end to end on a small embedded speech corpus."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from multissl_recipes import wav2vec2

from multissl import config
from multissl.data.audio_splits import prepare_audio
from multissl.data.speech_demo import build_speech_corpus
from multissl.metrics import read_jsonl
from tests.conftest import BIN, assert_resume_is_exact, run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_speech_corpus(tmp_path_factory.mktemp("speech"), 96, seed=0)


def _args(out: Path, manifest: Path, steps: int, **extra: object) -> list[str]:
    args = [f"trainer.output_dir={out}", f"data.manifest={manifest}", f"trainer.max_steps={steps}",
            "trainer.progress_bar=false", "trainer.trackers=[]", "trainer.log_every=5", "data.max_seconds=3.0",
            "data.max_batch_samples=200000", "loss.num_negatives=20", "trainer.warmup_steps=10",
            "data.validation_fraction=0.2"]
    return args + [f"{k}={v}" for k, v in extra.items()]


def test_tiny_preset_learns_without_collapsing(tmp_path: Path, corpus: Path) -> None:
    """Held-out contrastive accuracy rises well above chance while the codebook stays in use (a
    collapsed codebook would also lift accuracy, as distractors equal to the target are dropped)."""
    wav2vec2.main([f"trainer.output_dir={tmp_path}", f"data.manifest={corpus}", "trainer.max_steps=250",
                   "trainer.warmup_steps=25", "trainer.eval_every=250", "trainer.log_every=25", "data.max_seconds=3.0",
                   "data.max_batch_samples=200000", "data.validation_fraction=0.2", "trainer.progress_bar=false",
                   "trainer.trackers=[]"])
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    before, after = [r for r in rows if "eval/contrastive_accuracy" in r]
    chance = 1 / 31
    assert before["eval/contrastive_accuracy"] < 2 * chance
    assert after["eval/contrastive_accuracy"] > 2.5 * chance, after
    assert after["eval/codevector_perplexity"] > 0.6 * 2 * 16, "the codebook (2 x 16) stays in use"
    train = [r["train/contrastive_loss"] for r in rows if "train/contrastive_loss" in r]
    assert train[-1] < train[0] - 0.1


def test_runs_logs_and_output_loads(tmp_path: Path, corpus: Path) -> None:
    """Mechanics on a short run."""
    result = wav2vec2.main(_args(tmp_path, corpus, 20, **{"trainer.eval_every": 10}))
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval/contrastive_loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    for r in evals:  # starts at the uniform-guess loss ln(K+1) and stays finite
        assert 0 < r["eval/contrastive_loss"] < 1.15 * np.log(21) and 0 <= r["eval/contrastive_accuracy"] <= 1
    assert evals[-1]["eval/masked_fraction"] == pytest.approx(1 - (1 - 0.065) ** 10, abs=0.06)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    assert {"train/codevector_perplexity", "train/gumbel_temperature", "train/diversity_loss", "train/grad_norm",
            "train/masked_fraction", "throughput/audio_seconds_per_s"} <= set(rows[-1])
    assert rows[-1]["train/gumbel_temperature"] == pytest.approx(2.0 * 0.999995**20)

    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    model_dir = tmp_path / "model"
    loaded = Wav2Vec2Model.from_pretrained(model_dir).eval()
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    audio, rate = sf.read(corpus.parent / "wavs" / "000001.wav", dtype="float32")
    inputs = extractor(audio, sampling_rate=rate, return_tensors="pt")
    trained = result.model.wav2vec2.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).last_hidden_state, trained(**inputs).last_hidden_state)
    assert loaded.config.mask_time_prob == 0.05
    assert "Wav2Vec2Model" in (model_dir / "README.md").read_text()
    from transformers import Wav2Vec2ForCTC

    ctc = Wav2Vec2ForCTC.from_pretrained(model_dir, vocab_size=12)  # what speech fine-tuning starts from
    torch.testing.assert_close(ctc.wav2vec2.encoder.layers[0].attention.q_proj.weight,
                               loaded.encoder.layers[0].attention.q_proj.weight)


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_is_exact_including_gumbel_temperature(tmp_path: Path, corpus: Path, streaming: bool) -> None:
    args = _args(tmp_path, corpus, 8, **{"trainer.save_every": 4, "trainer.keep_last": 3, "loss.gumbel_decay": 0.99,
                                         "data.streaming": streaming, "data.shuffle_buffer": 16})
    resumed = assert_resume_is_exact(wav2vec2.main, args, tmp_path, 8)
    assert resumed.model.quantizer.temperature == pytest.approx(2.0 * 0.99**8)


def test_bad_files_are_skipped_and_the_run_completes(tmp_path: Path, corpus: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "audio"
    folder.mkdir()
    for wav in sorted((corpus.parent / "wavs").glob("*.wav"))[:20]:  # few: 6 steps go past an epoch
        shutil.copy(wav, folder / wav.name)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "text.wav").write_text("not audio at all")
    good = (folder / "000002.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(good[:30])
    sf.write(folder / "silent.wav", np.zeros(32000, dtype=np.float32), 16000)
    sf.write(folder / "stereo_8k.wav", np.random.default_rng(0).normal(0, 0.1, (24000, 2)).astype(np.float32), 8000)
    args = _args(tmp_path / "run", corpus, 6, **{"trainer.num_workers": 2, "trainer.log_every": 3,
                                                  "data.validation_fraction": 0})
    result = wav2vec2.main(args + [f"data.files=[{folder}]", "data.manifest="])
    assert result.state.step == 6
    printed = capsys.readouterr().out
    assert "skipping 3 unreadable audio file(s)" in printed
    assert all(name in printed for name in ("empty.wav", "text.wav", "truncated.wav"))
    # silent.wav passes the header probe and is dropped by the collator, in whichever worker builds
    # its batch; the logged total counts each bad file once: the 3 found when listing from the first
    # step, silent.wav from the first batch that holds it, however often it comes up after.
    cfg = config.load(wav2vec2.Wav2Vec2Config, args + [f"data.files=[{folder}]", "data.manifest="])
    train, _ = prepare_audio(cfg.data, cfg.trainer.seed)
    sampler = train.make_batch_sampler(batch_size=0, seed=cfg.trainer.seed, shuffle=True, drop_last=True, rank=0,
                                       world_size=1, split_tag=0)
    silent = [i for i, p in enumerate(train.data["path"]) if p.endswith("silent.wav")]
    drawn: list[int] = []
    epoch = 0
    while len(drawn) < 6:
        sampler.set_epoch(epoch)
        drawn += [sum(i in silent for i, _ in b) for b in sampler][: 6 - len(drawn)]
        epoch += 1
    assert sum(drawn) > 0
    logged = [r.get("data/skipped_audio_files", 0) for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert logged == [3 + min(1, sum(drawn[:3])), 4]
    assert "audio files: 4 skipped" in printed


def test_two_processes_normalise_the_loss_over_all_masked_frames(tmp_path: Path, corpus: Path) -> None:
    """DDP gradients with 1 and 3 utterances per process equal one process's over all 4."""
    from tests.dist_wav2vec2_grads import build_objective, grads, loss_of

    proc = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "tests/dist_wav2vec2_grads.py", str(corpus),
                str(tmp_path / "grads.pt")], timeout=600, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "grads.pt")
    objective, batches = build_objective(str(corpus))
    losses = [loss_of(objective, objective.model, batches, i) for i in range(2)]
    assert float(losses[0].count) * 2 < float(losses[1].count), "the processes must hold unequal masked frames"
    ((losses[0].total + losses[1].total) / (losses[0].count + losses[1].count)).backward()
    want = grads(objective.model)
    assert got.keys() == want.keys() and len(want) > 10
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-7, msg=name)


def test_two_processes_end_to_end(tmp_path: Path, corpus: Path) -> None:
    """The recipe under torchrun: duration batches sharded, units counted over both processes."""
    args = _args(tmp_path, corpus, 4, **{"trainer.eval_every": 4, "trainer.log_every": 2})
    proc = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "recipes/wav2vec2.py", *args],
               timeout=600, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    assert [r["step"] for r in rows if "eval/contrastive_loss" in r] == [0, 4]
    cfg = config.load(wav2vec2.Wav2Vec2Config, args)
    train, _ = prepare_audio(cfg.data, cfg.trainer.seed)
    used = 0
    for rank in (0, 1):
        sampler = train.make_batch_sampler(batch_size=0, seed=cfg.trainer.seed, shuffle=True, drop_last=True,
                                           rank=rank, world_size=2, split_tag=0)
        used += sum(len(b) for b in list(sampler)[:4])
    state = json.loads((tmp_path / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["seen"]["samples"] == used
    from transformers import Wav2Vec2Model

    Wav2Vec2Model.from_pretrained(tmp_path / "model")


def test_spawned_workers_see_the_same_batches(tmp_path: Path, corpus: Path) -> None:
    """Span masks and distractors are drawn in the worker from the batch's seed: a spawned worker
    (which unpickles the collator, not the model) builds the same batches as the main process."""
    losses = []
    for workers, method in ((0, ""), (1, "spawn")):
        out = tmp_path / f"w{workers}"
        wav2vec2.main(_args(out, corpus, 2, **{"trainer.log_every": 1, "trainer.num_workers": workers,
                                               "trainer.worker_start_method": method}))
        losses.append([r["train/loss"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r])
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], rel=1e-6)
