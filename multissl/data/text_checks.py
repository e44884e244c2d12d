"""Bad text input, found before `datasets` and the tokenizer see it: empty, whitespace-only, binary
or non-UTF-8 files are skipped with a warning naming them (or fatal with ``data.on_bad_text=error``),
files with a UTF-16/32 byte-order mark are decoded by it, and NUL/control characters are stripped with
one count. The skipped files are listed in ``output_dir/data/skipped_text_files``."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multissl.data.files import bom_encoding, write_skip_list
from multissl.errors import DataError

SKIP_LIST = "skipped_text_files"
"""``output_dir/data/<this>``: every text file a run skipped, with the reason."""
NAMED_IN_WARNINGS = 5  # skipped files named one per warning line; the rest are counted (all are in the list)
CONTROL_PATTERN = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
"""C0/C1 control characters and DEL, but tab, newline and carriage return: no text means them (NULs of a
bad export, escape codes, form feeds), and a tokenizer would learn them as tokens. Stripped, counted."""
_CONTROL_RE = re.compile(CONTROL_PATTERN)
_ARROW_CONTROL = r"[\x{0}-\x{8}\x{b}\x{c}\x{e}-\x{1f}\x{7f}-\x{9f}]"  # the same set in RE2 syntax
_CONTROL_BYTES = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])  # one byte each in UTF-8
_C1_UTF8 = re.compile(rb"\xc2[\x80-\x9f]")  # U+0080..U+009F: two bytes each in UTF-8
BINARY_SHARE = 0.3
"""A file with more NUL/control characters than this share is binary (an image, a UTF-16 file without
its byte-order mark), not text with a few stray NULs to strip."""


@dataclass
class TextReport:
    """What preparing a corpus skipped or changed. Skips are warned about as they are found; the totals
    are reported once, at the end of data preparation, and the skipped files saved with the run."""

    files: int = 0
    """Text files looked at."""
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """``(file, why)`` of every file left out."""
    used: list[Path] = field(default_factory=list)
    """The files actually read (what a later read failure can be blamed on)."""
    decoded: list[tuple[Path, str]] = field(default_factory=list)
    """``(file, codec)`` of files read by their byte-order mark rather than as UTF-8."""
    stripped_files: dict[Path, int] = field(default_factory=dict)
    """Control characters stripped from each text file that had any."""
    stripped_docs: dict[str, tuple[int, int]] = field(default_factory=dict)
    """``source -> (characters, documents)`` stripped from table or dataset sources."""

    def summary(self) -> list[str]:
        """The lines to print once at the end: totals of skips, strips and BOM decodes."""
        lines = []
        if self.skipped:
            kinds: dict[str, int] = {}
            for _, why in self.skipped:
                kind = why.split(" (", 1)[0]
                kinds[kind] = kinds.get(kind, 0) + 1
            lines.append(f"warning: text data: skipped {len(self.skipped)} of {self.files} text file(s) as unusable ("
                         + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) + ")")
        chars = sum(self.stripped_files.values()) + sum(c for c, _ in self.stripped_docs.values())
        if chars:
            parts = []
            if self.stripped_files:
                parts.append(f"{len(self.stripped_files)} file(s) ("
                             + _named([f"{f}: {n}" for f, n in self.stripped_files.items()], 3) + ")")
            parts += [f"{docs} document(s) of {src}" for src, (_, docs) in self.stripped_docs.items()]
            lines.append(f"warning: text data: stripped {chars} control character(s) (NUL and other C0/C1 controls) "
                         f"from {' and '.join(parts)}")
        if self.decoded:
            lines.append(f"text data: decoded {len(self.decoded)} file(s) by their byte-order mark: "
                         + _named([f"{f} ({codec.upper()})" for f, codec in self.decoded], 3))
        return lines

    def skip_lines(self) -> list[str]:
        """``path<TAB>reason`` lines for ``output_dir/data/skipped_text_files``."""
        return [f"{f}\t{why}" for f, why in self.skipped]

    def finish(self, output_dir: str | Path | None, main: bool = True) -> None:
        """Print the totals and write (or clear) the skip list, on the main process only."""
        if not main:
            return
        written = write_skip_list(output_dir, SKIP_LIST, self.skip_lines()) if output_dir is not None else None
        for i, line in enumerate(self.summary()):
            print(line + (f"; all listed in {written}" if i == 0 and self.skipped and written else ""), flush=True)


def _named(items: list[str], shown: int) -> str:
    return "; ".join(items[:shown]) + (f"; ... ({len(items) - shown} more)" if len(items) > shown else "")


@dataclass
class TextFileCheck:
    """One text file, as read before `datasets` sees it: how to decode it, and what is wrong with it."""

    path: Path
    encoding: str = "utf-8"
    controls: int = 0
    """NUL and other control characters in it (stripped before tokenization)."""
    problem: str = ""
    """Why the file is unusable; empty when it is fine."""


def _codec_name(encoding: str) -> str:
    return "UTF-8" if encoding.startswith("utf-8") else encoding.upper()


def check_text_file(path: Path, chunk: int = 1 << 20) -> TextFileCheck:
    """Read ``path`` once, block by block: empty, whitespace-only, binary (NUL-heavy), not decodable
    (UTF-8, or what its byte-order mark names), or fine with a count of control characters.

    UTF-8 control characters are single bytes (C1 ones two), so they are counted on the bytes with
    ``bytes.translate`` and the decoded text is only checked for content until some is found: this
    costs 1-2 ms per MB (about 0.16 s for 110 MB here), well under what `datasets`' text reader and the
    tokenizer then spend on the same bytes.
    """
    with path.open("rb") as fh:
        block = fh.read(max(chunk, 4))  # a whole byte-order mark, whatever the block size
        if not block:
            return TextFileCheck(path, problem="empty (0 bytes)")
        encoding = bom_encoding(block) or "utf-8"
        utf8 = encoding.startswith("utf-8")
        decoder = codecs.getincrementaldecoder(encoding)()
        offset = controls = chars = nuls = 0
        content, carry = False, b""
        while True:
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                at, seen = offset - pending + err.start, offset + len(block)
                nuls += block.count(0)
                if utf8 and nuls >= BINARY_SHARE * seen:
                    why = f"binary (NUL-heavy: {nuls / seen:.0%} of its first {seen} bytes are NUL)"
                elif utf8:
                    why = (f"not valid UTF-8 (first bad byte at offset {at}; Latin-1, another legacy encoding "
                           "or binary? re-encode text as UTF-8)")
                else:
                    why = f"not valid {_codec_name(encoding)} (first bad byte at offset {at}, after its byte-order mark)"
                return TextFileCheck(path, encoding, problem=why)
            if utf8:
                found = len(block) - len(block.translate(None, _CONTROL_BYTES))
                if b"\xc2" in carry + block:
                    found += len(_C1_UTF8.findall(carry + block))
                carry = block[-1:] if block.endswith(b"\xc2") else b""
                nuls += block.count(0)
            else:
                found = len(_CONTROL_RE.findall(text))
            controls += found
            chars += len(text)
            if not content:
                content = bool((_CONTROL_RE.sub("", text) if found else text).strip())
            if not block:
                break
            offset += len(block)
            block = fh.read(chunk)
    if chars and controls > BINARY_SHARE * chars:
        return TextFileCheck(path, encoding, controls,
                             f"binary (NUL-heavy: {controls / chars:.0%} of its characters are NUL or other controls)")
    if not content:
        after = f" after stripping {controls} control character(s)" if controls else ""
        return TextFileCheck(path, encoding, controls, f"whitespace-only{after}")
    return TextFileCheck(path, encoding, controls)


def strip_controls(text: str) -> tuple[str, int]:
    """``text`` without NUL/control characters (tab, newline, carriage return kept), and how many went."""
    return _CONTROL_RE.subn("", text)


def strip_text_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """A batched map function: control characters out of the ``text`` column (module level: cached)."""
    return {"text": [_CONTROL_RE.sub("", t) if isinstance(t, str) else t for t in batch["text"]]}


def usable_text_files(files: list[Path], what: str, on_bad: str, report: TextReport) -> list[TextFileCheck]:
    """The files worth reading; the others are skipped with a warning each (the first few), or with
    ``on_bad == "error"`` the first one is a one-line error."""
    good, bad = [], []
    for f in files:
        check = check_text_file(f)
        if not check.problem:
            good.append(check)
            continue
        if on_bad == "error":
            raise DataError(f"{f}: unusable text file: {check.problem} (data.on_bad_text=error; "
                            "set data.on_bad_text=skip to skip such files)")
        bad.append(check)
        if len(bad) <= NAMED_IN_WARNINGS:
            print(f"warning: {what}: skipping {f}: {check.problem}", flush=True)
    if len(bad) > NAMED_IN_WARNINGS:
        print(f"warning: {what}: skipping {len(bad) - NAMED_IN_WARNINGS} more unusable text file(s)", flush=True)
    report.files += len(files)
    report.skipped += [(c.path, c.problem) for c in bad]
    if not good:
        raise DataError(f"{what}: the corpus is empty: all {len(files)} text file(s) are unusable: "
                        + _named([f"{c.path}: {c.problem}" for c in bad], 3))
    return good



def strip_table_controls(ds: Any, source: str, report: TextReport) -> Any:
    """Control characters out of a table's or a dataset's texts. Counted first with Arrow (about a
    millisecond per MB), so a clean corpus (the embedded one) is never rewritten; a stream cannot be
    counted ahead, so it is stripped as it flows and its first stripped document is warned about."""
    if not hasattr(ds, "__len__"):
        return ds.map(_StreamStripper(source), batched=True)
    import pyarrow.compute as pc

    chars = docs = 0
    for batch in ds.with_format("arrow").iter(batch_size=50_000):
        counts = pc.count_substring_regex(batch["text"], _ARROW_CONTROL)
        chars += pc.sum(counts).as_py() or 0
        docs += pc.sum(pc.greater(counts, 0)).as_py() or 0
    if not chars:
        return ds
    report.stripped_docs[source] = (chars, docs)
    return ds.map(strip_text_batch, batched=True, desc="stripping control characters")


class _StreamStripper:
    """A streamed source's map function: strips control characters, warning once (per process) when
    it first finds some, since a stream has no total to report ahead."""

    def __init__(self, source: str) -> None:
        self.source, self.warned = source, False

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out, found = [], 0
        for t in batch["text"]:
            if isinstance(t, str):
                t, n = _CONTROL_RE.subn("", t)
                found += n
            out.append(t)
        if found and not self.warned:
            self.warned = True
            print(f"warning: {self.source}: stripping NUL/control characters from streamed documents "
                  f"({found} in the first batch that had any)", flush=True)
        return {"text": out}

