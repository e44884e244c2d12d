"""multissl's recipes: one short script per method or task (``python recipes/NAME.py``,
``multissl pretrain NAME``, ``multissl finetune TASK``) and ``configs/<recipe>/<size>.yaml``.

Installed as ``multissl_recipes`` (never a top-level ``recipes``) and found through the entry points
in pyproject.toml; the library never imports this package."""
