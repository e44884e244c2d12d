"""Fine-tune a pretrained text model (MLM or CLM output, or any transformers folder) to classify texts.

python recipes/finetune_text_classification.py [--config recipes/configs/finetune_text_classification/tiny.yaml]
    model.init_from=outputs/mlm [key=value ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multissl import config
from multissl.callbacks import recipe_trainer
from multissl.data.text_classification import TextClassificationDataConfig, load_labelled_text, tokenize_rows
from multissl.errors import DataError, first_line
from multissl.hub import HubConfig
from multissl.objectives.classification import TextClassification
from multissl.objectives.finetune import load_for_finetuning
from multissl.objectives.language_model import TextModelConfig, transformers_config
from multissl.probe import ProbeConfig
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "finetune_text_classification" / "tiny.yaml"
TEXT_MODEL_TYPES = ("bert", "roberta", "gpt2", "llama")
DECODER_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "gpt_neox", "opt")
"""Their *ForSequenceClassification classifies from the last non-padding token's state."""
DROPOUT_KEYS = {"bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
                "roberta": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
                "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"), "llama": ("attention_dropout",)}


@dataclass
class ClassifierModelConfig(TextModelConfig):
    """``init_from`` a pretrained output (a run folder, model folder or Hub id); empty = a new model of
    ``arch``/``size`` with a tokenizer trained on the task's texts."""

    random_init: bool = False
    """Keep init_from's architecture and tokenizer but start from random weights (the lift baseline)."""


@dataclass
class TextClassificationConfig:
    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    data: TextClassificationDataConfig = field(default_factory=TextClassificationDataConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/text-classification", lr=5e-5, warmup_ratio=0.1, lr_schedule="linear", epochs=3))
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    hub: HubConfig = field(default_factory=HubConfig)


def tokenizer_for(cfg: TextClassificationConfig, texts: list[str]) -> Any:
    """The pretrained model's tokenizer, or (from scratch) one trained on the task's texts, saved once
    in output_dir/tokenizer so a resumed run reuses it."""
    from transformers import AutoTokenizer

    from multissl.data.text import train_tokenizer
    from multissl.objectives.finetune import resolve_model_dir

    if cfg.model.init_from:
        where = resolve_model_dir(cfg.model.init_from)
        try:
            tok = AutoTokenizer.from_pretrained(where)
        except Exception as err:
            raise DataError(f"model.init_from={cfg.model.init_from!r}: cannot load its tokenizer ({first_line(err)})") from None
    else:
        saved = Path(cfg.trainer.output_dir) / "tokenizer"
        if (saved / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(saved)
        else:
            kind = "mlm" if cfg.model.arch in ("bert", "roberta") else "clm"
            algorithm = "wordpiece" if cfg.model.arch == "bert" else "bytelevel"
            tok = train_tokenizer(iter(texts), kind, cfg.data.vocab_size, cfg.data.max_seq_len, False, algorithm)
            tok.save_pretrained(saved)
    if tok.pad_token is None:  # GPT-2 style tokenizers: pad with end-of-text, masked out anyway
        tok.pad_token = tok.eos_token
    if cfg.data.end_with_eos and model_type(cfg) in DECODER_MODEL_TYPES:
        end_with_eos(tok)
    return tok


def model_type(cfg: TextClassificationConfig) -> str:
    if not cfg.model.init_from:
        return cfg.model.arch
    from transformers import AutoConfig

    from multissl.objectives.finetune import resolve_model_dir

    try:
        return AutoConfig.from_pretrained(resolve_model_dir(cfg.model.init_from)).model_type
    except Exception as err:
        raise DataError(f"model.init_from={cfg.model.init_from!r}: cannot read its config ({first_line(err)})") from None


def end_with_eos(tok: Any) -> None:
    """Make the tokenizer itself append end-of-text (pipeline() then encodes as training did). Not when
    it pads with end-of-text: the classifier would skip it as padding."""
    if tok.eos_token_id is None or tok.pad_token_id == tok.eos_token_id:
        return
    tok.add_eos_token = True  # transformers' tokenizers backend rebuilds its post-processor
    if tok("a")["input_ids"][-1] != tok.eos_token_id:
        print(f"warning: {type(tok).__name__} does not append {tok.eos_token!r} itself; the classifier reads "
              "the texts' last tokens as they are (data.end_with_eos=false silences this)")


def build_classifier(cfg: TextClassificationConfig, tokenizer: Any, labels: Any) -> tuple[Any, str]:
    from transformers import AutoModelForSequenceClassification

    label_kwargs = {"id2label": labels.id2label, "label2id": labels.label2id, "pad_token_id": tokenizer.pad_token_id}
    if cfg.model.init_from:
        dropout = dict.fromkeys(DROPOUT_KEYS.get(model_type(cfg), ()), cfg.model.dropout)
        return load_for_finetuning(AutoModelForSequenceClassification, cfg.model.init_from, cfg.model.random_init,
                                   TEXT_MODEL_TYPES, **label_kwargs, **dropout)
    model_config = transformers_config(cfg.model, tokenizer, cfg.data.max_seq_len)
    for key, value in label_kwargs.items():
        setattr(model_config, key, value)
    model = AutoModelForSequenceClassification.from_config(model_config, attn_implementation=cfg.model.attn_implementation)
    return model, ""


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(TextClassificationConfig, argv, DEFAULT_CONFIG)
    trainer = recipe_trainer(cfg)
    with trainer.main_process_first():
        data = load_labelled_text(cfg.data)
        tokenizer = tokenizer_for(cfg, [r["text"] for r in data.train])
        train, held_out = (tokenize_rows(rows, tokenizer, cfg.data.max_seq_len) for rows in (data.train, data.eval))
    trainer.print(f"{data.source}: {len(train)} training and {len(held_out)} eval texts, "
                  f"{data.labels.num_labels} labels ({', '.join(data.labels.names)})")
    model, source = build_classifier(cfg, tokenizer, data.labels)
    base = "" if cfg.model.random_init else source
    return trainer.fit(TextClassification(model, tokenizer, data.labels, base), train, held_out)


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
