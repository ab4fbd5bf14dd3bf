"""EleutherAI's lm-evaluation-harness on an export, with the task YAMLs that ship in the package.

``openllm-ds lm-eval ARGS`` is lm-eval's own command line (``lm_eval ARGS``) with ``--include_path`` set to the
shipped task folder (``eval/lm_eval`` in a clone, ``openllm_ds/presets/eval/lm_eval`` when installed), so the
tasks are found by name from any directory. Each task reads one local data file, a path in its YAML's
``metadata`` under the key its ``dataset_kwargs.data_key`` names (``validation_file``, ``wikitext_file``,
``squad_v1_file``, ``squad_v2_file``), overridden with lm-eval's own ``--metadata '{"squad_v1_file": "PATH"}'``.
A relative path is looked for as the built-in harness looks for ``data:`` (``tasks.resolve_data_path``): the
working directory, then the repository root. Every data file of the requested tasks is checked before lm-eval
loads the model; the YAMLs' ``custom_dataset`` functions (``eval/lm_eval/utils.py``) resolve them with the same
``data_file``. An ``--include_path`` of the user's own replaces the shipped folder.

From Python: ``lm_eval.tasks.TaskManager(include_path=str(tasks_dir()))``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from openllm_ds.errors import UserError

INSTALL = "pip install 'openllm-ds[lm-eval]' (from a clone: pip install -e '.[lm-eval]')"


def tasks_dir() -> Path:
    from openllm_ds.presets import shipped_dir

    return shipped_dir("eval") / "lm_eval"


class _TaskLoader(yaml.SafeLoader):
    """lm-eval's YAML with its ``!function`` tags read as plain strings (only ``metadata`` is needed here)."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def task_files() -> dict[str, Path]:
    """Task name -> YAML of the shipped lm-eval tasks."""
    return {f.stem: f for f in sorted(tasks_dir().glob("*.yaml"))}


def data_file(task: str, data_key: str, **metadata) -> Path:
    """The data file of ``task``: ``metadata[data_key]`` (lm-eval's ``--metadata`` over the YAML's own), resolved
    as the built-in harness resolves ``data:``; a UserError naming the task, the places tried and the fix."""
    from openllm_ds.evaluation.tasks import resolve_data_path

    value = metadata.get(data_key)
    if not isinstance(value, str) or not value:
        raise UserError(f"lm-eval task {task}: metadata {data_key!r} must be a file path, got {value!r}; pass "
                        f"--metadata '{{\"{data_key}\": \"PATH\"}}'")
    fix = f"pass the file with --metadata '{{\"{data_key}\": \"PATH\"}}'"
    path = resolve_data_path(value, task_files().get(task), fix)
    if not path.is_file():
        raise UserError(f"lm-eval task {task}: {data_key} {path} is a directory, not a file; {fix}")
    return path


def task_config(task: str) -> dict:
    with open(task_files()[task], encoding="utf-8") as f:
        return yaml.load(f, Loader=_TaskLoader)


def _values(argv: list[str], name: str) -> list[str] | None:
    """The values after the last ``--name`` (up to the next flag), or of ``--name=V``; None when absent."""
    found = None
    for i, a in enumerate(argv):
        if a == name:
            found = []
            for v in argv[i + 1:]:
                if v.startswith("--"):
                    break
                found.append(v)
        elif a.startswith(name + "="):
            found = [a.split("=", 1)[1]]
    return found


def _metadata(values: list[str]) -> dict:
    """lm-eval's ``--metadata``: one JSON object, or ``key=value`` pairs."""
    example = "write e.g. --metadata '{\"squad_v1_file\": \"dev-v1.1.json\"}' or --metadata squad_v1_file=dev-v1.1.json"
    if values and values[0].lstrip().startswith("{"):
        try:
            out = json.loads(values[0])
        except json.JSONDecodeError as e:
            raise UserError(f"--metadata {values[0]!r} is not JSON ({e.msg}); {example}") from None
        if not isinstance(out, dict):
            raise UserError(f"--metadata {values[0]!r} is not a JSON object; {example}")
        return out
    out = {}
    for v in values:
        key, eq, value = v.partition("=")
        if not eq or not key:
            raise UserError(f"--metadata {v!r} is neither a JSON object nor key=value; {example}")
        out[key] = value
    return out


def check_data(argv: list[str]) -> list[tuple[str, Path]]:
    """Every shipped task named in ``--tasks`` with its data file (after ``--metadata``), found or a UserError."""
    overrides = _metadata(_values(argv, "--metadata") or [])
    shipped = task_files()
    found = []
    for task in ",".join(_values(argv, "--tasks") or []).split(","):
        if task in shipped:
            cfg = task_config(task)
            key = cfg["dataset_kwargs"]["data_key"]
            found.append((task, data_file(task, key, **{**cfg.get("metadata", {}), **overrides})))
    return found


def run_lm_eval(argv: list[str]) -> int:
    """``openllm-ds lm-eval ARGS``: lm-eval's command line with the shipped tasks included."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise UserError(f"lm-eval is not installed ({e}); {INSTALL}") from None
    for task, path in check_data(argv):
        print(f"{task}: {path}", file=sys.stderr)
    if _values(argv, "--include_path") is None:
        argv = [*argv, "--include_path", str(tasks_dir())]
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse's errors and --help
        return e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved
    return 0
