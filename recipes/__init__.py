"""Runnable recipes: ``python recipes/NAME.py`` or ``multissl pretrain NAME``."""

RECIPES = ("mlm", "clm", "wav2vec2", "clip")
