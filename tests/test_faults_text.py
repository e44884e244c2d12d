"""Bad text input, kind by kind: each one loads, is converted, is a counted skip or is a one-line error,
and the totals are exact. Also parse errors of JSONL/JSON/CSV tables (text corpora, labelled text,
image-folder metadata, local dataset folders) that must keep the file, line and reason."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest
from PIL import Image

from multissl.data.files import read_files
from multissl.data.sources import open_dataset
from multissl.data.text import TextDataConfig, load_raw, prepare_text
from multissl.data.text_checks import SKIP_LIST, TextReport, check_text_file
from multissl.data.text_classification import TextClassificationDataConfig, load_labelled_text
from multissl.errors import DataError

GOOD = [f"Paragraph {i} of a good file talks about topic {i % 5} with plain words." for i in range(30)]
UTF16_DOC = "Ein UTF-16 Absatz mit Umlauten: \u00e4\u00f6\u00fc \u00df und \u20ac."
NUL_DOC = "a paragraph\x00 with two NUL bytes\x00 and a bell\x07 in it"

# kind -> (file name, bytes, outcome with the default data.on_bad_text=skip, reason in the skip list)
BAD_KINDS: dict[str, tuple[str, bytes, str, str]] = {
    "latin1": ("latin1.txt", "ok line\n\ncaf\u00e9 au lait\n".encode("latin-1"), "skip",
               "not valid UTF-8 (first bad byte at offset 12; Latin-1"),
    "utf16": ("utf16.txt", (UTF16_DOC + "\n").encode("utf-16"), "convert", ""),
    "binary": ("binary.txt", b"\x89PNG\r\n\x1a\n" + bytes(300) + bytes(range(256)), "skip", "binary (NUL-heavy: "),
    "blank": ("blank.txt", b"  \n\n\t \r\n   \n", "skip", "whitespace-only"),
    "nul": ("nul.txt", NUL_DOC.encode("utf-8") + b"\n", "strip", ""),
    "empty": ("empty.txt", b"", "skip", "empty (0 bytes)"),
    "utf8_bom": ("bom.txt", codecs.BOM_UTF8 + b"A UTF-8 paragraph behind a byte-order mark.\n", "bom", ""),
}


def _good_files(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        (folder / f"good{k}.txt").write_text("\n\n".join(f"{d} (file {k})" for d in GOOD) + "\n", encoding="utf-8")


def _docs(ds) -> list[str]:
    return [] if ds is None else [t.strip() for t in ds["text"]]


# ------------------------------------------------------------------------------- one kind at a time
@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_each_bad_kind_among_good_files(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    name, data, outcome, reason = BAD_KINDS[kind]
    _good_files(tmp_path / "c")
    (tmp_path / "c" / name).write_bytes(data)
    report = TextReport()
    train, held, _ = load_raw(TextDataConfig(files=[str(tmp_path / "c")], validation_fraction=0.0), 0, report)
    docs = _docs(train)
    assert held is None and report.files == 4
    if outcome == "skip":
        assert report.skipped == [(tmp_path / "c" / name, report.skipped[0][1])] and reason in report.skipped[0][1]
        assert len(docs) == 3 * len(GOOD), "nothing of the bad file is read"
        assert f"skipping {tmp_path / 'c' / name}: {reason}" in capsys.readouterr().out
    else:
        assert report.skipped == []
    if outcome == "convert":
        assert UTF16_DOC in docs and report.decoded == [(tmp_path / "c" / name, "utf-16")]
    if outcome == "bom":
        assert "A UTF-8 paragraph behind a byte-order mark." in docs and report.decoded == []
    if outcome == "strip":
        assert NUL_DOC.replace("\x00", "").replace("\x07", "") in docs
        assert report.stripped_files == {tmp_path / "c" / name: 3}
    assert not any(c in d for d in docs for c in "\x00\x07\ufeff"), "no control character (nor BOM) reaches the tokenizer"

    failing = outcome == "skip"
    if failing:
        with pytest.raises(DataError) as err:
            load_raw(TextDataConfig(files=[str(tmp_path / "c")], on_bad_text="error"), 0)
        msg = str(err.value)
        assert msg.startswith(f"{tmp_path / 'c' / name}: unusable text file: {reason}") and "\n" not in msg
        assert "data.on_bad_text=error" in msg
    else:  # converting and stripping are not failures: the strict mode loads the same documents
        again, _, _ = load_raw(TextDataConfig(files=[str(tmp_path / "c")], on_bad_text="error", validation_fraction=0.0), 0)
        assert sorted(_docs(again)) == sorted(docs)


def test_check_text_file_counts_do_not_depend_on_block_size(tmp_path: Path) -> None:
    """Control characters are counted on the bytes: a C1 control (two UTF-8 bytes) or a multi-byte
    character cut by a block boundary still counts once, and the verdict is the same."""
    text = ("na\u00efve caf\u00e9 \u0085 next\x00 \u20ac\u0090 " * 40) + "end\n"
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    want = sum(text.count(c) for c in "\x00\u0085\u0090")
    for chunk in (1, 2, 3, 7, 64, 1 << 20):
        check = check_text_file(path, chunk=chunk)
        assert (check.controls, check.problem, check.encoding) == (want, "", "utf-8"), chunk
    (tmp_path / "late.txt").write_bytes(b"fine text " * 50 + b"caf\xe9\n")  # the bad byte is past the first block
    assert check_text_file(tmp_path / "late.txt", chunk=64).problem.startswith("not valid UTF-8 (first bad byte at offset 503;")
    (tmp_path / "bad16.txt").write_bytes("ok".encode("utf-16") + b"\x00\xd8")  # a lone surrogate
    for chunk in (1, 1 << 20):  # the byte-order mark is seen whatever the block size
        assert check_text_file(tmp_path / "bad16.txt", chunk=chunk).problem.startswith(
            "not valid UTF-16 (first bad byte at offset 6"), chunk
    (tmp_path / "u16.txt").write_bytes("\u00e9t\u00e9\x00\n".encode("utf-16"))
    assert (check_text_file(tmp_path / "u16.txt", chunk=1).encoding, check_text_file(tmp_path / "u16.txt").controls) == ("utf-16", 1)


# ------------------------------------------------------------------------------- all kinds together
def _messy_folder(root: Path) -> Path:
    _good_files(root)
    for name, data, _, _ in BAD_KINDS.values():
        (root / name).write_bytes(data)
    return root


def test_mixed_folder_prepares_with_exact_totals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, out = _messy_folder(tmp_path / "c"), tmp_path / "run"
    cfg = TextDataConfig(files=[str(folder)], vocab_size=300, max_seq_len=32, validation_fraction=0.1)
    data = prepare_text(cfg, "mlm", out, seed=0)
    assert len(data.train) > 0 and data.eval is not None and len(data.eval) > 0 and data.skipped_files == 4
    listed = (out / "data" / SKIP_LIST).read_text(encoding="utf-8").splitlines()
    skipped = {Path(line.split("\t")[0]).name: line.split("\t")[1] for line in listed}
    want = {name: reason for name, _, outcome, reason in BAD_KINDS.values() if outcome == "skip"}
    assert len(listed) == 4 and set(skipped) == set(want)
    assert all(skipped[name].startswith(reason) for name, reason in want.items())
    printed = capsys.readouterr().out
    assert ("warning: text data: skipped 4 of 10 text file(s) as unusable (1 binary, 1 empty, 1 not valid UTF-8, "
            f"1 whitespace-only); all listed in {out / 'data' / SKIP_LIST}") in printed
    assert f"warning: text data: stripped 3 control character(s) (NUL and other C0/C1 controls) from 1 file(s) ({folder / 'nul.txt'}: 3)" in printed
    assert f"decoded 1 file(s) by their byte-order mark: {folder / 'utf16.txt'} (UTF-16)" in printed
    assert printed.count("control character(s)") == 1, "the strip count is reported once"

    # the documents that reached the tokenizer: all good ones, the UTF-16 one, the NUL one stripped
    report = TextReport()
    train, held, _ = load_raw(cfg, 0, report)
    docs = _docs(train) + _docs(held)
    assert len(docs) == 3 * len(GOOD) + 3 and UTF16_DOC in docs and not any("\x00" in d for d in docs)
    assert [(f.name, why) for f, why in report.skipped] == [(Path(line.split("\t")[0]).name, line.split("\t")[1]) for line in listed]

    for name, _, outcome, _ in BAD_KINDS.values():  # fixed corpus, same run folder: the stale list goes
        if outcome == "skip":
            (folder / name).unlink()
    prepare_text(cfg, "mlm", out, seed=0)
    assert not (out / "data" / SKIP_LIST).exists()


def test_streaming_skips_the_same_files(tmp_path: Path) -> None:
    folder = _messy_folder(tmp_path / "c")
    report = TextReport()
    train, held, _ = load_raw(TextDataConfig(files=[str(folder)], streaming=True, validation_fraction=0.0), 0, report)
    docs = [row["text"].strip() for row in train]
    assert held is None and len(report.skipped) == 4 and len(docs) == 3 * len(GOOD) + 3
    assert UTF16_DOC in docs and not any("\x00" in d or "\x07" in d for d in docs)


def test_all_files_unusable_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    for kind in ("latin1", "blank", "empty"):
        name, data, _, _ = BAD_KINDS[kind]
        (tmp_path / "c" / name).write_bytes(data)
    with pytest.raises(DataError) as err:
        load_raw(TextDataConfig(files=[str(tmp_path / "c")]), 0)
    msg = str(err.value)
    assert msg.startswith("data.files: the corpus is empty: all 3 text file(s) are unusable: ") and "\n" not in msg
    assert all(name in msg for name in ("blank.txt", "empty.txt", "latin1.txt"))


def test_jsonl_corpus_controls_are_stripped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"body": d} for d in GOOD] + [{"body": "nul\x00 here\x00"}, {"body": "\x00\x00"}, {"body": "esc\x1b[0m"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    train, _, _ = load_raw(TextDataConfig(files=[str(tmp_path / "c.jsonl")], text_column="body", validation_fraction=0.0), 0)
    docs = _docs(train)
    assert len(docs) == len(GOOD) + 2, "the NUL-only document is dropped as empty"
    assert "nul here" in docs and "esc[0m" in docs
    assert f"stripped 5 control character(s) (NUL and other C0/C1 controls) from 3 document(s) of {tmp_path / 'c.jsonl'}" in capsys.readouterr().out


def test_the_embedded_corpus_is_counted_not_rewritten(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clean corpus costs one Arrow count, not a pass of Python over every document."""
    import datasets

    from multissl.data import text, text_checks

    mapped = []
    real_map = datasets.Dataset.map

    def spy(self, *args, **kwargs):
        mapped.append(args[0] if args else kwargs.get("function"))
        return real_map(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    report = TextReport()
    train, held, _ = load_raw(TextDataConfig(), 0, report)
    assert report.stripped_docs == {} and report.summary() == [] and len(train) > 1500 and len(held) > 50
    assert text_checks.strip_text_batch not in mapped
    dirty = datasets.Dataset.from_dict({"text": ["a\x00b", "fine"]})
    assert text._clean(dirty, "text", "x", TextDataConfig(), report)["text"] == ["ab", "fine"]
    assert text_checks.strip_text_batch in mapped and report.stripped_docs == {"x": (1, 1)}


# ------------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("case", ["strict", "broken_jsonl"])
def test_cli_bad_text_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    """The real command: stderr holds one line (no library chatter before it), exit status 2."""
    from tests.conftest import BIN, run, tiny_args

    if case == "strict":
        folder = _messy_folder(tmp_path / "c")
        extra = [f"data.files=[{folder}]", "data.on_bad_text=error"]
        needle = f"multissl: error: {folder / 'binary.txt'}: unusable text file: binary (NUL-heavy: "
    else:
        (tmp_path / "j").mkdir()
        lines = [json.dumps({"text": d}) for d in GOOD[:5]]
        lines[2] = lines[2][:-1]  # line 3 loses its closing brace
        (tmp_path / "j" / "broken.jsonl").write_text("\n".join(lines) + "\n")
        extra = [f"data.files=[{tmp_path / 'j' / 'broken.jsonl'}]"]
        needle = f"multissl: error: data.files: could not read {tmp_path / 'j' / 'broken.jsonl'}: line 3: Expecting ',' delimiter"
    proc = run([str(BIN / "multissl"), "pretrain", "mlm", *tiny_args(tmp_path / "run", steps=2), *extra])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(needle), proc.stderr


# ------------------------------------------------------------------------------- parse errors keep their cause
@pytest.mark.parametrize(("name", "body", "needle"), [
    ("t.jsonl", '{"text": "a"}\n\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n', "line 4: Expecting ',' delimiter (column 13)"),
    ("t.jsonl", '{"text": "a"}\n[1, 2]\n', "line 2: not a JSON object (a list)"),
    ("t.json", '[{"text": "a"},\n {"text": "b"\n]\n', "line 3: Expecting ',' delimiter (column 1)"),
    ("t.csv", "text,label\na,1\nb,2,3\n", "Expected 2 fields in line 3, saw 3"),
])
def test_table_parse_errors_name_file_and_line(tmp_path: Path, name: str, body: str, needle: str) -> None:
    good = tmp_path / f"a_good{Path(name).suffix}"
    good.write_text('{"text": "fine"}\n' if name.endswith(".jsonl") else ('[{"text": "fine"}]\n' if name.endswith(".json") else "text,label\nx,1\n"))
    (tmp_path / name).write_text(body)
    with pytest.raises(DataError) as err:
        read_files([good, tmp_path / name], "data.files")
    msg = str(err.value)
    assert msg == f"data.files: could not read {tmp_path / name}: {msg.split(': ', 2)[2]}" and needle in msg and "\n" not in msg
    assert "An error occurred while generating the dataset" not in msg


def test_labelled_text_faults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"text": f"doc {i} words", "label": "ab"[i % 2]} for i in range(40)]
    rows[3]["text"], rows[4]["text"], rows[5]["text"], rows[6]["text"] = "", "   ", "\x00\x00", "nul\x00inside"
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_labelled_text(TextClassificationDataConfig(files=[str(tmp_path / "t.jsonl")]))
    texts = [r["text"] for r in data.train + data.eval]
    assert len(texts) == 37 and "nulinside" in texts and not any("\x00" in t for t in texts)
    printed = capsys.readouterr().out
    assert f"skipped 3 of 40 rows: {tmp_path / 't.jsonl'}: row 4 (empty text); {tmp_path / 't.jsonl'}: row 5 (empty text); " \
           f"{tmp_path / 't.jsonl'}: row 6 (empty text)" in printed
    assert "stripped 1 control character(s) (NUL and other C0/C1 controls) from 1 row(s), e.g. row 7" in printed

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok", "label": "b"}\n' + json.dumps({"text": "caf\u00e9", "label": "a"}, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"latin\.jsonl: not valid UTF-8 \(first bad byte at offset 42\); re-encode it as UTF-8$"):
        load_labelled_text(TextClassificationDataConfig(files=[str(latin)]))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n{"text": "z" "label": "a"}\n')
    with pytest.raises(DataError, match=r"^data.files: could not read .*broken\.jsonl: line 3: Expecting ',' delimiter"):
        load_labelled_text(TextClassificationDataConfig(files=[str(broken)]))


def test_image_folder_metadata_and_dataset_folder_parse_errors(tmp_path: Path) -> None:
    from multissl.data.image_text import ImageTextDataConfig, prepare_image_text

    root = tmp_path / "images"
    root.mkdir()
    lines = []
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a picture number {i}"}))
    lines[2] = lines[2][:-1]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    where = f"could not read {root / 'metadata.jsonl'}: line 3: Expecting ',' delimiter"
    with pytest.raises(DataError, match=rf"^data.files: {where}"):
        prepare_image_text(ImageTextDataConfig(files=[str(root)]))
    with pytest.raises(DataError, match=rf"^data.dataset='{root}': {where}"):
        open_dataset(str(root), split="train")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": c}\n')
    with pytest.raises(DataError, match=r"ds/train\.jsonl: line 3: Expecting value \(column 10\)$"):
        open_dataset(str(tmp_path / "ds"), split="train")


def test_on_bad_text_is_a_checked_choice() -> None:
    from multissl import config
    from multissl.errors import ConfigError
    from recipes.mlm import MLMConfig

    assert config.build(MLMConfig, None, ["data.on_bad_text=error"]).data.on_bad_text == "error"
    assert config.build(MLMConfig).data.on_bad_text == "skip"
    with pytest.raises(ConfigError, match=r"data.on_bad_text: expected one of 'skip' \| 'error', got 'eror' \(did you mean 'error'\?\)"):
        config.build(MLMConfig, None, ["data.on_bad_text=eror"])
