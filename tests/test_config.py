"""Config loading: defaults <- file <- overrides, type checks, and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from multissl_recipes.barlow_twins import BarlowTwinsConfig
from multissl_recipes.byol import BYOLConfig
from multissl_recipes.clip import ClipConfig
from multissl_recipes.clm import CLMConfig
from multissl_recipes.dino import DINOConfig
from multissl_recipes.finetune_audio_classification import AudioClassificationConfig
from multissl_recipes.finetune_image_classification import ImageClassificationConfig
from multissl_recipes.finetune_speech_recognition import SpeechRecognitionConfig
from multissl_recipes.finetune_text_classification import TextClassificationConfig
from multissl_recipes.mae import MAEConfig
from multissl_recipes.mlm import MLMConfig
from multissl_recipes.moco import MoCoConfig
from multissl_recipes.rotation import RotationConfig
from multissl_recipes.simclr import SimCLRConfig
from multissl_recipes.simsiam import SimSiamConfig
from multissl_recipes.vicreg import VICRegConfig
from multissl_recipes.wav2vec2 import Wav2Vec2Config

from multissl import config
from multissl.errors import ConfigError
from multissl.registry import available

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = {"mlm": MLMConfig, "clm": CLMConfig, "wav2vec2": Wav2Vec2Config, "clip": ClipConfig, "simclr": SimCLRConfig,
           "moco": MoCoConfig, "byol": BYOLConfig, "simsiam": SimSiamConfig, "barlow_twins": BarlowTwinsConfig,
           "vicreg": VICRegConfig, "dino": DINOConfig, "mae": MAEConfig, "rotation": RotationConfig,
           "finetune_text_classification": TextClassificationConfig,
           "finetune_speech_recognition": SpeechRecognitionConfig,
           "finetune_audio_classification": AudioClassificationConfig,
           "finetune_image_classification": ImageClassificationConfig}
ALL_RECIPES = tuple(r.entry_point.value.rsplit(".", 1)[1] for kind in ("pretrain", "finetune")
                    for r in available(kind).values() if r.source == "multissl")


def shipped_configs() -> list[tuple[str, Path]]:
    return [(name, p) for name in ALL_RECIPES for p in sorted((ROOT / "recipes" / "configs" / name).glob("*.yaml"))]


def test_every_recipe_ships_configs() -> None:
    assert {name for name, _ in shipped_configs()} == set(ALL_RECIPES) == set(SCHEMAS)


@pytest.mark.parametrize(("recipe", "path"), shipped_configs(), ids=lambda x: getattr(x, "name", x))
def test_shipped_config_loads(recipe: str, path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("multissl" in first or "recipes/" in first), "first line says how to run it"
    cfg = config.build(SCHEMAS[recipe], path)
    raw = yaml.safe_load(path.read_text())
    # The file lists only what differs from the defaults and every listed value is applied.
    def check(listed: dict, resolved: dict, where: str) -> None:
        for key, value in listed.items():
            got = resolved[key]
            if isinstance(value, dict) and isinstance(got, dict):  # a nested section: what it lists is applied
                check(value, got, f"{where}{key}.")
            else:
                assert got == (list(value) if isinstance(value, tuple) else value), f"{where}{key}"

    check(raw, config.to_dict(cfg), "")


def test_overrides_are_typed() -> None:
    cfg = config.build(MLMConfig, None, [
        "trainer.lr=3e-4", "trainer.max_steps=7", "data.files=[a.txt, b.txt]", "trainer.adam_betas=[0.9, 0.98]",
        "masking.whole_word=true", "model.arch=roberta", "data.max_seq_len=256",
    ])
    assert cfg.trainer.lr == pytest.approx(3e-4) and isinstance(cfg.trainer.lr, float)
    assert cfg.trainer.max_steps == 7 and cfg.data.files == ["a.txt", "b.txt"]
    assert cfg.trainer.adam_betas == (0.9, 0.98) and cfg.masking.whole_word is True
    assert cfg.model.arch == "roberta" and cfg.data.max_seq_len == 256


def test_a_choice_spelled_like_a_yaml_boolean_is_the_choice(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare ``no`` as false: ``trainer.mixed_precision=no`` (the documented default)
    must still mean ``"no"``, on the command line and in a config file; a bool stays an error where no
    choice is spelled that way."""
    assert config.build(MLMConfig, None, ["trainer.mixed_precision=no"]).trainer.mixed_precision == "no"
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  mixed_precision: no\n")
    assert config.build(MLMConfig, f, []).trainer.mixed_precision == "no"
    with pytest.raises(ConfigError, match=re.escape("trainer.mixed_precision: expected one of 'no' | 'bf16' | 'fp16', got True")):
        config.build(MLMConfig, None, ["trainer.mixed_precision=yes"])
    with pytest.raises(ConfigError, match="model.arch: expected one of"):
        config.build(MLMConfig, None, ["model.arch=off"])


def test_override_beats_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  lr: 0.1\n  max_steps: 3\n")
    cfg = config.build(MLMConfig, f, ["trainer.lr=0.2"])
    assert cfg.trainer.lr == 0.2 and cfg.trainer.max_steps == 3


@pytest.mark.parametrize(("override", "needle"), [
    ("trainer.lrr=1", "'trainer.lrr'"),
    ("trainer.lrr=1", "did you mean 'lr'"),
    ("traner.lr=1", "did you mean 'trainer'"),
    ("trainer.max_steps=ten", "trainer.max_steps: expected an integer, got 'ten'"),
    ("trainer.max_steps=1.5", "trainer.max_steps: expected an integer"),
    ("masking.whole_word=maybe", "masking.whole_word: expected true or false"),
    ("model.arch=bart", "did you mean 'bert'"),
    ("trainer.adam_betas=[0.9]", "expected 2 values"),
    ("trainer.lr.x=1", "has no key 'x'"),
    ("trainer.batch_size=0", "trainer.batch_size must be >= 1"),
    ("nonsense", "expected key=value"),
])
def test_bad_overrides_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.build(MLMConfig, None, [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  warmup_step: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.warmup_step'.*warmup_steps"):
        config.build(MLMConfig, f)


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(MLMConfig, ["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*not valid YAML"):
        config.build(MLMConfig, bad)
    with pytest.raises(ConfigError, match="unknown option '--lr'"):
        config.load(MLMConfig, ["--lr", "3"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = config.build(CLMConfig, None, ["trainer.lr=0.01", "sampling.prompts=[Hi]"])
    config.save(cfg, tmp_path / "config.yaml")
    again = config.build(CLMConfig, tmp_path / "config.yaml")
    assert again == cfg


def test_a_file_section_keeps_the_recipes_own_defaults(tmp_path: Path) -> None:
    """A recipe sets its own defaults for a shared section (wav2vec2: AdamW betas (0.9, 0.98), eps 1e-6,
    linear schedule); a file that sets other keys of that section must not reset them."""
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lr: 3.0e-3\n")
    cfg = config.build(Wav2Vec2Config, path, ["trainer.max_steps=7"])
    plain = Wav2Vec2Config().trainer
    assert (cfg.trainer.lr, cfg.trainer.max_steps) == (3e-3, 7)
    assert (cfg.trainer.adam_betas, cfg.trainer.adam_eps, cfg.trainer.lr_schedule, cfg.trainer.max_grad_norm) == (
        plain.adam_betas, plain.adam_eps, plain.lr_schedule, plain.max_grad_norm) == ((0.9, 0.98), 1e-6, "linear", 10.0)
    assert cfg.trainer.output_dir == plain.output_dir == "outputs/wav2vec2"
    clm = config.build(CLMConfig, None, ["model.size=small"])
    assert clm.model.arch == "gpt2", "the CLM recipe's model default survives a model.* override"


def test_hub_section_sits_beside_trainer(tmp_path: Path) -> None:
    """``hub.*`` on the command line or in a file; the recipe's own trainer defaults survive."""
    from multissl.hub import HubConfig

    cfg = config.build(Wav2Vec2Config, None, ["hub.push=true", "hub.repo_id=me/w2v",
                                              "hub.private=true", "hub.revision=exp"])
    assert cfg.hub == HubConfig(push=True, repo_id="me/w2v", private=True, revision="exp")
    assert cfg.trainer.adam_betas == (0.9, 0.98) and cfg.trainer.output_dir == "outputs/wav2vec2"
    for schema in SCHEMAS.values():
        assert config.build(schema).hub == HubConfig(), "off by default in every recipe"
    path = tmp_path / "c.yaml"
    path.write_text("hub:\n  push: true\n  repo_id: me/clip\n")
    cfg = config.build(ClipConfig, path, ["hub.commit_message=first"])
    assert (cfg.hub.repo_id, cfg.hub.commit_message, cfg.trainer.batch_size) == ("me/clip", "first", 256)
    config.save(cfg, tmp_path / "resolved.yaml")
    assert config.build(ClipConfig, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(("overrides", "needle"), [
    (["hub.push=true"], "hub.repo_id is required with hub.push=true"),
    (["hub.push=yes please"], "hub.push: expected true or false"),
    (["hub.repo=me/x"], "unknown config key 'hub.repo'; did you mean 'repo_id'?"),
    (["hub.repo_id=a/b/c"], "hub.repo_id: expected NAME or NAMESPACE/NAME"),
])
def test_bad_hub_settings_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.build(MLMConfig, None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_moved_sections_name_their_new_place(tmp_path: Path) -> None:
    """``trainer.hub``/``trainer.probe`` became top-level ``hub``/``probe``: the error says where to."""
    with pytest.raises(ConfigError, match=r"^config key 'trainer.hub.push' moved to 'hub.push'$"):
        config.build(MLMConfig, None, ["trainer.hub.push=true"])
    path = tmp_path / "old.yaml"
    path.write_text("trainer:\n  probe:\n    task: text-topics\n")
    with pytest.raises(ConfigError, match=r"config key 'trainer.probe' in .*old.yaml moved to 'probe'"):
        config.build(MLMConfig, path)


def test_a_shipped_config_is_found_by_name(tmp_path: Path) -> None:
    from multissl_recipes import mlm

    by_name = config.load(MLMConfig, ["--config", "small", "trainer.max_steps=3"], mlm.DEFAULT_CONFIG)
    by_path = config.load(MLMConfig, ["--config", str(ROOT / "recipes/configs/mlm/small.yaml"), "trainer.max_steps=3"])
    assert by_name == by_path and by_name.model.size == "small"
    with pytest.raises(ConfigError, match=r"config file not found: smal \(shipped configs: base, roberta_tiny, small, tiny\)"):
        config.load(MLMConfig, ["--config", "smal"], mlm.DEFAULT_CONFIG)


def test_an_override_of_a_mapping_replaces_it_and_a_section_merges() -> None:
    from multissl_recipes.simclr import DEFAULT_CONFIG

    cfg = config.build(SimCLRConfig, DEFAULT_CONFIG, ["model.backbone.kwargs={img_size: 32}"])
    assert cfg.model.backbone.kwargs == {"img_size": 32}, "the file's layers/channels are dropped"
    cfg = config.build(SimCLRConfig, DEFAULT_CONFIG, ["model.projector={out: 16}"])
    assert cfg.model.projector.out == 16 and cfg.model.projector.hidden == [256], "a section keeps the file's other keys"
