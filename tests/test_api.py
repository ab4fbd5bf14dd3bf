"""The Python API (``openllm_ds.load``), the one entry point (``python -m openllm_ds``), and the presets shipped in
the package (a wheel installed elsewhere finds them by name)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import openllm_ds
from openllm_ds.errors import UserError
from openllm_ds.evaluation.generate import generate_text
from openllm_ds.evaluation.run import evaluate
from openllm_ds.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The Normans were", "In 1066 the", "Beyoncé Giselle Knowles"]
TEXTS = ["The Normans gave their name to Normandy, a region in France.",
         "The university library holds more than a million volumes."]


@pytest.mark.parametrize("where", ["hf", "run", "run/checkpoints/step_00000150"])
def test_load_generates_and_scores_as_the_cli_does(trained_export, tmp_path, where):
    hf, _ = trained_export
    path = hf.parent / where
    with openllm_ds.load(path) as lm:
        assert lm.tokenizer.encode("Normandy") == load_tokenizer(hf).encode("Normandy")
        for prompt in PROMPTS:  # greedy: the text `openllm-ds generate --temperature 0` prints
            want = generate_text(hf, prompt, max_length=12, temperature=0.0, stream=False)[0]
            assert lm.generate(prompt, max_new_tokens=12) == want
        (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
        report = evaluate(hf, eval_data=str(tmp_path / "texts.txt"), metrics=("perplexity",))
        assert lm.perplexity(TEXTS) == pytest.approx(report["perplexity"], rel=1e-6)
        assert 1 < lm.perplexity(TEXTS) < 8000
    assert lm.completer._pool._shutdown  # closed by the with block


def test_load_onnx_backend_matches_torch(trained_export):
    hf, _ = trained_export
    with openllm_ds.load(hf) as torch_lm, openllm_ds.load(hf, backend="onnx") as onnx_lm:
        assert onnx_lm.completer.backend == "onnx"
        tmp = list(onnx_lm.completer.cleanup)
        assert onnx_lm.generate(PROMPTS[0], max_new_tokens=12) == torch_lm.generate(PROMPTS[0], max_new_tokens=12)
        assert onnx_lm.perplexity(TEXTS) == pytest.approx(torch_lm.perplexity(TEXTS), rel=1e-4)
    assert tmp and not any(Path(d).exists() for d in tmp)  # its temporary ONNX export is gone


def test_one_loader_reads_every_kind_of_path(trained_export, tmp_path):
    """PyTorch and ONNX exports and a DeepSpeed tag of ZeRO shards load through the same loader into the same
    object: the same step, tokenizer and logits as the training output they came from."""
    import torch

    from openllm_ds.checkpoint import load_model
    from openllm_ds.config import ExportConfig
    from openllm_ds.export import export

    hf, _ = trained_export
    run = hf.parent / "run"
    for fmt in ("pytorch", "onnx"):
        export(ExportConfig(model_dir=str(run), format=fmt, output_dir=str(tmp_path / fmt), verify=False))
    zero_tag = tmp_path / "zero" / "checkpoints" / "step_00000150"  # a ZeRO save: shards, no model.safetensors
    shutil.copytree(run / "checkpoints" / "step_00000150", zero_tag, ignore=shutil.ignore_patterns("model.safetensors"))
    shutil.copytree(run / "tokenizer", tmp_path / "zero" / "tokenizer")
    shutil.copy2(run / "checkpoints" / "latest", zero_tag.parent / "latest")
    ref = load_model(run)
    ids = torch.tensor([ref.tokenizer.encode_prompt(TEXTS[0])])
    want = ref.model(ids)
    for path, kind, backend in [(hf, "huggingface", "torch"), (tmp_path / "pytorch", "pytorch", "torch"),
                                (tmp_path / "onnx", "onnx", "onnx")]:
        got = load_model(path, backend=backend)
        assert (got.kind, got.step, got.model_config) == (kind, 150, ref.model_config)
        assert got.tokenizer.sha256 == ref.tokenizer.sha256 and got.val_loss == ref.val_loss
        torch.testing.assert_close(got.model(ids), want, rtol=0, atol=1e-4)
    with pytest.raises(UserError, match=r"onnx is an ONNX export; serve it with --backend onnx"):
        load_model(tmp_path / "onnx")
    with openllm_ds.load(tmp_path / "onnx", backend="onnx") as lm, openllm_ds.load(tmp_path / "pytorch") as pt:
        assert lm.completer.cleanup == []  # an ONNX export runs as it is, no conversion
        assert lm.generate(PROMPTS[0], max_new_tokens=8) == pt.generate(PROMPTS[0], max_new_tokens=8)
    pytest.importorskip("deepspeed")
    import deepspeed.utils.zero_to_fp32 as z

    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (zero_tag / name).write_bytes(b"")  # truncated shards: one clear error, naming the tag
    with pytest.raises(UserError, match=r"step_00000150 is not a complete DeepSpeed ZeRO checkpoint \(zero_to_fp32 "
                                        r"said: EOFError"):
        load_model(zero_tag.parent.parent)
    calls = []  # shards that read: what DeepSpeed's zero_to_fp32 gathers is what loads

    def gather(checkpoint_dir, tag=None, **kw):
        calls.append((checkpoint_dir, tag))
        return {f"module.{k}": v.clone() for k, v in ref.model.state_dict().items()}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(z, "get_fp32_state_dict_from_zero_checkpoint", gather)
        got = load_model(zero_tag)
    assert calls == [(str(zero_tag.parent), "step_00000150")]
    assert (got.kind, got.step, got.path, got.tokenizer_dir) == ("deepspeed", 150, zero_tag, tmp_path / "zero" / "tokenizer")
    torch.testing.assert_close(got.model(ids), want, rtol=0, atol=0)


def test_load_bad_path_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"--model_path .*nothing does not exist"):
        openllm_ds.load(tmp_path / "nothing")


def test_python_m_openllm_ds_is_the_cli(tmp_path):
    """`python -m openllm_ds STAGE` parses as `openllm-ds STAGE`; `--config tiny` is found from any directory."""
    r = subprocess.run([sys.executable, "-m", "openllm_ds", "train", "--config", "tiny", "--max_steps", "7",
                        "--dry_run"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "name: tiny" in r.stdout and "max_steps: 7" in r.stdout
    r = subprocess.run([sys.executable, "-m", "openllm_ds", "train", "--config", "nope"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--config nope does not exist; pass a YAML file or a preset name (large, medium, " \
                                  "small, tiny)" in r.stderr


def test_a_wheel_ships_the_presets_and_finds_them_from_anywhere(tmp_path):
    """Built from a copy of the sources (no build dir in the clone) with the venv's setuptools, installed into a
    directory of its own: the presets, DeepSpeed JSONs and task YAMLs come from inside the package."""
    setuptools = pytest.importorskip("setuptools", reason="building the wheel offline needs the venv's setuptools")
    if int(setuptools.__version__.split(".")[0]) < 68:
        pytest.skip(f"setuptools {setuptools.__version__} is older than pyproject.toml's build requirement (>= 68)")
    src = tmp_path / "src"
    for name in ("openllm_ds", "configs", "ds_configs", "eval"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("openllm_ds-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("configs/tiny.yaml", "configs/medium_model.json", "ds_configs/zero3_offload.json", "eval/squad_v1_qa.yaml"):
        assert f"openllm_ds/presets/{f}" in names
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    code = ("import openllm_ds, sys\n"
            "from openllm_ds.config import load_run_config\n"
            "from openllm_ds.presets import config_file, ds_config_file\n"
            "from openllm_ds.train.ds_config import build_ds_config\n"
            "from openllm_ds.evaluation.tasks import available_tasks\n"
            "cfg = load_run_config('tiny')\n"
            "print(openllm_ds.__file__, config_file('tiny'), ds_config_file(cfg.train.ds_config), sep='\\n')\n"
            "print(build_ds_config(cfg, 1, 'cpu')['zero_optimization']['stage'], available_tasks()['squad_v1_qa'])\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    package = site / "openllm_ds"
    assert lines[:3] == [str(package / "__init__.py"), str(package / "presets/configs/tiny.yaml"),
                         str(package / "presets/ds_configs/zero2.json")]
    assert lines[3] == f"2 {package / 'presets/eval/squad_v1_qa.yaml'}"
