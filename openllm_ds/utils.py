"""Small shared helpers: atomic writes, hashing, Ray start-up, rank-0 printing, the CPU allocator."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from openllm_ds.errors import UserError


def select_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message, its first line (at most ``limit`` characters), or its type's name: for an error
    line that quotes what a library raised."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def keep_freed_memory() -> bool:
    """glibc: serve large allocations from the heap and keep what is freed there, instead of mapping
    fresh pages for each one and unmapping them on free (its default for blocks above a threshold that
    adapts from 128 KiB up to 32 MiB).

    A training step on a CPU allocates and frees the same large buffers every step (activations,
    logits, flat gradient partitions); fresh pages cost a zero-filling page fault on first touch,
    8-14% of a tiny-preset step on the 2-core VM this was measured on (benchmarks/bench_train.py).
    The process keeps its peak heap instead.
    Returns whether it took effect (False off glibc: nothing changes)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def ensure_writable_dir(path: str | Path, what: str = "output dir") -> Path:
    """Create ``path`` (and parents) or fail with a message naming it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p} is a file, not a directory; pass a directory (or move the file away)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{what} {p} is not writable ({e.strerror}); choose another directory or fix its permissions") from None
    return p


def check_output_file(path: str | Path, what: str) -> Path:
    """Before any work: ``path`` can receive a file (not a directory, its parent not a file, writable)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {p} is a directory; name a file in it, e.g. {p / 'report.json'}")
    parent = next((a for a in p.parents if a.exists()), Path("."))
    if not parent.is_dir():
        raise UserError(f"{what} {p}: {parent} is a file, not a directory; choose another path")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{what} {p}: {parent} is not writable; choose another path or fix its permissions")
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


MANIFEST = ".openllm-ds-files"  # in every directory a stage writes: which kind of output it is, who wrote it, its entries
KIND_LINE, STAGE_LINE = "# kind: ", "# written by: "


@dataclass(frozen=True)
class OutputKind:
    """What a stage writes into a directory: ``name`` in messages ("token shards"), ``stage`` the command that writes
    it, and ``ours``: the entry names this kind holds, to recognise a directory written before manifests named their
    kind (or before there were manifests)."""

    name: str
    stage: str
    ours: Callable[[str], bool] = lambda name: False


@dataclass(frozen=True)
class Manifest:
    kind: str | None  # None: written before manifests named their kind
    stage: str | None
    files: frozenset[str]


def read_manifest(path: str | Path) -> Manifest | None:
    """The manifest of the directory ``path``, None when it has none. The format: ``# kind: NAME`` and
    ``# written by: COMMAND``, then one entry name a line (older versions wrote the names alone)."""
    f = Path(path) / MANIFEST
    try:
        text = f.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    kind = stage = None
    files = set()
    for line in text.splitlines():
        if line.startswith(KIND_LINE):
            kind = line[len(KIND_LINE):].strip() or None
        elif line.startswith(STAGE_LINE):
            stage = line[len(STAGE_LINE):].strip() or None
        elif line:
            files.add(line)
    return Manifest(kind, stage, frozenset(files))


def write_manifest(path: str | Path, kind: OutputKind, names: Iterable[str]) -> None:
    lines = [KIND_LINE + kind.name, STAGE_LINE + kind.stage, *sorted(n for n in names if n != MANIFEST)]
    (Path(path) / MANIFEST).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def claim_output_dir(path: str | Path, kind: OutputKind, what: str = "output dir", names: Iterable[str] = ()) -> list[str]:
    """The one check before a stage writes into the directory ``path`` (every stage's writer calls it, and
    ``atomic_dir`` again before its swap): a stage replaces or deletes only what this same stage wrote, of this
    same kind. Refused with a UserError naming ``path``, what it holds and who wrote it:

    - ``path`` is a file;
    - its manifest names another kind of output (an export, a tokenizer, token shards, a checkpoint, cleaned data);
    - its manifest names no kind (written by an older version): its entries count as this kind's only when
      ``kind.ours`` accepts every one of them; otherwise another stage wrote them.

    Returns the entries that no stage wrote: neither listed in the manifest, nor among ``names`` (what the new
    output holds), nor of this kind (``kind.ours``, for a directory written before there were manifests). A stage
    that replaces the directory whole must refuse them (the user's files); one that only adds its own files to it
    may leave them.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p} is a file, not a directory; pass a directory (or move the file away)")
    if not p.is_dir():
        return []
    manifest = read_manifest(p)
    listed = manifest.files if manifest else frozenset()
    if manifest and manifest.kind and manifest.kind != kind.name:
        raise UserError(f"{what} {p} is the output of `{manifest.stage}` ({manifest.kind}); `{kind.stage}` writes "
                        f"{kind.name} and replaces only its own: choose another directory, or delete {p} yourself if "
                        "you no longer need it")
    if manifest and not manifest.kind:
        others = sorted(n for n in listed if not kind.ours(n) and (p / n).exists())
        if others:
            raise UserError(f"{what} {p} holds {describe_entries(others)}, written by another openllm-ds stage (listed "
                            f"in its {MANIFEST}); `{kind.stage}` writes {kind.name} and replaces only its own: choose "
                            "another directory")
    known = set(names) | listed | {MANIFEST}
    return sorted(e.name + ("/" if e.is_dir() else "") for e in p.iterdir() if e.name not in known and not kind.ours(e.name))


def describe_entries(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


@contextlib.contextmanager
def atomic_dir(path: str | Path, kind: OutputKind) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` whole.

    A crash leaves ``path`` as it was (or absent), never half-written. The new directory's manifest names ``kind``
    and lists its entries. ``path`` is replaced only when ``claim_output_dir`` finds it holds this kind of output
    and nothing else: another stage's output or a user's file stops the swap with an error naming it, and nothing
    is deleted.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        names = sorted(e.name for e in tmp.iterdir())
        write_manifest(tmp, kind, names)
        if p.exists():
            foreign = claim_output_dir(p, kind, names=names)
            if foreign:
                raise UserError(f"{p} holds {describe_entries(foreign)}, which openllm-ds did not write; nothing was "
                                f"replaced: move them out of {p} or choose another output directory")
            old = p.with_name(f".{p.name}.old-{os.getpid()}")
            os.replace(p, old)
            os.replace(tmp, p)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- the one reader policy: every file the project reads (configs, checkpoints' small files, exports' JSON,
# score-squad's inputs, task YAMLs) goes through read_text, read_json or read_yaml. A file that is missing, a
# directory, unreadable, not UTF-8, holding NUL bytes, truncated, nested too deep or of the wrong top-level type
# stops with one line naming it and the fix, never a traceback.

MAX_SMALL_FILE = 64 << 20  # read whole: configs, states, cards; anything larger is not one of them
JSON_KINDS = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "null"}
YAML_KINDS = {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "nothing (an empty file)"}
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _named(path: Path, what: str | None) -> str:
    return f"{what} {path}" if what else str(path)


def read_text(path: str | Path, fix: str, what: str | None = None, error: type[UserError] = UserError) -> str:
    """A small text file, whole: UTF-8 (a byte-order mark allowed) with no NUL byte. ``what`` names it in messages
    (``"train.ds_config"``: "train.ds_config x.json is ..."), ``fix`` says what to do, ``error`` is the UserError
    class raised."""
    p = Path(path)
    name = _named(p, what)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_SMALL_FILE + 1)
    except FileNotFoundError:
        from openllm_ds.paths import missing_reason

        raise error(f"{name} {missing_reason(p)}; {fix}") from None
    except IsADirectoryError:
        raise error(f"{name} is a directory, not a file; {fix}") from None
    except OSError as e:
        raise error(f"cannot read {name} ({e.strerror}); {fix}") from None
    if len(raw) > MAX_SMALL_FILE:
        raise error(f"{name} is larger than {MAX_SMALL_FILE >> 20} MiB, too large for this kind of file; {fix}")
    return decode_text(raw, name, fix, error)


def decode_text(raw: bytes, name: str, fix: str, error: type[UserError] = UserError) -> str:
    """Bytes read whole as text by read_text's rules (UTF-8, a byte-order mark allowed, no NUL byte): a file's, or
    an archive member's; ``name`` names it in messages."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise error(f"{name} holds a NUL byte at offset {nul}: it is binary or damaged, not text; {fix}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{name} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); {fix}") from None


def parse_json(text: str, constants: bool = True, lone_surrogates: bool = False) -> Any:
    """JSON text to Python, or a ValueError saying why not in a few words (the one JSON parser: files and HTTP
    request bodies alike). A string holding an unpaired UTF-16 surrogate escape ("\\ud800") is refused: it is no
    text any encoder, tokenizer or JSON writer can take; ``lone_surrogates``: kept instead, for corpus documents,
    whose cleaning replaces them. ``constants``: NaN and Infinity are read (Python's json writes them) or refused
    (they are not JSON)."""
    try:
        obj = json.loads(text) if constants else json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        # the text ends inside the document: at its end, or inside a string that never closes
        ends_early = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")
        truncated = "; truncated?" if ends_early else ""
        raise ValueError(f"{e.msg} at line {e.lineno} column {e.colno}{truncated}") from None
    except RecursionError:
        raise ValueError("nested too deeply to read") from None
    except ValueError as e:  # a refused constant, an integer of more than 4300 digits
        raise ValueError(str(e)[:200]) from None
    if not lone_surrogates and "\\u" in text and _holds_lone_surrogate(obj):
        raise ValueError("it holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)")
    return obj


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _holds_lone_surrogate(obj: Any) -> bool:
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if _LONE_SURROGATE.search(x):
                return True
        elif isinstance(x, dict):
            stack += x.keys()
            stack += x.values()
        elif isinstance(x, list):
            stack += x
    return False


def _check_kind(obj: Any, expect, kinds: dict, name: str, fix: str, error: type[UserError]) -> Any:
    """``obj`` when it is one of the types ``expect`` names (None: any); an allowed None goes unmentioned."""
    expected = expect if isinstance(expect, tuple) else (expect,)
    if expect is not None and not isinstance(obj, expected):
        want = " or ".join(dict.fromkeys(kinds.get(t, t.__name__) for t in expected if t is not type(None)))
        raise error(f"{name} must hold {want}, not {kinds.get(type(obj), type(obj).__name__)}; {fix}")
    return obj


def read_json(path: str | Path, fix: str, what: str | None = None, expect=None,
              error: type[UserError] = UserError) -> Any:
    """A JSON file (read_text's rules, then parse_json's); ``expect``: the top-level type(s) it must hold
    (``dict``: an object)."""
    p = Path(path)
    return json_of_text(read_text(p, fix, what, error), _named(p, what), fix, expect, error)


def json_of_text(text: str, name: str, fix: str, expect=None, error: type[UserError] = UserError,
                 lone_surrogates: bool = False) -> Any:
    """parse_json's reading of ``text`` (a file's, read by read_text or decode_text), its errors one line naming
    ``name`` and ``fix``; ``expect``: the top-level type(s) it must hold."""
    try:
        obj = parse_json(text, lone_surrogates=lone_surrogates)
    except ValueError as e:
        raise error(f"{name} is not valid JSON ({e}); {fix}") from None
    return _check_kind(obj, expect, JSON_KINDS, name, fix, error)


def read_yaml(path: str | Path, fix: str, what: str | None = None, expect=None,
              error: type[UserError] = UserError) -> Any:
    """As read_json, for a YAML file (PyYAML's safe loader: plain data only); an empty file is None."""
    import yaml

    p = Path(path)
    name = _named(p, what)
    text = read_text(p, fix, what, error)
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise error(f"{name} is not valid YAML ({problem}{where}); {fix}") from None
    except RecursionError:
        raise error(f"{name} is not valid YAML (nested too deeply to read); {fix}") from None
    return _check_kind(obj, expect, YAML_KINDS, name, fix, error)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_job_outputs(outputs: dict[str, str | None]) -> None:
    """In a `ray job submit` driver, which runs in a temporary copy of --working-dir that Ray deletes later
    (``.../runtime_resources/working_dir_files/...``), every output path must be absolute: a relative one
    would land in that copy and be lost. ``outputs``: flag -> path (None: the flag's relative default)."""
    from openllm_ds.paths import expand_path

    if "working_dir_files" not in Path.cwd().parts:
        return
    for flag, path in outputs.items():
        if not path or not expand_path(path).is_absolute():  # ~/models is absolute once expanded
            raise UserError(f"{flag} {path or '(not given)'}: a Ray job runs in a temporary copy of --working-dir "
                            "that Ray deletes later; pass an absolute path on storage every node mounts, e.g. "
                            f"{flag.split()[0]} /shared/...")


def start_local_ray(**kwargs) -> None:
    """Start a private local Ray instance (``ray.init(address="local", **kwargs)``: never a head found on
    this machine) whose servers listen on loopback only: GCS, raylet, the core worker of the driver and of
    every worker, the dashboard and runtime-env agents, the metrics exporters.

    Ray binds them to loopback when the node's address is a loopback one, else to all interfaces or the
    routable address. ``ray.init(_node_ip_address="127.0.0.1")`` does not get there: Ray replaces a
    loopback address with the routable one (``ray._private.services.resolve_ip_for_localhost``) unless its
    multi-node support is off (``ray_constants.ENABLE_RAY_CLUSTER``, which ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
    sets when Ray is imported); then the node's address is 127.0.0.1. It is off in this process for the
    ``ray.init`` call only: the processes Ray starts get the address on their command line."""
    import ray
    from ray._private import ray_constants

    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node


def init_ray(num_cpus: int | None = None):
    """Connect to the cluster in ``RAY_ADDRESS`` (``settings.ray_address``) or start a local instance listening on loopback only
    (the embedded default, see start_local_ray)."""
    import ray

    if ray.is_initialized():
        return ray
    from openllm_ds.settings import ray_address

    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False}
    address = ray_address()
    if address:
        ray.init(address=address, **kwargs)
    else:
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        start_local_ray(include_dashboard=False, **kwargs)
    # one progress bar per stage is ours; Ray Data's own bars only add noise. Importing ray.data here (pandas...)
    # would cost a stage that does not use it most of a second: its default is read from the environment on import
    if "ray.data" in sys.modules:
        sys.modules["ray.data"].DataContext.get_current().enable_progress_bars = False
    else:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    return ray
