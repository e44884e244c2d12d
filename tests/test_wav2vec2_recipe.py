"""The wav2vec 2.0 recipe end to end on a small embedded speech corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from multissl.data.speech_demo import build_speech_corpus
from multissl.metrics import read_jsonl
from recipes import wav2vec2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_speech_corpus(tmp_path_factory.mktemp("speech"), 48, seed=0)


def _args(out: Path, manifest: Path, steps: int, **extra: object) -> list[str]:
    args = [f"trainer.output_dir={out}", f"data.manifest={manifest}", f"trainer.max_steps={steps}",
            "trainer.progress_bar=false", "trainer.trackers=[]", "trainer.log_every=5", "data.max_seconds=3.0",
            "data.max_batch_samples=200000", "loss.num_negatives=20", "trainer.warmup_steps=10",
            "data.validation_fraction=0.2"]
    return args + [f"{k}={v}" for k, v in extra.items()]


def test_runs_logs_and_output_loads(tmp_path: Path, corpus: Path) -> None:
    """Mechanics on a short run. (Learning needs ~500+ steps at this size: the contrastive loss sits at
    ln(K+1) first, as measured in ARCHITECTURE.md; that run is not a unit test.)"""
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


def test_resume_is_exact_including_gumbel_temperature(tmp_path: Path, corpus: Path) -> None:
    args = _args(tmp_path, corpus, 8, **{"trainer.save_every": 4, "trainer.keep_last": 3, "loss.gumbel_decay": 0.99})
    straight = wav2vec2.main(args)
    want = {k: v.clone() for k, v in straight.model.state_dict().items()}
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000008")
    shutil.rmtree(tmp_path / "model")
    resumed = wav2vec2.main(args)
    for name, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.model.quantizer.temperature == pytest.approx(2.0 * 0.99**8)
    key = lambda rs: [(r["step"], round(r.get("train/loss", r.get("eval/loss", 0)), 5)) for r in rs]  # noqa: E731
    assert key(read_jsonl(tmp_path / "metrics.jsonl")) == key(rows)


def test_bad_files_are_skipped_and_the_run_completes(tmp_path: Path, corpus: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "audio"
    shutil.copytree(corpus.parent / "wavs", folder)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "text.wav").write_text("not audio at all")
    good = (folder / "000002.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(good[:30])
    sf.write(folder / "silent.wav", np.zeros(32000, dtype=np.float32), 16000)
    sf.write(folder / "stereo_8k.wav", np.random.default_rng(0).normal(0, 0.1, (24000, 2)).astype(np.float32), 8000)
    result = wav2vec2.main(_args(tmp_path / "run", corpus, 6) + [f"data.files=[{folder}]", "data.manifest="])
    assert result.state.step == 6
    printed = capsys.readouterr().out
    assert "skipping 3 unreadable audio file(s)" in printed
    assert all(name in printed for name in ("empty.wav", "text.wav", "truncated.wav"))
