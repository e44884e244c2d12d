"""wav2vec 2.0 pieces: span masks, distractors, the objective on synthetic audio."""

from __future__ import annotations

import pytest
import torch

from multissl.objectives.wav2vec2 import (
    Wav2Vec2LossConfig,
    Wav2Vec2ModelConfig,
    Wav2Vec2Pretraining,
    conv_output_lengths,
    sample_negatives,
    span_masks,
)


def test_conv_output_lengths_match_transformers() -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    model = Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, conv_dim=(8,) * 7))
    lengths = torch.tensor([400, 16000, 16001, 80000, 12345])
    cfg = model.config
    ours = conv_output_lengths(lengths, tuple(cfg.conv_kernel), tuple(cfg.conv_stride))
    assert ours.tolist() == model._get_feat_extract_output_lengths(lengths).tolist()


@pytest.mark.parametrize(("prob", "span"), [(0.65, 10), (0.3, 5), (0.05, 10)])
def test_span_masks_statistics(prob: float, span: int) -> None:
    lengths = torch.randint(150, 400, (64,), generator=torch.Generator().manual_seed(0))
    mask = span_masks(lengths, 400, prob, span, torch.Generator().manual_seed(1))
    pos = torch.arange(400)
    assert not mask[pos[None, :] >= lengths[:, None]].any(), "never masks padding"
    assert (mask.sum(1) >= min(2 * span, 150)).all() or prob < 0.1
    # runs are made of whole spans: every run is at least `span` long (spans can merge)
    for row, n in zip(mask, lengths):
        edges = torch.diff(torch.cat([torch.tensor([0]), row[:n].int(), torch.tensor([0])]))
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        assert ((ends - starts) >= min(span, int(n))).all()
    # expected coverage with independent overlapping spans: 1 - (1 - prob/span)^span
    covered = (mask.sum() / lengths.sum()).item()
    expected = 1 - (1 - prob / span) ** span
    assert covered == pytest.approx(expected, abs=0.06)


def test_negatives_are_other_masked_frames_of_the_same_utterance() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([50, 80, 30])
    mask = span_masks(lengths, 80, 0.65, 10, g)
    neg = sample_negatives(mask, 20, g)
    batch, frames = mask.shape
    for b in range(batch):
        for t in mask[b].nonzero().flatten().tolist():
            idx = neg[b, t]
            assert ((idx // frames) == b).all(), "same utterance"
            local = idx % frames
            assert mask[b, local].all(), "masked (so never padding)"
            assert (local != t).all(), "never the positive"
    # roughly uniform over the other masked frames
    b, t = 1, mask[1].nonzero().flatten()[0].item()
    many = sample_negatives(mask, 4000, torch.Generator().manual_seed(3))[b, t] % frames
    counts = torch.bincount(many, minlength=frames)[mask[b]]
    others = counts[counts > 0]
    assert len(others) == mask[b].sum() - 1 and others.float().std() / others.float().mean() < 0.25


def _objective(**loss_kw: object) -> Wav2Vec2Pretraining:
    def audio_collate(samples, generator):
        lengths = torch.tensor([len(s["audio"]) for s in samples])
        values = torch.zeros(len(samples), int(lengths.max()))
        mask = torch.zeros_like(values, dtype=torch.long)
        for i, s in enumerate(samples):
            values[i, : len(s["audio"])] = s["audio"]
            mask[i, : len(s["audio"])] = 1
        return {"input_values": values, "attention_mask": mask, "lengths": lengths}

    torch.manual_seed(0)
    return Wav2Vec2Pretraining(Wav2Vec2ModelConfig(size="tiny"), Wav2Vec2LossConfig(num_negatives=10, **loss_kw),
                               audio_collate)


def test_objective_step_and_metrics() -> None:
    obj = _objective()
    g = torch.Generator().manual_seed(0)
    samples = [{"audio": torch.randn(n, generator=g)} for n in (16000, 24000, 12000)]
    batch = obj.collator()(samples, torch.Generator().manual_seed(1))
    out = obj.compute(obj.model, batch)
    loss = out["loss"].value
    loss.backward()
    assert torch.isfinite(loss)
    assert 0.3 < out["masked_fraction"].value < 0.75
    assert 0 <= out["contrastive_accuracy"].value <= 1
    # contrastive loss per frame starts near ln(K+1) for random features
    assert out["contrastive_loss"].value.item() == pytest.approx(torch.log(torch.tensor(11.0)).item(), rel=0.35)
    assert obj.model.wav2vec2.feature_extractor.conv_layers[0].conv.weight.grad is not None


def _encoder_grad(obj: Wav2Vec2Pretraining, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    obj.model.zero_grad()
    torch.manual_seed(5)  # the same Gumbel noise for every call
    out = obj.compute(obj.model, batch)
    out["loss"].value.backward()
    return obj.model.wav2vec2.feature_extractor.conv_layers[0].conv.weight.grad.clone(), float(out["loss"].value.detach())


@pytest.mark.parametrize(("norm", "penalty", "scale"), [("layer", 0.0, 1.0), ("group", 10.0, 0.1)])
def test_feature_penalty_and_gradient_scale_follow_the_encoder(norm: str, penalty: float, scale: float) -> None:
    """fairseq's pairings: BASE (group norm) 10 and 0.1, LARGE (layer norm) 0 and 1.0; the penalty is
    taken after the gradient scale, so the whole encoder gradient scales."""
    size = "base" if norm == "group" else "tiny"
    model_cfg = Wav2Vec2ModelConfig(size=size, hidden_size=64, num_layers=1, conv_dim=32, num_codevectors_per_group=8)
    torch.manual_seed(0)
    obj = Wav2Vec2Pretraining(model_cfg, Wav2Vec2LossConfig(num_negatives=5), _objective().audio_collate)
    assert obj.model.config.feat_extract_norm == norm and obj.model.config.do_stable_layer_norm == (norm == "layer")
    assert (obj.feature_penalty_weight, obj.feature_grad_scale) == (penalty, scale)
    batch = obj.collator()([{"audio": torch.randn(16000)}, {"audio": torch.randn(12000)}], torch.Generator().manual_seed(1))
    scaled, loss = _encoder_grad(obj, batch)
    obj.feature_grad_scale = 1.0
    unscaled, same_loss = _encoder_grad(obj, batch)
    assert loss == pytest.approx(same_loss)
    torch.testing.assert_close(scaled, scale * unscaled, rtol=1e-4, atol=1e-9)


def test_gumbel_temperature_anneals_and_is_checkpointed() -> None:
    obj = _objective(gumbel_decay=0.99)
    assert obj.on_step_end(10)["gumbel_temperature"] == pytest.approx(2.0 * 0.99**10)
    assert obj.on_step_end(10_000)["gumbel_temperature"] == 0.5
    state = obj.state_dict()
    other = _objective()
    other.load_state_dict(state)
    assert other.temperature == 0.5 and other.model.quantizer.temperature == 0.5


def test_collapse_guard_warns_then_stops() -> None:
    obj = _objective(collapse_patience=2)
    collapsed = {"codevector_perplexity": 2.0, "contrastive_accuracy": 0.5}
    assert obj.on_log(collapsed, step=5, warmup_steps=10) is None, "quiet during warm-up"
    assert obj.on_log(collapsed, step=20, warmup_steps=10) is None
    assert "codevector perplexity 2.0" in obj.on_log(collapsed, step=30, warmup_steps=10)
    assert obj.on_log(collapsed, step=40, warmup_steps=10) is None, "once per patience window, not every log"
    healthy = {"codevector_perplexity": 80.0, "contrastive_accuracy": 0.5}
    assert obj.on_log(healthy, step=50, warmup_steps=10) is None
    from multissl.errors import TrainingError

    stopper = _objective(collapse_patience=1, stop_on_collapse=True)
    with pytest.raises(TrainingError, match="contrastive accuracy"):
        stopper.on_log({"codevector_perplexity": 80.0, "contrastive_accuracy": 0.09}, step=20, warmup_steps=0)


def test_finetuning_mask_prob_warns() -> None:
    with pytest.warns(UserWarning, match="fine-tuning value"):
        Wav2Vec2LossConfig(mask_prob=0.05)


def test_saved_model_loads_with_finetuning_masking(tmp_path) -> None:
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Model

    obj = _objective()
    obj.save_pretrained(obj.model, tmp_path)
    assert obj.model.config.mask_time_prob == 0.65, "the live config keeps the pretraining value"
    model = Wav2Vec2Model.from_pretrained(tmp_path)
    assert model.config.mask_time_prob == 0.05
    Wav2Vec2ForCTC.from_pretrained(tmp_path, vocab_size=30)
    x = torch.randn(1, 16000)
    obj.model.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, obj.model.wav2vec2(x).last_hidden_state)
