"""A user's corpus as units of work: sources -> files -> units that any worker reads on its own.

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

Units. Every file is cut into units that are read independently, by any worker, in any order: an
uncompressed text or JSON Lines file into byte ranges of ``unit_bytes`` (a document belongs to the
range its first byte lies in), a Parquet file into runs of row groups, an Arrow file into runs of
record batches, of about ``unit_bytes`` each; a compressed file or a JSON array is one unit. The
units depend only on the files and ``unit_bytes``, never on the number of workers. ``documents.py``
reads a unit's documents.
"""

from __future__ import annotations

import bz2
import dataclasses
import glob
import gzip
import io
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path

from openllm_ds.config import ReadOptions  # noqa: F401 - defined in the config layer, read here
from openllm_ds.errors import DataError, UserError
from openllm_ds.settings import env_flag
from openllm_ds.utils import first_line, read_json, read_manifest

UNIT_BYTES = 16 * 2**20
TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
COMPRESSIONS = {".gz": "gz", ".zst": "zst", ".bz2": "bz2", ".xz": "xz"}
SHARDS_SUFFIX = ".tokens"
SHARDS_KIND = "token shards"  # the kind a shards dir's manifest names (tokenizer/corpus.py writes them)
TABLE_BATCH_ROWS = 8192
BLANK = b" \t\r\n\f\v"


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


def source_identity(source: str, relative_to: str | Path | None = None) -> str:
    """What a source names, whatever its spelling: an ``hf:`` name as written, a glob's absolute pattern, a file or
    folder's resolved path (``./a.txt``, ``a.txt`` and a link to it are one source); with ``relative_to`` (a shards
    dir's parent), a path relative to it, which stays the same when the two move together."""
    source = str(source)
    if is_hub_source(source):
        return source
    p = Path(source).expanduser()
    where = os.path.abspath(p) if is_glob(source) and not p.exists() else str(p.resolve())
    return os.path.relpath(where, Path(relative_to).resolve()) if relative_to is not None else where


def resolve_sources(sources: list[str] | tuple[str, ...], options: ReadOptions, what: str = "--input",
                    exclude: tuple[str | Path, ...] = ()) -> list[SourceFile]:
    """Every file of every source, in order. A file one source reaches twice (through a link) is read once; one
    that two sources reach (the same file listed twice under any spelling, a folder and a file in it) is refused,
    naming both. Files under ``exclude`` (the output dir being written) and under token shards dirs are never read."""
    if not sources:
        raise UserError(f"{what}: give at least one source (a file, directory, glob or hf:NAME)")
    skip = tuple(Path(e).expanduser().resolve() for e in exclude)
    files: list[SourceFile] = []
    seen: dict[str, int] = {}  # file -> the source that reached it first
    added: set[str] = set()
    for i, source in enumerate(sources):
        found = [f for f in _files_of(str(source), what, skip) if not _excluded(Path(f.path), skip)]
        if not found:
            raise DataError(f"{what} {source} matches no files; check the path or pattern")
        for f in found:
            first = seen.setdefault(f.path, i)
            if first == i and f.path in added:
                continue  # a link to a file of the same source
            if first == i:
                added.add(f.path)
                files.append(f)
                continue
            raise UserError(f"{what} {sources[first]} and {source} both reach the file {f.path}; list each file "
                            "once (pass one of them, or a glob that leaves the file out)")
    for f in files:
        if f.format in ("parquet", "arrow"):
            check_table_schema(f, options)
    return files


def _excluded(path: Path, skip: tuple[Path, ...]) -> bool:
    """Is ``path`` under an excluded dir, or inside a token shards dir (a glob's match there)?"""
    return any(s == path or s in path.parents for s in skip) or _is_shards_dir(path.parent)


def _files_of(source: str, what: str, skip: tuple[Path, ...] = ()) -> list[SourceFile]:
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
        return walk(p, source, skip)
    if is_glob(source):
        matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
        return [source_file(m, source, strict=False) for m in matches if m.is_file() and not _hidden(m.name)]
    raise DataError(f"{what} {source} does not exist; run `openllm-ds prepare` first, or pass an existing file, "
                    "folder, glob pattern or hf:NAME")


def walk(folder: Path, source: str, skip: tuple[Path, ...] = ()) -> list[SourceFile]:
    """Files under ``folder``, recursively, in path order; hidden entries, token shards dirs and the dirs in
    ``skip`` (resolved: the output being written) left out, and a ``save_to_disk`` dataset read as one."""
    if _is_saved_dataset(folder):
        return saved_dataset_files(folder, source)
    out = []
    for entry in sorted(folder.iterdir()):
        if _hidden(entry.name) or (entry.is_dir() and (_is_shards_dir(entry) or entry.resolve() in skip)):
            continue
        if entry.is_dir():
            out.extend(walk(entry, source, skip))
        elif entry.is_file():
            out.append(source_file(entry, source, strict=True))
    return out


def _is_saved_dataset(p: Path) -> bool:
    return (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _is_shards_dir(p: Path) -> bool:
    """A token shards dir: its manifest says so, or (written before manifests named their kind) it is a complete
    ``NAME.tokens`` dir."""
    manifest = read_manifest(p)
    if manifest is not None and manifest.kind is not None:
        return manifest.kind == SHARDS_KIND
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
    with open_stream(f) as fh:
        try:
            head = fh.read(4096)
        except UserError:
            raise
        except Exception as e:
            raise archive_error(f, e) from None
    return head.lstrip(BLANK + b"\xef\xbb\xbf").startswith(b"[")


def _dataset_dict_splits(p: Path) -> list[str]:
    try:
        return list(read_json(p / "dataset_dict.json", "save the dataset again with DatasetDict.save_to_disk")["splits"])
    except (UserError, KeyError, TypeError):
        return []


def saved_dataset_files(p: Path, source: str) -> list[SourceFile]:
    """The .arrow files of a ``Dataset.save_to_disk`` directory, in the dataset's order."""
    fix = "save the dataset again with Dataset.save_to_disk"
    state = read_json(p / "state.json", fix, "Hugging Face dataset state", expect=dict, error=DataError)
    try:
        names = [f["filename"] for f in state["_data_files"]]
    except (KeyError, TypeError) as e:
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
    offline = any(env_flag(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the Hub raises many types: ConnectionError, HfHubHTTPError, FileNotFoundError...
        reason = first_line(e)
        where = ("offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set) and it is not in the local cache"
                 if offline else "the Hugging Face Hub could not provide it")
        raise DataError(f"cannot load {source}: {where} ({reason}); on a machine with internet run "
                        f"datasets.load_dataset({name!r}, {config!r}, split={split!r}).save_to_disk(DIR) and pass "
                        "DIR instead") from None
    return [source_file(Path(f["filename"]), source, strict=False) for f in ds.cache_files]


def check_table_schema(f: SourceFile, options: ReadOptions) -> None:
    import pyarrow as pa

    schema = open_table(f).schema_arrow if f.format == "parquet" else _arrow_schema(f)
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
        raise UserError(f"--unit_bytes (tokenizer.unit_bytes) must be >= 1, got {unit_bytes}")
    units: list[Unit] = []
    for f in files:
        for start, stop in _unit_ranges(f, unit_bytes):
            units.append(Unit(len(units), f, start, stop))
    return units


def _unit_ranges(f: SourceFile, unit_bytes: int) -> list[tuple[int, int]]:
    if f.format in ("parquet", "arrow"):
        sizes = _row_group_bytes(f) if f.format == "parquet" else [b for _, b in arrow_batches(f)]
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


def open_table(f: SourceFile):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(f.path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError...
        raise DataError(f"{f.shown} is not a readable Parquet file ({str(e)[:200]}); replace it") from None


def _row_group_bytes(f: SourceFile) -> list[int]:
    meta = open_table(f).metadata
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


def arrow_batches(f: SourceFile):
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


def open_stream(f: SourceFile):
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


def archive_error(f: SourceFile, e: Exception) -> DataError:
    reason = str(e).strip()[:200] or type(e).__name__
    return DataError(f"{f.shown} is a truncated or corrupt .{f.compression or f.format} file ({reason}); "
                     "download or compress it again")
