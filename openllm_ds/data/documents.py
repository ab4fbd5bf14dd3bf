"""Documents of a user's corpus, from any mix of sources, read in independent pieces ("units").

A *source* is what the user types after ``--input`` / ``--data_file``:

- a file; its name gives the format: ``.txt``/``.text`` (text), ``.jsonl``/``.ndjson`` (JSON Lines),
  ``.json`` (a JSON array of objects, or JSON Lines), ``.parquet``, ``.arrow`` (Arrow IPC stream, as
  written by Hugging Face ``datasets``), each text format also compressed as ``.gz``, ``.zst``,
  ``.bz2`` or ``.xz``; a file with any other name is read as text;
- a directory: every file under it, recursively, in name order (hidden files and our own ``*.tokens``
  shard dirs skipped); a file of an unknown format there is an error, not silently read or skipped.
  A directory written by ``datasets.Dataset.save_to_disk`` (``state.json`` + ``.arrow`` files) is read
  as that dataset;
- a glob pattern (``corpus/*.jsonl.gz``, ``web/**/*.parquet``), its matches in name order;
- ``hf:NAME[/CONFIG][:SPLIT]``: a dataset of the Hugging Face Hub through ``datasets.load_dataset``
  (``hf:Salesforce/wikitext/wikitext-103-raw-v1:train``; one or two path parts are the dataset's
  name, a third is its config; the split defaults to ``train``); it needs the Hub, or its cache.

What a document is: in text, one line (``--doc_separator newline``) or a run of non-blank lines
ended by a blank line (``blank_line``; its lines joined with "\\n"); in JSON, Parquet and Arrow, the
string in ``--text_field`` (default ``text``) of each record. "\\r" before a line end is dropped;
documents that are empty or only whitespace are skipped (counted as ``empty``).

Units. Every file is cut into units that are read independently, by any worker, in any order: an
uncompressed text or JSON Lines file into byte ranges of ``unit_bytes`` (a document belongs to the
range its first byte lies in), a Parquet file into runs of row groups, an Arrow file into runs of
record batches, of about ``unit_bytes`` each; a compressed file or a JSON array is one unit. The
units depend only on the files and ``unit_bytes``, never on the number of workers, and reading the
units in order gives exactly the documents of reading every file from start to end.

Bad input is a ``DataError`` naming the file (and line or row) and the fix: a file that is not
UTF-8, looks binary, is a truncated or corrupt archive, a record that is not valid JSON, lacks the
text field or holds no string there. With ``on_bad_record="skip"`` bad records are skipped and
counted instead (``bad_records``); the others stay errors.
"""

from __future__ import annotations

import bz2
import dataclasses
import glob
import gzip
import io
import json
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from openllm_ds.errors import DataError, UserError

UNIT_BYTES = 32 * 2**20
TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
COMPRESSIONS = {".gz": "gz", ".zst": "zst", ".bz2": "bz2", ".xz": "xz"}
DOC_SEPARATORS = ("newline", "blank_line")
ON_BAD_RECORD = ("error", "skip")
SHARDS_SUFFIX = ".tokens"
TABLE_BATCH_ROWS = 8192
_BLANK = b" \t\r\n\f\v"


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    doc_separator: str = "newline"  # newline | blank_line (text files)
    on_bad_record: str = "error"  # error | skip

    def __post_init__(self):
        if self.doc_separator not in DOC_SEPARATORS:
            raise UserError(f"--doc_separator must be newline or blank_line, got {self.doc_separator!r}")
        if self.on_bad_record not in ON_BAD_RECORD:
            raise UserError(f"--on_bad_record must be error or skip, got {self.on_bad_record!r}")
        if not self.text_field:
            raise UserError("--text_field must name a field, e.g. --text_field text")


@dataclass(frozen=True)
class SourceFile:
    path: str
    format: str  # text | jsonl | json_array | parquet | arrow
    compression: str | None  # gz | zst | bz2 | xz | None
    size: int
    mtime_ns: int
    source: str  # the source it was found through, for messages
    shown: str = ""  # the path as the user would write it, for messages

    def __post_init__(self):
        if not self.shown:
            object.__setattr__(self, "shown", self.path)

    def fingerprint(self) -> dict:
        return {"path": self.path, "format": self.format, "compression": self.compression, "bytes": self.size,
                "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class Unit:
    index: int
    file: SourceFile
    start: int  # byte offset (text formats), row group or record batch (tables)
    stop: int


@dataclass
class UnitCounts:
    """What reading a unit skipped (documents are counted by whoever consumes them)."""
    empty: int = 0
    bad_records: int = 0
    bytes_read: int = 0
    bad_examples: list = field(default_factory=list)  # the first few skipped records' locations


# ---- sources -> files ------------------------------------------------------------------------

def is_hub_source(source: str) -> bool:
    return str(source).startswith("hf:")


def is_glob(source: str) -> bool:
    return any(c in str(source) for c in "*?[")


def resolve_sources(sources: list[str] | tuple[str, ...], options: ReadOptions, what: str = "--input") -> list[SourceFile]:
    """Every file of every source, in order; a file reached twice is read once."""
    if not sources:
        raise UserError(f"{what}: give at least one source (a file, directory, glob or hf:NAME)")
    files: list[SourceFile] = []
    seen: set[str] = set()
    for source in sources:
        found = _files_of(str(source), what)
        if not found:
            raise DataError(f"{what} {source} matches no files; check the path or pattern")
        for f in found:
            if f.path not in seen:
                seen.add(f.path)
                files.append(f)
    for f in files:
        if f.format in ("parquet", "arrow"):
            check_table_schema(f, options)
    return files


def _files_of(source: str, what: str) -> list[SourceFile]:
    if is_hub_source(source):
        return hub_files(source)
    p = Path(source).expanduser()
    if p.is_file():
        return [source_file(p, source, strict=False)]
    if p.is_dir():
        if (p / "dataset_dict.json").is_file():
            splits = _dataset_dict_splits(p)
            raise DataError(f"{what} {source} is a Hugging Face DatasetDict with splits {', '.join(splits)}; pass one "
                            f"split's directory, e.g. {p / (splits[0] if splits else 'train')}")
        return walk(p, source)
    if is_glob(source):
        matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
        return [source_file(m, source, strict=False) for m in matches if m.is_file() and not _hidden(m.name)]
    raise DataError(f"{what} {source} does not exist; run `openllm-ds prepare` first, or pass an existing file, "
                    "folder, glob pattern or hf:NAME")


def walk(folder: Path, source: str) -> list[SourceFile]:
    """Files under ``folder``, recursively, in path order; hidden entries and our shard dirs left out, and a
    ``save_to_disk`` dataset read as one."""
    if _is_saved_dataset(folder):
        return saved_dataset_files(folder, source)
    out = []
    for entry in sorted(folder.iterdir()):
        if _hidden(entry.name) or (entry.is_dir() and _is_shards_dir(entry)):
            continue
        if entry.is_dir():
            out.extend(walk(entry, source))
        elif entry.is_file():
            out.append(source_file(entry, source, strict=True))
    return out


def _is_saved_dataset(p: Path) -> bool:
    return (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _is_shards_dir(p: Path) -> bool:
    return p.name.endswith(SHARDS_SUFFIX) and (p / "meta.json").is_file()


def format_of(name: str) -> tuple[str | None, str | None]:
    """(format, compression) from a file name; format None when the name does not say."""
    lower = name.lower()
    compression = None
    for suffix, kind in COMPRESSIONS.items():
        if lower.endswith(suffix):
            compression, lower = kind, lower[: -len(suffix)]
            break
    for suffix, kind in {**TEXT_SUFFIXES, **({} if compression else TABLE_SUFFIXES)}.items():
        if lower.endswith(suffix):
            return kind, compression
    return None, compression


def source_file(path: Path, source: str, strict: bool) -> SourceFile:
    fmt, compression = format_of(path.name)
    if fmt is None:
        if strict:
            known = ", ".join([*TEXT_SUFFIXES, *TABLE_SUFFIXES])
            raise DataError(f"{path} (in {source}) is not a corpus file this reads ({known}, optionally .gz/.zst/"
                            ".bz2/.xz); move it out of the folder, or pass a glob that leaves it out")
        fmt = "text"
    try:
        st = path.stat()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror})") from None
    if not os.access(path, os.R_OK):
        raise DataError(f"cannot read {path} (permission denied); fix its permissions")
    f = SourceFile(str(path.resolve()), fmt, compression, st.st_size, st.st_mtime_ns, source, str(path))
    if fmt == "json":  # an array of objects, or JSON Lines under a .json name
        f = dataclasses.replace(f, format="json_array" if _json_array(f) else "jsonl")
    return f


def _json_array(f: SourceFile) -> bool:
    """Does a .json file hold one JSON array (else: JSON Lines)?"""
    with _open_stream(f) as fh:
        try:
            head = fh.read(4096)
        except UserError:
            raise
        except Exception as e:
            raise _archive_error(f, e) from None
    return head.lstrip(_BLANK + b"\xef\xbb\xbf").startswith(b"[")


def _dataset_dict_splits(p: Path) -> list[str]:
    try:
        return list(json.loads((p / "dataset_dict.json").read_text())["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def saved_dataset_files(p: Path, source: str) -> list[SourceFile]:
    """The .arrow files of a ``Dataset.save_to_disk`` directory, in the dataset's order."""
    try:
        state = json.loads((p / "state.json").read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{p / 'state.json'} is not a Hugging Face dataset state ({e}); save the dataset again "
                        "with Dataset.save_to_disk") from None
    if state.get("_indices_data_files") or (p / "indices.arrow").exists():
        raise DataError(f"{source} was saved with an indices mapping (a shuffled or selected dataset); call "
                        ".flatten_indices() before save_to_disk")
    files = []
    for name in names:
        f = p / name
        if not f.is_file():
            raise DataError(f"{source}: {f} is listed in state.json but missing; save the dataset again")
        files.append(source_file(f, source, strict=False))
    return files


def parse_hub_source(source: str) -> tuple[str, str | None, str]:
    spec, _, split = source[len("hf:"):].partition(":")
    parts = [x for x in spec.split("/") if x]
    if not 1 <= len(parts) <= 3 or not split and source.endswith(":"):
        raise UserError(f"cannot read {source}: write hf:NAME, hf:ORG/NAME, hf:ORG/NAME/CONFIG, each optionally "
                        "followed by :SPLIT (default train)")
    name = "/".join(parts[:2]) if len(parts) >= 2 else parts[0]
    config = parts[2] if len(parts) == 3 else None
    return name, config, split or "train"


def hub_files(source: str) -> list[SourceFile]:
    """A Hub dataset's split, downloaded (or found in the cache) by ``datasets``; its Arrow cache files."""
    name, config, split = parse_hub_source(source)
    try:
        import datasets
    except ImportError:
        raise UserError(f"{source} needs the `datasets` package (pip install datasets)") from None
    offline = any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
                  for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the Hub raises many types: ConnectionError, HfHubHTTPError, FileNotFoundError...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        where = ("offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set) and it is not in the local cache"
                 if offline else "the Hugging Face Hub could not provide it")
        raise DataError(f"cannot load {source}: {where} ({reason}); on a machine with internet run "
                        f"datasets.load_dataset({name!r}, {config!r}, split={split!r}).save_to_disk(DIR) and pass "
                        "DIR instead") from None
    return [source_file(Path(f["filename"]), source, strict=False) for f in ds.cache_files]


def check_table_schema(f: SourceFile, options: ReadOptions) -> None:
    import pyarrow as pa

    schema = _open_table(f).schema_arrow if f.format == "parquet" else _arrow_schema(f)
    if options.text_field not in schema.names:
        raise DataError(f"{f.shown} has no column {options.text_field!r} (columns: {', '.join(schema.names[:10])}); "
                        "pass --text_field with the column that holds the text")
    typ = schema.field(options.text_field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
        raise DataError(f"{f.shown}: column {options.text_field!r} holds {typ}, not strings; pass --text_field with "
                        "the column that holds the text")


# ---- files -> units --------------------------------------------------------------------------

def plan_units(files: list[SourceFile], unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    if unit_bytes < 1:
        raise UserError(f"unit_bytes must be >= 1, got {unit_bytes}")
    units: list[Unit] = []
    for f in files:
        for start, stop in _unit_ranges(f, unit_bytes):
            units.append(Unit(len(units), f, start, stop))
    return units


def _unit_ranges(f: SourceFile, unit_bytes: int) -> list[tuple[int, int]]:
    if f.format in ("parquet", "arrow"):
        sizes = _row_group_bytes(f) if f.format == "parquet" else [b for _, b in _arrow_batches(f)]
        ranges, start, acc = [], 0, 0
        for i, b in enumerate(sizes):
            acc += b
            if acc >= unit_bytes:
                ranges.append((start, i + 1))
                start, acc = i + 1, 0
        if start < len(sizes):
            ranges.append((start, len(sizes)))
        return ranges
    if f.compression or f.format == "json_array":
        return [(0, f.size)]
    return [(s, min(s + unit_bytes, f.size)) for s in range(0, f.size, unit_bytes)]


def _open_table(f: SourceFile):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(f.path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError...
        raise DataError(f"{f.shown} is not a readable Parquet file ({str(e)[:200]}); replace it") from None


def _row_group_bytes(f: SourceFile) -> list[int]:
    meta = _open_table(f).metadata
    return [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]


def _arrow_reader(f: SourceFile):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(f.path))
    except Exception:
        try:
            return pa.ipc.open_file(pa.memory_map(f.path))
        except Exception as e:
            raise DataError(f"{f.shown} is not a readable Arrow file ({str(e)[:200]}); replace it") from None


def _arrow_schema(f: SourceFile):
    return _arrow_reader(f).schema


def _arrow_batches(f: SourceFile):
    """(batch, nbytes) of an Arrow file, memory-mapped (no copy)."""
    reader = _arrow_reader(f)
    try:
        if hasattr(reader, "num_record_batches"):  # file format
            for i in range(reader.num_record_batches):
                b = reader.get_batch(i)
                yield b, b.nbytes
        else:
            for b in reader:
                yield b, b.nbytes
    except Exception as e:
        if isinstance(e, UserError):
            raise
        raise DataError(f"{f.shown} is a truncated or corrupt Arrow file ({str(e)[:200]}); replace it") from None


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
    a blank line)? Else it continues a document that an earlier unit reads to its end."""
    if unit.start == 0 or unit.file.compression:
        return True
    with open(unit.file.path, "rb") as fh:
        pos = _first_line_start(fh, unit.start) - 2  # the last byte of the line before, less its "\n"
        while pos >= 0:
            fh.seek(pos)
            c = fh.read(1)
            if c == b"\n":
                return True  # that line is blank
            if c not in b" \t\r\f\v":
                return False
            pos -= 1
    return True


def _stream_lines(f: SourceFile, counts: UnitCounts) -> Iterator[_Line]:
    with _open_stream(f) as fh:
        number = 0
        try:
            for raw in fh:
                number += 1
                counts.bytes_read += len(raw)
                yield _Line(raw.rstrip(b"\n"), None, number)
        except UserError:
            raise
        except Exception as e:  # EOFError, BadGzipFile, zlib.error, LZMAError, zstandard.ZstdError, OSError
            raise _archive_error(f, e) from None


def _open_stream(f: SourceFile):
    try:
        if f.compression == "gz":
            return gzip.open(f.path, "rb")
        if f.compression == "bz2":
            return bz2.open(f.path, "rb")
        if f.compression == "xz":
            return lzma.open(f.path, "rb")
        if f.compression == "zst":
            try:
                import zstandard
            except ImportError:
                raise UserError(f"{f.shown}: reading .zst files needs the `zstandard` package (pip install zstandard)") from None
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(f.path, "rb"), closefd=True))
        return open(f.path, "rb")
    except OSError as e:
        raise DataError(f"cannot read {f.shown} ({e.strerror})") from None


def _archive_error(f: SourceFile, e: Exception) -> DataError:
    reason = str(e).strip()[:200] or type(e).__name__
    return DataError(f"{f.shown} is a truncated or corrupt .{f.compression or f.format} file ({reason}); "
                     "download or compress it again")


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
        if text.strip():
            yield text


def _paragraph_documents(unit: Unit, counts: UnitCounts) -> Iterator[str]:
    f = unit.file
    skipping = not _starts_record(unit)  # the lines of a document begun in an earlier unit
    record: list[str] = []
    for line in _unit_lines(unit, counts):
        text = _decode(f, line)
        if not text.strip():
            if record:
                yield "\n".join(record)
                record = []
            skipping = False
        elif not skipping:
            record.append(text)
    if record:  # the unit's last document may run on into later units
        for line in _tail_lines(unit, counts):
            text = _decode(f, line)
            if not text.strip():
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
        if not value.strip():
            self.counts.empty += 1
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
        if not line.text.strip(_BLANK):
            continue
        text = _decode(f, line)
        where = lambda line=line: _where(f, line)  # noqa: E731 - computed only for an error
        obj, ok = _parse_json(text, where, records)
        if ok and (doc := records.text_of(obj, where)) is not None:
            yield doc


def _json_array_documents(f: SourceFile, options: ReadOptions, counts: UnitCounts) -> Iterator[str]:
    with _open_stream(f) as fh:
        try:
            raw = fh.read()
        except UserError:
            raise
        except Exception as e:
            raise _archive_error(f, e) from None
    counts.bytes_read += len(raw)
    if b"\x00" in raw:
        raise DataError(f"{f.shown} holds NUL bytes: it looks binary, not JSON")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{f.shown} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); convert it to UTF-8") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{f.shown} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; truncated?); "
                        "fix it, or write it as JSON Lines (one object a line)") from None
    except RecursionError:
        raise DataError(f"{f.shown} holds JSON nested too deeply to read; write it as JSON Lines of flat objects") from None
    if not isinstance(items, list):
        raise DataError(f"{f.shown} holds a JSON {type(items).__name__}, not an array of objects; write the documents "
                        "as a JSON array or as JSON Lines (SQuAD files go through `openllm-ds prepare`)")
    records = _Records(f, options, counts)
    for i, obj in enumerate(items):
        if (doc := records.text_of(obj, lambda i=i: f"{f.shown} item {i}")) is not None:
            yield doc


def _table_documents(unit: Unit, options: ReadOptions, counts: UnitCounts) -> Iterator[str]:
    f = unit.file
    records = _Records(f, options, counts)
    row = 0
    try:
        if f.format == "parquet":
            pf = _open_table(f)
            row = sum(pf.metadata.row_group(i).num_rows for i in range(unit.start))
            batches = pf.iter_batches(batch_size=TABLE_BATCH_ROWS, row_groups=list(range(unit.start, unit.stop)),
                                      columns=[options.text_field], use_threads=False)
            columns = (b.column(0) for b in batches)
        else:
            selected = []
            for i, (b, _) in enumerate(_arrow_batches(f)):
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
