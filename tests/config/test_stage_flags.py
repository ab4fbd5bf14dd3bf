"""Every stage's flags come from its config types' fields (config.STAGES, config.fields.add_flags), and the config
layer imports no stage."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from openllm_ds.cli import build_parser
from openllm_ds.config import STAGES, add_flags, setting, stage_config
from openllm_ds.config.fields import flag_fields, flag_name

ROOT = Path(__file__).resolve().parents[2]
CLI_ONLY = {"-h", "--help"}
ALIASES = {"serve": {"--max_length", "--model_path"}, "generate": {"--max_length"}}  # the old names


def subparsers() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stages_flags_are_its_config_fields(stage):
    parser = subparsers()[stage]
    flags = {o for a in parser._actions for o in a.option_strings} - CLI_ONLY - ALIASES.get(stage, set())
    want = set()
    for cls, section, owner in STAGES[stage]:
        for f in flag_fields(cls, stage, owner):
            name = flag_name(f)
            want |= {name, *f.metadata["aliases"]}
            if name.startswith("--no_"):
                want.add("--no-" + name[5:].replace("_", "-"))
            if f.type in (bool, "bool") and f.default is True and not section:
                want.add("--no-" + name[2:])  # BooleanOptionalAction's --no-verify
    assert flags == want - ALIASES.get(stage, set())
    for a in parser._actions:  # every flag has help (its field's), unless hidden on purpose
        if a.option_strings and a.help != argparse.SUPPRESS and a.dest != "help":
            assert a.help, a.option_strings


def test_a_new_field_is_a_new_flag():
    @dataclass(frozen=True)
    class Demo:
        window: int = setting(4, "tokens a window holds")
        names: tuple[str, ...] = setting((), "one or more names")
        quiet: bool = setting(False, "say less")
        internal: int = 3  # no help: no flag

    p = argparse.ArgumentParser()
    assert add_flags(p, Demo, "demo") == [("window", "--window"), ("names", "--names"), ("quiet", "--quiet")]
    args = p.parse_args(["--window", "7", "--names", "a", "b", "--quiet"])
    assert dataclasses.asdict(stage_config(Demo, args)) == {"window": 7, "names": ["a", "b"], "quiet": True,
                                                            "internal": 3}
    assert stage_config(Demo, p.parse_args([])) == Demo()
    with pytest.raises(SystemExit):
        p.parse_args(["--window", "nan"])


def test_kebab_and_snake_spellings_and_the_precedence():
    from openllm_ds.cli import run_config_from_args

    args = build_parser().parse_args(["train", "--config", "tiny", "--batch-size", "3", "--batch_size", "4",
                                      "train.micro_batch_size=5", "--no-dedup"])
    cfg = run_config_from_args(args)
    assert cfg.train.micro_batch_size == 5 and cfg.tokenizer.dedup is False  # override > flag > preset
    assert run_config_from_args(build_parser().parse_args(["train", "--config", "tiny", "--batch-size", "3"])) \
        .train.micro_batch_size == 3


STAGE_PACKAGES = ("data", "tokenizer", "model", "train", "evaluation", "export", "checkpoint", "inference", "serve",
                  "pipeline", "cli", "api")


def test_the_config_layer_imports_no_stage():
    """Statically (every import in openllm_ds/config/), and at run time (what `import openllm_ds.config` loads)."""
    for path in sorted((ROOT / "openllm_ds" / "config").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                parts = name.split(".")
                if parts[0] == "openllm_ds" and len(parts) > 1 and parts[1] in STAGE_PACKAGES:
                    assert name == "openllm_ds.export.formats", f"{path.name} imports {name}"  # the format table
    probe = "import sys, openllm_ds.config; print(sorted(sys.modules))"
    loaded = eval(subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True,
                                 env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout)
    stages = [m for m in loaded if m.startswith("openllm_ds.") and m.split(".")[1] in STAGE_PACKAGES and m not in
              ("openllm_ds.export", "openllm_ds.export.formats")]
    assert stages == [] and "torch" not in loaded  # no stage, and none of their weight
