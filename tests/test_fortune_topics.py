"""scripts/fortune_topics.py: fortune files -> one (text, label) row per entry, topics kept apart."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import fortune_topics  # noqa: E402


def test_entries_split_on_percent_lines_and_shared_texts_are_dropped(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "food").write_text("Eat   your\nvegetables.\n%\nPie is good.\n%\nIn both files.\n%\n%\n")
    (tmp_path / "law").write_text("A contract binds.\n%\nIn both files.\n%\nCourts decide.\n%\nJuries too.\n")
    monkeypatch.setattr(fortune_topics, "datfiles", lambda: tmp_path)
    assert fortune_topics.entries(tmp_path / "food") == ["Eat your vegetables.", "Pie is good.", "In both files."]
    rows = fortune_topics.topic_rows(per_class=2, topics=("food", "law"))
    assert rows == [{"text": "Eat your vegetables.", "label": "food"}, {"text": "Pie is good.", "label": "food"},
                    {"text": "A contract binds.", "label": "law"}, {"text": "Courts decide.", "label": "law"}]
