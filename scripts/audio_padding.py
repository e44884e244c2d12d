"""Padding of duration batches on the embedded speech corpus.

    python scripts/audio_padding.py [max_batch_samples] [pad_multiple_seconds]
"""

from __future__ import annotations

import sys

from multissl.data.audio import AudioDataConfig
from multissl.data.audio_splits import prepare_audio


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    cfg = AudioDataConfig(validation_fraction=0, **({"max_batch_samples": int(args[0])} if args else {}),
                          **({"pad_multiple_seconds": float(args[1])} if len(args) > 1 else {}))
    data, _ = prepare_audio(cfg)
    for mode, shuffle in (("train", True), ("eval", False)):
        sampler = data.make_batch_sampler(batch_size=0, seed=0, shuffle=shuffle, drop_last=shuffle,
                                          rank=0, world_size=1, split_tag=0)
        fractions = []
        for epoch in range(5):
            sampler.set_epoch(epoch)
            fractions.append(sampler.padding_fraction())
        print(f"{len(data)} utterances, budget {cfg.max_batch_samples}, padded to {cfg.pad_multiple_seconds} s, {mode}: {len(sampler)} batches, "
              f"padding {', '.join(f'{f:.1%}' for f in fractions)} (epochs 0-4)")


if __name__ == "__main__":
    main()
