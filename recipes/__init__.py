"""Runnable recipes: ``python recipes/NAME.py``, ``multissl pretrain NAME`` or ``multissl finetune TASK``."""

RECIPES = ("mlm", "clm", "wav2vec2", "clip")
#: fine-tuning task -> its recipe module
FINETUNE_TASKS = {
    "text-classification": "finetune_text_classification",
    "speech-recognition": "finetune_speech_recognition",
    "audio-classification": "finetune_audio_classification",
}
