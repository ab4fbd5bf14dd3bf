"""Every command in the README's ```bash blocks parses: the openllm-ds CLI, the deepspeed and Ray job
entry points (their argv through the same parsers, and their run config resolved, so a preset or a
config key named there exists). What they do is tested by the stage tests; GPU and cluster commands
are checked this far."""

import re
import shlex
from pathlib import Path

import pytest

from openllm_ds.cli import build_parser, build_train_parser, run_config_from_args

ROOT = Path(__file__).resolve().parents[1]
# commands of other tools, not ours to parse
OTHER_TOOLS = ("scripts/setup.sh", "scripts/gpu_wheels.sh", ".venv/bin/python -m pytest", "tensorboard", "ray start", "python -m vllm",
               "pip install", "export RAY_AUTH_MODE=",
               ".venv-gguf/bin/python", ".venv-optimum/bin/python")


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a command continued with "\\" is one line
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    return commands


def ours(argv: list[str]) -> tuple[str, list[str]] | None:
    """('cli' | 'train', args) for a command line that runs this project's code; None for another tool's."""
    if argv[0] in ("openllm-ds", ".venv/bin/openllm-ds"):
        return ("lm-eval", argv[2:]) if argv[1] == "lm-eval" else ("cli", argv[1:])
    if argv[0] == "deepspeed":  # the documented launch: deepspeed ... --module openllm_ds train ...
        at = argv.index("--module")
        assert argv[at + 1:at + 3] == ["openllm_ds", "train"], argv
        return "train", argv[at + 3:]
    if argv[0] == "scripts/gpu_acceptance.sh":
        return "acceptance", [a for a in argv[1:] if a not in ("--with_vllm", "--skip_setup", "--rehearse")]
    if argv[:2] == [".venv/bin/python", "benchmarks/gpu_acceptance.py"]:
        return "acceptance", argv[2:]
    if argv[:3] == ["ray", "job", "submit"]:
        job = argv[argv.index("--") + 1:]
        assert job[0] == "python" and (ROOT / job[1]).is_file(), job
        script = Path(job[1]).stem
        return ("train", job[2:]) if script == "train" else ("cli", [{"eval": "evaluate", "tokenize_corpus": "tokenize"}
                                                                     .get(script, script), *job[2:]])
    return None


COMMANDS = readme_commands()


def check_ray_job_outputs(script: str, args: list[str], monkeypatch) -> None:
    """A README job writes to absolute paths: a relative one would land in the copy that Ray deletes."""
    from openllm_ds.utils import check_job_outputs

    name = Path(script).stem
    if name == "train":
        outputs = {"--output_dir": run_config_from_args(build_train_parser().parse_args(args)).output_dir}
    else:
        parsed = build_parser().parse_args(args)
        outputs = {"pipeline": {"--work_dir": getattr(parsed, "work_dir", None)},
                   "evaluate": {"--model_dir": getattr(parsed, "model_dir", None)},
                   "tokenize": {"--output_dir": getattr(parsed, "output_dir", None)}}[parsed.command]
    with monkeypatch.context() as m:
        m.setattr(Path, "cwd", classmethod(lambda cls: Path("/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_1")))
        check_job_outputs(outputs)


def test_the_readme_has_its_two_fresh_machine_commands():
    assert "scripts/setup.sh" in COMMANDS and ".venv/bin/python -m pytest -q" in COMMANDS
    assert ".venv/bin/openllm-ds pipeline --config configs/tiny.yaml" in COMMANDS
    test_command = "scripts/setup.sh --vllm --gguf --optimum && .venv/bin/python -m pytest -q"
    assert test_command in (ROOT / "README.md").read_text() and test_command in (ROOT / ".ci/run").read_text()


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # README commands run from the repo root
    argv = shlex.split(command)
    kind = ours(argv)
    if kind is None:
        assert command.startswith(OTHER_TOOLS), f"README command of an unknown tool: {command}"
        return
    which, args = kind
    if argv[:3] == ["ray", "job", "submit"]:  # as the job's driver sees it: in Ray's temporary copy of the working dir
        check_ray_job_outputs(argv[argv.index("--") + 2], args, monkeypatch)
    if which == "acceptance":
        monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
        import gpu_acceptance

        gpu_acceptance.parse_args(args)
        return
    if which == "lm-eval":  # lm-eval's own flags: the openllm_* tasks it names ship, with the prompt convention kept
        from openllm_ds.evaluation import lm_eval_tasks

        tasks = args[args.index("--tasks") + 1].split(",")
        assert tasks and set(tasks) <= set(lm_eval_tasks.task_files()), tasks
        assert "add_bos_token=False" in args[args.index("--model_args") + 1].split(","), command
        return
    if which == "train":
        parsed = build_train_parser().parse_args(args)
        run_config_from_args(parsed)
        return
    parsed = build_parser().parse_args(args)
    if parsed.command in ("train", "pipeline", "prepare", "train-tokenizer"):
        run_config_from_args(parsed)


def test_the_readme_and_help_use_one_set_of_names():
    """--model_dir, --max_new_tokens, --context_length: the old spellings are aliases that the commands never use."""
    old = [c for c in COMMANDS if re.search(r"--model_path\b|--max_length\b|openllm_ds\.train\b", c)]
    assert not old, old
    parser = build_parser()
    helps = {name: sp.format_help() for name, sp in parser._subparsers._group_actions[0].choices.items()}
    assert "--max_new_tokens MAX_NEW_TOKENS, --max_length" in helps["generate"]
    assert "--context_length" in helps["serve"] and "--max_length" not in helps["serve"]
    assert "--model_dir MODEL_DIR, --model_path" in helps["serve"]
    for stage in ("evaluate", "generate", "export"):
        assert "--model_dir" in helps[stage] and "--model_path" not in helps[stage]
    # the aliases still parse, to the one name
    assert parser.parse_args(["generate", "--model_dir", "m", "--prompt", "p", "--max_length", "7"]).max_new_tokens == 7
    served = parser.parse_args(["serve", "--model_path", "e", "--max_length", "64"])
    assert (served.model_dir, served.context_length) == ("e", 64)
