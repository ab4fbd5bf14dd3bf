"""The documents of a unit (see ``units.py``), in file order: reading the units in order gives exactly the
documents of reading every file from start to end.

What a document is: in text, one line (``--doc_separator newline``) or a run of non-blank lines
ended by a blank line (``blank_line``; its lines joined with "\\n"); in JSON, Parquet and Arrow, the
string in ``--text_field`` (default ``text``) of each record. Lines end at "\\n" only: "\\r" before it is
dropped (CRLF), a lone "\\r" is text; a byte-order mark at a file's start is not text. One whitespace rule
(``is_blank``: ``str.isspace``, Unicode's spaces included) for every format: a blank line or record is no
document (records count it as ``empty``), and blank lines separate blank-line documents. A ranged unit reads
past its end to finish its last line (or, for blank-line documents, its last document), and skips
what an earlier unit reads to its end, judging the line before it by the same rule: the documents are the
same whatever the unit size (a unit edge may fall on any byte, inside a character too).

Bad input is a ``DataError`` naming the file (and line or row) and the fix: a file that is not
UTF-8, looks binary, is a truncated or corrupt archive, a record that is not valid JSON, lacks the
text field or holds no string there, or one that is not text (a NUL or a lone surrogate escape, as
``text.text_problem`` says). With ``on_bad_record="skip"`` bad records are skipped and
counted instead (``bad_records``); the others stay errors.
"""

from __future__ import annotations

import json
from typing import Iterator

from openllm_ds.data.units import (TABLE_BATCH_ROWS, ReadOptions, SourceFile, Unit, UnitCounts, archive_error,
                                   arrow_batches, open_stream, open_table, plan_units, resolve_sources)
from openllm_ds.errors import DataError, UserError
from openllm_ds.text import text_problem
from openllm_ds.utils import decode_text, json_of_text


# ---- units -> documents ----------------------------------------------------------------------

class _Line:
    __slots__ = ("text", "offset", "number")

    def __init__(self, text: bytes, offset: int | None, number: int | None):
        self.text, self.offset, self.number = text, offset, number  # byte offset (ranged) or line number (streamed)


def read_unit(unit: Unit, options: ReadOptions, counts: UnitCounts | None = None) -> Iterator[str]:
    """The documents of ``unit``, in file order."""
    counts = counts if counts is not None else UnitCounts()
    f = unit.file
    if f.format in ("parquet", "arrow"):
        return _table_documents(unit, options, counts)
    if f.format == "json_array":
        return _json_array_documents(f, options, counts)
    if f.format == "jsonl":
        return _jsonl_documents(_unit_lines(unit, counts), f, options, counts)
    if options.doc_separator == "newline":
        return _text_documents(_unit_lines(unit, counts), f)
    return _paragraph_documents(unit, counts)


def _unit_lines(unit: Unit, counts: UnitCounts) -> Iterator[_Line]:
    """The lines (without their "\\n") that start in the unit, each complete."""
    f = unit.file
    if f.compression:
        yield from _stream_lines(f, counts)
        return
    with open(f.path, "rb") as fh:
        begin = _first_line_start(fh, unit.start)
        if begin >= unit.stop:
            return  # one line spans the whole unit: it belongs to an earlier one
        fh.seek(begin)
        data = fh.read(unit.stop - begin)
        if not data.endswith(b"\n"):
            data += fh.readline()  # the last line that starts in the unit, to its end
    counts.bytes_read += len(data)
    offset = begin
    for line in data.split(b"\n")[: -1 if data.endswith(b"\n") else None]:
        yield _Line(line, offset, None)
        offset += len(line) + 1


def _tail_lines(unit: Unit, counts: UnitCounts) -> Iterator[_Line]:
    """The lines after a ranged unit (they start in later units), for a document that runs past its end."""
    f = unit.file
    if f.compression or unit.stop >= f.size:
        return
    with open(f.path, "rb") as fh:
        offset = _first_line_start(fh, unit.stop)
        fh.seek(offset)
        for raw in fh:
            counts.bytes_read += len(raw)
            yield _Line(raw.rstrip(b"\n"), offset, None)
            offset += len(raw)


def _first_line_start(fh, pos: int) -> int:
    """Offset of the first line that starts at or after ``pos``."""
    if pos <= 0:
        return 0
    fh.seek(pos - 1)
    fh.readline()  # the rest of the line holding byte pos-1 (just its "\n" when a line starts at pos)
    return fh.tell()


def _starts_record(unit: Unit) -> bool:
    """Blank-line documents: does the unit's first line begin a document (the file's first line, or one after
    a blank line, by the reader's own rule: ``is_blank``)? Else it continues a document that an earlier unit reads
    to its end."""
    if unit.start == 0 or unit.file.compression:
        return True
    with open(unit.file.path, "rb") as fh:
        begin = _first_line_start(fh, unit.start)
        return begin == 0 or _line_before_is_blank(fh, begin)


def _line_before_is_blank(fh, begin: int, block: int = 1 << 16) -> bool:
    """Is the line that ends with the "\n" at ``begin - 1`` blank? Read backwards a block at a time, stopping at
    the first character that is not whitespace."""
    end, carry = begin - 1, b""
    while True:
        start = max(0, end - block)
        fh.seek(start)
        data = fh.read(end - start) + carry
        newline = data.rfind(b"\n")
        if newline >= 0:
            return is_blank(_text(data[newline + 1:]))
        if start == 0:
            return is_blank(_text(data).removeprefix("\ufeff"))  # the file's first line
        cut = 0  # a character cut by the block's start: carried on to the next block
        while cut < min(3, len(data)) and 0x80 <= data[cut] < 0xC0:
            cut += 1
        if not is_blank(_text(data[cut:])):
            return False
        end, carry = start, data[:cut]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")  # a byte that is not UTF-8 is not blank (the reader stops at it)


def is_blank(text: str) -> bool:
    """The one whitespace rule of every text format: a line (or a record's text) of only whitespace -- spaces, tabs,
    "\r", "\f", "\v", and Unicode's spaces (no-break, ideographic, em...) as ``str.isspace`` counts them -- is no
    document (and, with ``--doc_separator blank_line``, a separator)."""
    return not text.strip()


def _stream_lines(f: SourceFile, counts: UnitCounts) -> Iterator[_Line]:
    with open_stream(f) as fh:
        number = 0
        try:
            for raw in fh:
                number += 1
                counts.bytes_read += len(raw)
                yield _Line(raw.rstrip(b"\n"), None, number)
        except UserError:
            raise
        except Exception as e:  # EOFError, BadGzipFile, zlib.error, LZMAError, zstandard.ZstdError, OSError
            raise archive_error(f, e) from None


def _where(f: SourceFile, line: _Line) -> str:
    number = line.number if line.number is not None else _line_number(f.path, line.offset)
    return f"{f.shown} line {number}"


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line starting at ``offset`` (counted only to report an error)."""
    n = 1
    with open(path, "rb") as fh:
        left = offset
        while left > 0:
            block = fh.read(min(left, 1 << 20))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def _decode(f: SourceFile, line: _Line) -> str:
    raw = line.text
    if b"\x00" in raw:
        raise DataError(f"{_where(f, line)} holds a NUL byte: {f.shown} looks binary, not text; pass text, JSON Lines, "
                        "Parquet or Arrow files")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{_where(f, line)} is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        f"convert {f.shown} to UTF-8, e.g. with iconv -f latin1 -t utf-8") from None
    if line.offset == 0 or line.number == 1:
        text = text.removeprefix("\ufeff")  # a byte-order mark is not text
    return text.removesuffix("\r")


def _text_documents(lines: Iterator[_Line], f: SourceFile) -> Iterator[str]:
    for line in lines:
        text = _decode(f, line)
        if not is_blank(text):
            yield text


def _paragraph_documents(unit: Unit, counts: UnitCounts) -> Iterator[str]:
    f = unit.file
    skipping = not _starts_record(unit)  # the lines of a document begun in an earlier unit
    record: list[str] = []
    for line in _unit_lines(unit, counts):
        text = _decode(f, line)
        if is_blank(text):
            if record:
                yield "\n".join(record)
                record = []
            skipping = False
        elif not skipping:
            record.append(text)
    if record:  # the unit's last document may run on into later units
        for line in _tail_lines(unit, counts):
            text = _decode(f, line)
            if is_blank(text):
                break
            record.append(text)
        yield "\n".join(record)


class _Records:
    """Checks one record (a JSON object, a table value) and applies ``on_bad_record``."""

    def __init__(self, f: SourceFile, options: ReadOptions, counts: UnitCounts):
        self.f, self.options, self.counts = f, options, counts

    def bad(self, where: str, problem: str) -> None:
        if self.options.on_bad_record == "error":
            raise DataError(f"{where} {problem}; fix the record, or pass --on_bad_record skip to skip bad records")
        self.counts.bad_records += 1
        if len(self.counts.bad_examples) < 3:
            self.counts.bad_examples.append(f"{where} {problem}")

    def text_of(self, obj, where_fn) -> str | None:
        """The record's text, or None when it is skipped (bad, or empty)."""
        field_ = self.options.text_field
        if not isinstance(obj, dict):
            self.bad(where_fn(), f"is a JSON {type(obj).__name__}, not an object with a {field_!r} field")
            return None
        if field_ not in obj:
            names = ", ".join(list(obj)[:8]) or "none"
            self.bad(where_fn(), f"has no field {field_!r} (its fields: {names}); pass --text_field with the field "
                                 "that holds the text")
            return None
        return self.check_text(obj[field_], where_fn)

    def check_text(self, value, where_fn) -> str | None:
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            self.bad(where_fn(), f"field {self.options.text_field!r} is {kind}, not a string")
            return None
        if is_blank(value):
            self.counts.empty += 1
            return None
        problem = text_problem(value)  # a lone surrogate escape or a NUL: nothing a tokenizer can take
        if problem:
            self.bad(where_fn(), f"field {self.options.text_field!r} {problem}")
            return None
        return value


def _parse_json(text: str, where_fn, records: _Records):
    try:
        return json.loads(text), True
    except json.JSONDecodeError as e:
        records.bad(where_fn(), f"is not valid JSON: {e.msg} (column {e.colno})")
    except RecursionError:
        records.bad(where_fn(), "is JSON nested too deeply to read")
    return None, False


def _jsonl_documents(lines: Iterator[_Line], f: SourceFile, options: ReadOptions, counts: UnitCounts) -> Iterator[str]:
    records = _Records(f, options, counts)
    for line in lines:
        text = _decode(f, line)
        if is_blank(text):
            continue
        where = lambda line=line: _where(f, line)  # noqa: E731 - computed only for an error
        obj, ok = _parse_json(text, where, records)
        if ok and (doc := records.text_of(obj, where)) is not None:
            yield doc


def _json_array_documents(f: SourceFile, options: ReadOptions, counts: UnitCounts) -> Iterator[str]:
    with open_stream(f) as fh:
        try:
            raw = fh.read()
        except UserError:
            raise
        except Exception as e:
            raise archive_error(f, e) from None
    counts.bytes_read += len(raw)
    items = parse_json(raw, f.shown, "fix it, or write the documents as JSON Lines (one flat object a line)")
    if not isinstance(items, list):
        raise DataError(f"{f.shown} holds a JSON {type(items).__name__}, not an array of objects; write the documents "
                        "as a JSON array or as JSON Lines (SQuAD files go through `openllm-ds prepare`)")
    records = _Records(f, options, counts)
    for i, obj in enumerate(items):
        if (doc := records.text_of(obj, lambda i=i: f"{f.shown} item {i}")) is not None:
            yield doc


def parse_json(raw: bytes, name: str, fix: str):
    """A whole JSON document by the one reader policy (``utils.decode_text``, then ``utils.json_of_text``): a
    DataError naming ``name`` and ``fix`` when it holds NUL bytes, is not UTF-8, does not parse (truncated?) or
    nests too deeply to read. A lone surrogate escape is kept: the document that holds it is a bad record
    (``_Records``), and `prepare`'s cleaning replaces it in SQuAD contexts."""
    return json_of_text(decode_text(raw, name, fix, DataError), name, fix, error=DataError, lone_surrogates=True)


def _table_documents(unit: Unit, options: ReadOptions, counts: UnitCounts) -> Iterator[str]:
    f = unit.file
    records = _Records(f, options, counts)
    row = 0
    try:
        if f.format == "parquet":
            pf = open_table(f)
            row = sum(pf.metadata.row_group(i).num_rows for i in range(unit.start))
            batches = pf.iter_batches(batch_size=TABLE_BATCH_ROWS, row_groups=list(range(unit.start, unit.stop)),
                                      columns=[options.text_field], use_threads=False)
            columns = (b.column(0) for b in batches)
        else:
            selected = []
            for i, (b, _) in enumerate(arrow_batches(f)):
                if i >= unit.stop:
                    break
                if i >= unit.start:
                    selected.append(b)
                else:
                    row += b.num_rows
            columns = (b.column(options.text_field) for b in selected)
        for col in columns:
            counts.bytes_read += col.nbytes
            for value in col.to_pylist():
                if (doc := records.check_text(value, lambda r=row: f"{f.shown} row {r}")) is not None:
                    yield doc
                row += 1
    except UserError:
        raise
    except Exception as e:  # pyarrow: ArrowInvalid, OSError on a corrupt page...
        raise DataError(f"{f.shown} is a truncated or corrupt {f.format} file ({str(e)[:200]}); replace it") from None


def read_documents(source: str, options: ReadOptions = ReadOptions(), limit: int | None = None,
                   what: str = "--eval_data") -> list[str]:
    """The documents of ``source`` (any source above), in order; at most ``limit``. For evaluation data and
    reports: the whole list is in memory."""
    files = resolve_sources([source], options, what)
    docs: list[str] = []
    for unit in plan_units(files):
        for doc in read_unit(unit, options):
            docs.append(doc)
            if limit is not None and len(docs) >= limit:
                return docs
    if not docs:
        raise DataError(f"{what} {source} holds no documents; check it, --text_field and --doc_separator")
    return docs


def read_json_lines(source: str, what: str) -> Iterator[tuple[str, object]]:
    """(where, object) of every non-blank line of the JSON Lines files of ``source`` (a file, .gz/.zst/..., a folder
    or a glob of them), in order; ``where`` is "FILE line N". A line that is not JSON, a file that is not JSON Lines,
    not UTF-8 or a corrupt archive is a DataError naming it. For records that are not documents (fine-tuning
    conversations): the caller checks their fields."""
    for f in resolve_sources([source], ReadOptions(), what):
        if f.format != "jsonl":
            raise DataError(f"{what} {f.shown} is not JSON Lines; pass .jsonl files (one JSON object a line; .gz and "
                            ".zst too), a folder or a glob of them")
        for line in _stream_lines(f, UnitCounts()):
            text = _decode(f, line)
            if is_blank(text):
                continue
            try:
                obj = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:
                raise DataError(f"{_where(f, line)} is not valid JSON ({getattr(e, 'msg', e)}); fix the record") from None
            yield _where(f, line), obj
