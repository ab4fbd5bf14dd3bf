"""The official SQuAD download: four files, each checked against its published sha256.

A file already in the cache whose hash matches is not fetched again. A download goes to a
temporary name in the cache and is renamed only once its hash matches, so the cache never holds
a partial or corrupt file under an official name.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from openllm_ds.errors import DataError
from openllm_ds.utils import ensure_writable_dir, sha256_file

SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/"
OFFLINE_FIX = "without internet, pass --squad_dir DIR with SQuAD JSON files (train-v1.1.json, dev-v1.1.json, ...)"


class SquadFile(NamedTuple):
    name: str
    url: str
    sha256: str


OFFICIAL_FILES: tuple[SquadFile, ...] = (
    SquadFile("train-v1.1.json", SQUAD_URL + "train-v1.1.json",
              "3527663986b8295af4f7fcdff1ba1ff3f72d07d61a20f487cb238a6ef92fd955"),
    SquadFile("dev-v1.1.json", SQUAD_URL + "dev-v1.1.json",
              "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"),
    SquadFile("train-v2.0.json", SQUAD_URL + "train-v2.0.json",
              "68dcfbb971bd3e96d5b46c7177b16c1a4e7d4bdef19fb204502738552dede002"),
    SquadFile("dev-v2.0.json", SQUAD_URL + "dev-v2.0.json",
              "80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8"),
)


def download_official(cache_dir: str | Path, files: tuple[SquadFile, ...] | None = None) -> list[Path]:
    """Make sure every official file (default OFFICIAL_FILES) is in ``cache_dir``; return their paths."""
    files = OFFICIAL_FILES if files is None else files
    cache = ensure_writable_dir(Path(cache_dir).expanduser(), "data.cache_dir")
    return [fetch_verified(f.url, cache / f.name, f.sha256) for f in files]


def fetch_verified(url: str, dest: Path, sha256: str, timeout_s: float = 60.0) -> Path:
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        digest = _fetch(url, tmp, dest.name, timeout_s)
        if digest != sha256:
            raise DataError(
                f"{url} downloaded with sha256 {digest[:16]}... but the published hash is {sha256[:16]}...; "
                f"the download is corrupt or changed upstream: run again, or {OFFLINE_FIX}"
            )
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dest


def _fetch(url: str, tmp: Path, desc: str, timeout_s: float) -> str:
    """Stream ``url`` into ``tmp`` with a progress bar; return the sha256 of the bytes."""
    try:
        response = urllib.request.urlopen(url, timeout=timeout_s)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"cannot download {url} ({reason}); check the connection, or {OFFLINE_FIX}") from None
    digest = hashlib.sha256()
    total = int(response.headers.get("Content-Length") or 0) or None
    with response, open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
        while True:
            try:
                chunk = response.read(1 << 20)
            except (OSError, http.client.HTTPException) as e:
                raise DataError(f"download of {url} was interrupted ({e}); run again, or {OFFLINE_FIX}") from None
            if not chunk:
                break
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()
