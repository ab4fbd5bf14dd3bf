"""SQuAD inputs: JSON files from a folder or the official download, or the Hugging Face Hub.

Every input becomes a ``SquadInput``: a name, a split and its raw paragraph contexts, in file order.

- A folder (``--squad_dir DIR``): every ``DIR/*.json`` (not recursive), in name order. A file is
  *validation* when its name contains "dev" (any case: dev-v1.1.json, dev-v2.0-part.json), else
  *train*. Every file must be SQuAD JSON (``data[].paragraphs[].context``); anything else in the
  folder is an error naming the file, not something silently skipped.
- The official download: the four files of ``download.OFFICIAL_FILES``, named by the same rule.
- The Hub: ``rajpurkar/squad`` and ``rajpurkar/squad_v2``, splits ``train`` and ``validation``.
  The Hub has one row per question, repeating the paragraph's context; consecutive repeats are
  folded when reading, so ``paragraphs`` counts paragraphs as the JSON files do.

Reading validates: an empty, non-UTF-8, truncated or non-SQuAD file raises ``DataError`` naming
the file and the fix. Lone surrogates (possible through JSON ``\\ud800`` escapes) are dropped here
because no UTF-8 encoder, Ray's included, can carry them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from openllm_ds.data.documents import parse_json
from openllm_ds.errors import DataError, UserError
from openllm_ds.utils import sha256_file

HUB_DATASETS = ("rajpurkar/squad", "rajpurkar/squad_v2")
SPLITS = ("validation", "train")  # processing order: validation first, so it wins duplicates


@dataclass(frozen=True)
class SquadInput:
    name: str  # file name, or "rajpurkar/squad:validation" for a Hub split
    split: str  # "train" | "validation"
    contexts: tuple[str, ...]
    num_bytes: int | None = None  # size of the JSON file
    sha256: str | None = None


def split_of(file_name: str) -> str:
    return "validation" if "dev" in file_name.lower() else "train"


def list_squad_dir(squad_dir: str | Path) -> list[Path]:
    folder = Path(squad_dir).expanduser()
    if not folder.exists():
        raise DataError(f"--squad_dir {folder} does not exist; pass a folder holding SQuAD JSON files (train-v1.1.json, dev-v1.1.json, ...)")
    if not folder.is_dir():
        raise DataError(f"--squad_dir {folder} is not a directory; pass the folder that holds the SQuAD JSON files")
    files = sorted(p for p in folder.glob("*.json") if p.is_file())
    if not files:
        raise DataError(f"--squad_dir {folder} holds no *.json files; put SQuAD files there (train-v1.1.json, dev-v1.1.json, ...) or drop --squad_dir to download them")
    return files


def read_squad_files(paths: list[Path]) -> list[SquadInput]:
    """Read and validate every file before anything is cleaned or written."""
    with tqdm(paths, desc="reading SQuAD files", unit="file") as bar:  # closed before an error is printed
        return [read_squad_file(p) for p in bar]


def read_squad_file(path: Path) -> SquadInput:
    fix = f"re-download it or remove it from {path.parent}"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); fix its permissions or {fix}") from None
    if not raw.strip():
        raise DataError(f"{path} is empty; {fix}")
    obj = parse_json(raw, str(path), fix)
    contexts = squad_contexts(obj, path)
    return SquadInput(path.name, split_of(path.name), contexts, num_bytes=len(raw), sha256=sha256_file(path))


def squad_contexts(obj, path: Path) -> tuple[str, ...]:
    """Every ``data[i].paragraphs[j].context`` of a parsed SQuAD file, in order."""
    fix = f"expected SQuAD JSON (data[].paragraphs[].context): remove {path.name} from {path.parent} or replace it with a SQuAD file"
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise DataError(f"{path} has no top-level 'data' list; {fix}")
    contexts = []
    for i, article in enumerate(obj["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"{path}: data[{i}] has no 'paragraphs' list; {fix}")
        for j, paragraph in enumerate(paragraphs):
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str):
                raise DataError(f"{path}: data[{i}].paragraphs[{j}] has no 'context' string; {fix}")
            contexts.append(_drop_lone_surrogates(context))
    if not contexts:
        raise DataError(f"{path} holds no paragraphs; {fix}")
    return tuple(contexts)


def _drop_lone_surrogates(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "ignore").decode("utf-8")


def load_hub(cache_dir: str | Path) -> list[SquadInput]:
    """SQuAD v1.1 and v2.0 from the Hugging Face Hub (cached under ``cache_dir/hub``)."""
    try:
        import datasets
    except ImportError:
        raise UserError("data.source=hub needs the `datasets` package (pip install datasets), or pass --squad_dir DIR") from None
    inputs = []
    for repo in HUB_DATASETS:
        try:
            splits = datasets.load_dataset(repo, cache_dir=str(Path(cache_dir).expanduser() / "hub"))
        except Exception as e:  # the Hub raises many types (ConnectionError, HfHubHTTPError, ...)
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise DataError(f"cannot load {repo} from the Hugging Face Hub ({reason}); check the connection and HF_HUB_OFFLINE, or pass --squad_dir DIR with SQuAD JSON files") from None
        for split in SPLITS:
            rows = splits[split].data.column("context").to_pylist()  # one row per question
            contexts = tuple(c for k, c in enumerate(rows) if k == 0 or c != rows[k - 1])
            inputs.append(SquadInput(f"{repo}:{split}", split, contexts))
    return inputs
