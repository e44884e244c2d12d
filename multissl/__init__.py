"""multissl: self-supervised pretraining recipes for text, audio and image-text."""

__version__ = "0.1.0"
