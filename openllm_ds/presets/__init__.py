"""The files that ship with the package: run presets (configs/), DeepSpeed JSONs (ds_configs/) and harness task
YAMLs (eval/). In a clone they are the repository's top-level folders; an installed wheel carries them as
``openllm_ds/presets/<folder>`` (pyproject.toml maps the folders there), so preset names work from any directory.
"""

from __future__ import annotations

from pathlib import Path

from openllm_ds.errors import ConfigError
from openllm_ds.paths import missing_reason

PACKAGE = Path(__file__).resolve().parents[1]  # openllm_ds/


def shipped_dir(folder: str) -> Path:
    """``configs``, ``ds_configs`` or ``eval``: inside the installed package, else the clone's top-level folder."""
    for d in (PACKAGE / "presets" / folder, PACKAGE.parent / folder):
        if d.is_dir():
            return d
    return PACKAGE / "presets" / folder  # neither: the caller's lookups find nothing and say so


def preset_names() -> list[str]:
    return sorted(p.stem for p in shipped_dir("configs").glob("*.yaml"))


def config_file(arg: str | Path) -> Path:
    """``--config``: a YAML path, or the name of a shipped preset (tiny, small, medium, large)."""
    p = Path(arg).expanduser()
    if p.is_file():
        return p
    shipped = shipped_dir("configs") / f"{p.stem if p.suffix in ('.yaml', '.yml') else p.name}.yaml"
    if not p.exists() and p.parent in (Path("."), Path("configs")) and shipped.is_file():
        return shipped
    why = "is a directory, not a file" if p.is_dir() else missing_reason(p)
    raise ConfigError(f"--config {arg} {why}; pass a YAML file or a preset name "
                      f"({', '.join(preset_names()) or 'none shipped'})")


def ds_config_file(value: str | Path) -> Path:
    """train.ds_config: the path as given; when it does not exist and names a shipped JSON (``zero2``,
    ``zero2.json`` or ``ds_configs/zero2.json``), the shipped one (a preset's default works from any directory)."""
    p = Path(value).expanduser()
    if p.exists() or p.parent not in (Path("."), Path("ds_configs")):
        return p
    shipped = shipped_dir("ds_configs") / (p.name if p.suffix == ".json" else f"{p.name}.json")
    return shipped if shipped.is_file() else p


def resolve_beside(value: str, yaml_file: Path) -> str:
    """A relative file path written in a YAML: the file beside the YAML when it exists there (presets name
    their own files), else as written (relative to the current directory)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return value
    beside = yaml_file.resolve().parent / p
    return str(beside) if beside.exists() else value
