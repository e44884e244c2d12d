"""CTC speech recognition: vocabulary, decoding, pooled WER/CER, bad transcripts, and the recipe end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jiwer
import pytest
import soundfile as sf
import torch
from multissl_recipes import finetune_speech_recognition as recipe

from multissl import config
from multissl.data.audio import AudioDataset
from multissl.data.audio_tasks import prepare_labelled_audio
from multissl.data.speech_demo import build_speech_corpus
from multissl.errors import DataError
from multissl.metrics import MetricSums, read_jsonl
from multissl.objectives.ctc import (
    DEFAULT_CHARS_TO_IGNORE,
    CTCModelConfig,
    SpeechRecognitionDataConfig,
    build_ctc_model,
    build_vocab,
    check_eval_chars,
    encode,
    error_rates,
    greedy_decode,
    make_tokenizer,
    normalize_transcript,
    prepare_transcripts,
    with_text,
)
from tests.conftest import assert_resume_is_exact


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> object:
    """One intra-op thread: these models are tiny, and on a shared 2-core machine two threads that
    wait for each other made this file 10x slower (211 s against 16 s, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_speech_corpus(tmp_path_factory.mktemp("speech"), 64, seed=0)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny wav2vec 2.0 pretraining output (untrained weights: these tests check mechanics)."""
    from multissl.data.audio import AudioCollator
    from multissl.objectives.wav2vec2 import Wav2Vec2LossConfig, Wav2Vec2ModelConfig, Wav2Vec2Pretraining

    torch.manual_seed(0)
    objective = Wav2Vec2Pretraining(Wav2Vec2ModelConfig(size="tiny"), Wav2Vec2LossConfig(num_negatives=10), AudioCollator())
    out = tmp_path_factory.mktemp("w2v") / "model"
    objective.save_pretrained(objective.model, out)
    return out


def _args(out: Path, corpus: Path, steps: int, **extra: object) -> list[str]:
    args = [f"trainer.output_dir={out}", f"data.manifest={corpus}", f"trainer.max_steps={steps}",
            "trainer.progress_bar=false", "trainer.trackers=[]", "trainer.log_every=2", "trainer.warmup_steps=2",
            "data.validation_fraction=0.25", "data.max_batch_samples=160000"]
    return args + [f"{k}={v}" for k, v in extra.items()]


def _audio_dataset(rows: dict[str, list], **cfg: object) -> AudioDataset:
    import datasets

    return AudioDataset(datasets.Dataset.from_dict(rows), SpeechRecognitionDataConfig(**cfg))


# ------------------------------------------------------------------------------- vocabulary
def test_normalisation_lowercases_and_drops_punctuation_but_keeps_apostrophes() -> None:
    ignore = re.compile(DEFAULT_CHARS_TO_IGNORE)
    assert normalize_transcript("  Don\u2019t   PANIC, said Arthur (twice)! ", ignore) == "don't panic said arthur twice"
    assert normalize_transcript("a|b well-known \"quote\"; x: y?", ignore) == "ab wellknown quote x y"
    assert normalize_transcript("Keep, THIS.", None) == "keep, this."


def test_vocabulary_blank_is_pad_zero_space_is_delimiter_chars_sorted_and_deterministic() -> None:
    texts = ["the cat's hat", "zebra quiz", "a b"]
    vocab = build_vocab(texts)
    assert list(vocab)[:3] == ["<pad>", "<unk>", "|"] and list(vocab.values()) == list(range(len(vocab)))
    chars = list(vocab)[3:]
    assert chars == sorted(set("".join(texts)) - {" "}) and "'" in chars
    assert build_vocab(reversed(texts)) == vocab
    tokenizer = make_tokenizer(vocab)
    assert tokenizer.pad_token_id == 0 and tokenizer.word_delimiter_token_id == 2 and len(tokenizer) == len(vocab)
    ids = encode("the cat", vocab)
    assert ids[3] == 2 and ids == tokenizer("the cat").input_ids
    assert encode("tax", vocab)[-1] == vocab["<unk>"]  # 'x' is in no training transcript
    with pytest.raises(DataError, match="word delimiter"):
        build_vocab(["a|b"])


# ------------------------------------------------------------------------------- decoding, metrics
def _one_hot(path: str, vocab: dict[str, int], frames: int) -> torch.Tensor:
    """Logits whose argmax is the space-separated tokens of ``path``, then padding frames."""
    tokens = path.split()
    logits = torch.zeros(frames, len(vocab))
    for t, token in enumerate(tokens):
        logits[t, vocab[token]] = 1.0
    logits[len(tokens):, vocab["x"]] = 1.0  # padding frames say "x": decoding must ignore them
    return logits


def test_greedy_decoding_collapses_repeats_drops_blanks_and_ignores_padding() -> None:
    vocab = build_vocab(["hello world ab x"])
    tokenizer = make_tokenizer(vocab)
    first, second = "h h e <pad> l l <pad> l o o | | w <pad> o r <pad> l d d", "<pad> a a <pad> a | <pad> | b"
    logits = torch.stack([_one_hot(first, vocab, 24), _one_hot(second, vocab, 24)])
    got = greedy_decode(logits, torch.tensor([len(first.split()), len(second.split())]), tokenizer)
    assert got == ["hello world", "aa  b"]  # "|", blank, "|" is two spaces, as the ASR pipeline prints it


def test_pooled_wer_and_cer_equal_jiwer_over_the_corpus_not_the_mean_of_utterances() -> None:
    batches = [(["the cat sat on the mat", "hi"], ["the cat sat on a mat", "ho hum"]),
               (["a much longer reference sentence with many words in it"], ["a much longer reference  sentence with words"])]
    sums = MetricSums()  # how the trainer pools eval metrics over batches (and processes)
    for refs, hyps in batches:
        sums.add(error_rates(refs, hyps))
    pooled = sums.reduce(None)
    refs = [r for b in batches for r in b[0]]
    hyps = [" ".join(h.split()) for b in batches for h in b[1]]
    assert pooled["wer"] == pytest.approx(jiwer.wer(refs, hyps))
    assert pooled["cer"] == pytest.approx(jiwer.cer(refs, hyps))
    per_utterance = sum(jiwer.wer(r, h) for r, h in zip(refs, hyps)) / len(refs)
    assert abs(pooled["wer"] - per_utterance) > 0.1
    assert error_rates(["abc"], [""])["cer"].value == pytest.approx(1.0)  # emitting nothing is CER 1


# ------------------------------------------------------------------------------- bad transcripts
def test_eval_characters_outside_the_vocabulary_map_to_unk_with_a_warning_or_fail(
        capsys: pytest.CaptureFixture[str]) -> None:
    vocab = build_vocab(["abc d"])
    held = _audio_dataset({"path": ["/x/1.wav", "/x/2.wav", "/x/3.wav"], "duration": [2.0] * 3,
                           "text": ["ab", "a z", "qc"]})
    assert check_eval_chars(held, vocab, "unk", "eval") == 2
    printed = capsys.readouterr().out
    assert "2 eval utterance(s)" in printed and "'qz'" in printed and "/x/2.wav ('z')" in printed
    assert encode("a z", vocab) == [vocab["a"], 2, vocab["<unk>"]]
    with pytest.raises(DataError, match=r"/x/2\.wav: transcript has character\(s\) 'z'"):
        check_eval_chars(held, vocab, "error", "eval")


def test_empty_after_normalisation_and_too_long_utterances_are_counted_and_skipped(
        capsys: pytest.CaptureFixture[str]) -> None:
    ds = _audio_dataset({"path": ["/x/1.wav", "/x/2.wav", "/x/3.wav"], "duration": [2.0, 2.0, 12.0],
                         "transcript": ["Hello!", "?!", "far too long"]}, max_seconds=10.0)
    kept = with_text(ds, ds.cfg, "demo")
    assert kept.data["text"] == ["hello"] and kept.data["path"] == ["/x/1.wav"]
    printed = capsys.readouterr().out
    assert "skipped 1 utterance(s) whose transcript is empty" in printed and "/x/2.wav" in printed
    assert "skipped 1 utterance(s) longer than data.max_seconds=10.0" in printed and "/x/3.wav" in printed


def test_labels_stay_with_their_audio_when_a_bad_file_is_skipped(tmp_path: Path, corpus: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from multissl.data.audio import AudioCollator
    from multissl.objectives.ctc import SpeechRecognition, make_processor

    (tmp_path / "bad.wav").write_text("not audio")
    wav = sorted((corpus.parent / "wavs").glob("*.wav"))
    samples = [{"path": str(wav[0]), "text": "ab"}, {"path": str(tmp_path / "bad.wav"), "text": "ba ba"},
               {"path": str(wav[1]), "text": "b a"}]
    vocab = build_vocab(["ab", "ba ba", "b a"])
    cfg = SpeechRecognitionDataConfig()
    model, _ = build_ctc_model(CTCModelConfig(), vocab)
    objective = SpeechRecognition(model, make_processor(vocab, cfg, model.config), AudioCollator())
    batch = objective.collator()(samples, torch.Generator().manual_seed(0))
    assert batch["path"] == [str(wav[0]), str(wav[1])] and batch["text"] == ["ab", "b a"]
    assert batch["labels"].tolist() == [[vocab["a"], vocab["b"], -100], [vocab["b"], 2, vocab["a"]]]
    assert len(objective.count(batch)["skipped_audio_files"].ids) == 1 and "bad.wav" in capsys.readouterr().out


def test_a_manifest_without_transcripts_is_an_error_naming_the_column(tmp_path: Path, corpus: Path) -> None:
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "transcript"}) + "\n" for r in rows))
    (tmp_path / "wavs").symlink_to(corpus.parent / "wavs")
    with pytest.raises(DataError, match="no 'transcript' column"):
        recipe.main(_args(tmp_path / "run", manifest, 2))


# ------------------------------------------------------------------------------- model and recipe
def test_model_keeps_the_pretrained_encoder_and_random_init_does_not(pretrained: Path) -> None:
    from transformers import Wav2Vec2ForPreTraining

    source = Wav2Vec2ForPreTraining.from_pretrained(pretrained)
    vocab = build_vocab(["ab c"])
    model, base = build_ctc_model(CTCModelConfig(init_from=str(pretrained)), vocab)
    scratch, _ = build_ctc_model(CTCModelConfig(init_from=str(pretrained), random_init=True), vocab)
    want = source.wav2vec2.encoder.layers[0].attention.q_proj.weight
    assert torch.equal(model.wav2vec2.encoder.layers[0].attention.q_proj.weight, want) and base == str(pretrained)
    assert not torch.equal(scratch.wav2vec2.encoder.layers[0].attention.q_proj.weight, want)
    assert model.lm_head.out_features == len(vocab) and model.config.pad_token_id == 0
    assert model.config.ctc_loss_reduction == "mean" and model.config.ctc_zero_infinity
    assert model.config.mask_time_prob == 0.05
    assert not any(p.requires_grad for p in model.wav2vec2.feature_extractor.parameters())
    fresh, _ = build_ctc_model(CTCModelConfig(), vocab)  # no init_from: the wav2vec2 tiny preset's shape
    assert fresh.config.hidden_size == source.config.hidden_size
    assert sum(p.numel() for p in fresh.wav2vec2.parameters()) == sum(p.numel() for p in source.wav2vec2.parameters())


def test_recipe_writes_predictions_and_a_model_the_asr_pipeline_loads(tmp_path: Path, corpus: Path,
                                                                       pretrained: Path) -> None:
    from transformers import Wav2Vec2ForPreTraining, pipeline

    args = _args(tmp_path, corpus, 4, **{"model.init_from": pretrained, "trainer.lr": 1e-3})
    result = recipe.main(args)
    evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval/cer" in r]
    assert [r["step"] for r in evals] == [0, 4] and all(r["eval/wer"] > 0 and r["eval/loss"] > 0 for r in evals)
    cfg = config.load(recipe.SpeechRecognitionConfig, args, recipe.DEFAULT_CONFIG)
    train, held, source = prepare_labelled_audio(cfg.data, "transcript", lambda: corpus)
    _, held, _ = prepare_transcripts(train, held, cfg.data, source)
    predictions = read_jsonl(tmp_path / "predictions.jsonl")
    assert len(held) >= 8 and {(p["path"], p["reference"]) for p in predictions} == set(zip(held.data["path"], held.data["text"]))
    assert len(predictions) == len(held) and set(predictions[0]) == {"path", "reference", "prediction"}
    assert result.best_step is not None and (tmp_path / "model" / "vocab.json").is_file()
    # frozen and loaded: the feature encoder is the pretrained one, untouched by fine-tuning
    source = Wav2Vec2ForPreTraining.from_pretrained(pretrained).wav2vec2.feature_extractor.conv_layers[0].conv.weight
    assert torch.equal(result.model.wav2vec2.feature_extractor.conv_layers[0].conv.weight, source)

    transcribe = pipeline("automatic-speech-recognition", model=str(tmp_path / "model"))
    for row in predictions[:4]:
        audio, rate = sf.read(row["path"], dtype="float32")
        assert transcribe({"raw": audio, "sampling_rate": rate})["text"] == row["prediction"]
    card = (tmp_path / "model" / "README.md").read_text()
    assert "automatic-speech-recognition" in card and "pipeline(" in card


def test_resume_is_exact(tmp_path: Path, corpus: Path, pretrained: Path) -> None:
    args = _args(tmp_path, corpus, 4, **{"model.init_from": pretrained, "trainer.save_every": 2,
                                         "trainer.keep_last": 3, "trainer.eval_every": 0, "model.dropout": 0.1})
    assert_resume_is_exact(recipe.main, args, tmp_path, 4)


def test_a_tiny_model_learns_to_transcribe_utterances_it_overfits(corpus: Path) -> None:
    """The loss, labels and decoding fit together: four utterances, overfit from scratch, read back
    (measured: CER 1.0 while the model only emits blanks, 0.36 after 75 steps, 0.0 after 100)."""
    from multissl.data.audio_splits import prepare_audio
    from multissl.objectives.ctc import SpeechRecognition, make_processor

    torch.manual_seed(0)
    cfg = SpeechRecognitionDataConfig(manifest=str(corpus), validation_fraction=0.0)
    train, _ = prepare_audio(cfg)
    short = sorted(range(len(train)), key=lambda i: train.data["duration"][i])[:4]
    data = with_text(AudioDataset(train.data.select(short), cfg), cfg, "demo")
    vocab = build_vocab(data.data["text"])
    model, _ = build_ctc_model(CTCModelConfig(dropout=0.0, mask_time_prob=0.0), vocab)
    objective = SpeechRecognition(model, make_processor(vocab, cfg, model.config), data.collator())
    batch = objective.collator()([data[i] for i in range(len(data))], torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    model.train()
    for _ in range(100):
        loss = objective.compute(model, batch)["loss"].value
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = objective.compute(model, batch)
    assert out["cer"].value < 0.3, out["predictions"]
    assert out["loss"].value < 0.5
