"""Fine-tune an image-SSL output (a timm model, a transformers ViT, or a new tiny ResNet) to classify images.

python recipes/finetune_image_classification.py model.init_from=outputs/simclr-tiny [key=value ...]
    [--config recipes/configs/finetune_image_classification/tiny.yaml]

Full fine-tuning by default (the lift report's too); ``model.freeze_backbone=true`` is linear evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from multissl import config
from multissl.callbacks import recipe_trainer
from multissl.hub import HubConfig
from multissl.objectives.image_classification import (
    ClassifierAugmentConfig,
    ImageClassification,
    ImageClassifierModelConfig,
    LabelledImageDataConfig,
    build_image_classifier,
    label_splits,
    load_image_processor,
)
from multissl.training.config import TrainerConfig
from multissl.training.state import FitResult

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "finetune_image_classification" / "tiny.yaml"


@dataclass
class ImageClassificationConfig:
    model: ImageClassifierModelConfig = field(default_factory=ImageClassifierModelConfig)
    data: LabelledImageDataConfig = field(default_factory=LabelledImageDataConfig)
    """Default: the embedded digits (MNIST, 10 classes), eval = the images image pretraining held out."""
    augment: ClassifierAugmentConfig = field(default_factory=ClassifierAugmentConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(
        output_dir="outputs/image-classification", lr=1e-3, weight_decay=0.05, warmup_ratio=0.05, epochs=10,
        batch_size=64))
    hub: HubConfig = field(default_factory=HubConfig)


def main(argv: list[str] | None = None) -> FitResult:
    cfg = config.load(ImageClassificationConfig, argv, DEFAULT_CONFIG)
    trainer = recipe_trainer(cfg)
    with trainer.main_process_first():
        train, held_out, labels = label_splits(cfg.data)
    trainer.print(f"{train.source}: {len(train)} training and {len(held_out)} eval images, "
                  f"{labels.num_labels} labels ({', '.join(labels.names[:12])}{' ...' if labels.num_labels > 12 else ''})")
    net, base = build_image_classifier(cfg.model, labels)
    objective = ImageClassification(net, labels, cfg.augment, cfg.model.freeze_backbone, base,
                                    cfg.data.on_bad_image, cfg.data.max_image_pixels, load_image_processor(cfg.model),
                                    cfg.model.layer_decay)
    return trainer.fit(objective, train, held_out)


if __name__ == "__main__":
    from multissl.cli import run_recipe

    run_recipe(main)
