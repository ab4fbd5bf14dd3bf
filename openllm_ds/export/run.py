"""``export``: the export stage's run, whatever the format (``formats.FORMATS``).

``export(ExportConfig(...))`` loads the weights through the read side (``openllm_ds.checkpoint.load_model``: a
training output, a step dir, a DeepSpeed tag of ZeRO shards or another export), writes the chosen format into a
temporary sibling of the output dir, verifies it there, and only then moves it into place: a failed export leaves
no directory a later stage would take for complete.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from openllm_ds.checkpoint import LoadedModel, load_model
from openllm_ds.config import ExportConfig
from openllm_ds.errors import UserError, VerificationError
from openllm_ds.export.common import check_output_dir, export_kind
from openllm_ds.export.formats import FORMATS, format_choices
from openllm_ds.output_lock import OutputLock
from openllm_ds.utils import _umask, atomic_dir

def export(cfg: ExportConfig, checkpoint: int | None = None) -> dict:
    """Export ``cfg.model_dir`` (step ``checkpoint``, default latest) to ``cfg.format``; return a report."""
    if cfg.format not in FORMATS:
        raise UserError(f"--format must be one of {format_choices(', ')}, got {cfg.format!r}")
    fmt = FORMATS[cfg.format]
    if not cfg.model_dir:
        raise UserError("--model_dir is required: a training output (models/NAME) or an export dir")
    own = {field for _, field in fmt.options}
    others = [field for f in FORMATS.values() for _, field in f.options if field not in own and getattr(cfg, field)]
    if others:
        users = [f.name for f in FORMATS.values() if any(field == others[0] for _, field in f.options)]
        raise UserError(f"{' and '.join('--' + o for o in dict.fromkeys(others))} apply to --format "
                        f"{' or '.join(users)} only")
    if cfg.dtype not in fmt.dtypes:
        allowed = [f.name for f in FORMATS.values() if cfg.dtype in f.dtypes]
        raise UserError(f"--dtype {cfg.dtype} applies to {' and '.join(allowed)} exports; {fmt.name.upper()} export is "
                        f"{' or '.join(fmt.dtypes)}" + (f" ({fmt.dtype_hint})" if fmt.dtype_hint else ""))
    if checkpoint is None:
        checkpoint = cfg.checkpoint
    out = Path(cfg.output_dir or f"exports/{cfg.format}")
    with OutputLock(out, "export"):  # one writer at a time in the output dir
        check_output_dir(out, Path(cfg.model_dir), cfg.overwrite, cfg.format)
        return _export(cfg, checkpoint, out, Path(cfg.model_dir))


def _export(cfg: ExportConfig, checkpoint: int | None, out: Path, model_dir: Path) -> dict:
    start = time.perf_counter()
    stages = ["load", "write + verify" if cfg.verify else "write", "move into place"]
    with tqdm(total=len(stages), desc=f"export {cfg.format}", unit="stage") as bar:
        bar.set_postfix_str(stages[0])
        src = load_source(model_dir, checkpoint)
        bar.update()
        bar.set_postfix_str(stages[1])
        try:
            with atomic_dir(out, export_kind(cfg.format)) as tmp:
                report = _write(cfg, src, tmp)
                readable_by_all(tmp)
                files = sorted(p.name for p in tmp.iterdir() if p.is_file())
                sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
                bar.update()
                bar.set_postfix_str(stages[2])
        except VerificationError as e:
            raise VerificationError(f"{e}; nothing was written to {out}") from None
        bar.update()
    return {
        "format": cfg.format,
        "output_dir": str(out),
        "files": files,
        "bytes": sum(sizes.values()),
        "num_params": src.model.num_params(),
        "step": src.step,
        "source": str(src.path),
        **report,
        "seconds": round(time.perf_counter() - start, 2),
    }


def temporary_export(model_dir: str | Path, fmt: str, checkpoint: int | None = None) -> tuple[Path, Callable[[], None]]:
    """Export ``model_dir`` to ``fmt`` in a new temporary dir, as ``openllm-ds export`` does (the serving backends'
    on-the-fly export): (the export dir, a function that removes it)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"openllm-ds-{fmt}-"))
    remove = functools.partial(shutil.rmtree, tmp, ignore_errors=True)
    out = tmp / fmt
    print(f"exporting {model_dir} to {fmt} in {out} for --backend {fmt}")
    try:
        export(ExportConfig(model_dir=str(model_dir), format=fmt, output_dir=str(out)), checkpoint=checkpoint)
    except BaseException:
        remove()
        raise
    return out, remove


def load_source(model_dir: str | Path, checkpoint: int | None = None) -> LoadedModel:
    """The weights to export, in fp32 on the CPU, with their tokenizer (its vocabulary checked)."""
    src = load_model(model_dir, checkpoint, dtype=torch.float32)
    src.tokenizer  # noqa: B018 - a tokenizer that does not fit the weights stops the export before any work
    return src


def readable_by_all(root: Path) -> None:
    """Files get the usual mode (0644 under umask 022), whatever wrote them: safetensors and the ONNX writers
    create 0600 files, which a server running as another user could not read."""
    umask = _umask()
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _write(cfg: ExportConfig, src: LoadedModel, tmp: Path) -> dict:
    fmt = FORMATS[cfg.format]
    options = {keyword: getattr(cfg, field) for keyword, field in fmt.options}
    return fmt.load_writer()(src, tmp, cfg.dtype, cfg.verify, **options)
