"""The Python API (``openllm_ds.load``), the one entry point (``python -m openllm_ds``), and the presets shipped in
the package (a wheel installed elsewhere finds them by name)."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import openllm_ds
from openllm_ds.errors import UserError
from openllm_ds.evaluation.generate import generate_text
from openllm_ds.evaluation.run import evaluate
from openllm_ds.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
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
            want = generate_text(hf, prompt, max_new_tokens=12, temperature=0.0, stream=False)[0]
            assert lm.generate(prompt, max_new_tokens=12) == want
        (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
        report = evaluate(hf, eval_data=str(tmp_path / "texts.txt"), metrics=("perplexity",))
        assert lm.perplexity(TEXTS) == pytest.approx(report["perplexity"], rel=1e-6)
        assert 1 < lm.perplexity(TEXTS) < 8000
    assert torch.get_num_threads() == lm.completer._threads_before  # closed by the with block: threads given back


def test_load_onnx_backend_matches_torch(trained_export):
    hf, _ = trained_export
    with openllm_ds.load(hf) as torch_lm, openllm_ds.load(hf, backend="onnx") as onnx_lm:
        assert onnx_lm.completer.backend == "onnx"
        tmp = [fn.args[0] for fn in onnx_lm.completer.on_close]
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
        assert lm.completer.on_close == []  # an ONNX export runs as it is, no conversion
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
    with pytest.raises(UserError, match=r"--model_dir .*nothing does not exist"):
        openllm_ds.load(tmp_path / "nothing")


def test_python_m_openllm_ds_is_the_cli(tmp_path):
    """`python -m openllm_ds STAGE` parses as `openllm-ds STAGE`; `--config tiny` is found from any directory; a dry
    run prints the resolved config, then makes the run's own checks (here: no tokenizer yet) and writes nothing."""
    r = subprocess.run([sys.executable, "-m", "openllm_ds", "train", "--config", "tiny", "--max_steps", "7",
                        "--dry_run"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "name: tiny" in r.stdout and "max_steps: 7" in r.stdout
    assert r.returncode == 2 and r.stderr.startswith("error: train.tokenizer_dir (--tokenizer_dir): tokenizer dir "
                                                     "data/tokenizer does not exist; train one first"), r.stderr
    assert list(tmp_path.iterdir()) == []
    r = subprocess.run([sys.executable, "-m", "openllm_ds", "train", "--config", "nope"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--config nope does not exist; pass a YAML file or a preset name (large, medium, " \
                                  "small, tiny)" in r.stderr


def test_a_wheel_installed_alone_runs_every_stage_from_anywhere(tmp_path, token_shards, tokenizer_dir):
    """What a user installs is what is tested: a wheel built from a copy of the sources, installed into a fresh
    venv that has no editable finder (its dependencies come from this venv's site-packages as a plain path entry,
    whose .pth files, the editable install's among them, are not run), trains, generates and loads from a
    directory outside the checkout. Every package of the source tree is in the wheel: found, not listed."""
    import sysconfig
    import venv

    src = tmp_path / "src"
    for name in ("openllm_ds", "configs", "ds_configs", "eval"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("openllm_ds-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "openllm_ds").rglob("*.py") if "__pycache__" not in f.parts)
    assert "openllm_ds/checkpoint/loader.py" in sources
    assert not set(sources) - names, f"missing from the wheel: {sorted(set(sources) - names)}"
    for f in ("configs/tiny.yaml", "configs/medium_model.json", "ds_configs/zero3_offload.json", "eval/squad_v1_qa.yaml"):
        assert f"openllm_ds/presets/{f}" in names

    fresh = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(fresh)
    py = fresh / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = sysconfig.get_paths()["purelib"]  # this venv's packages, as a path entry: none of its .pth files runs
    (Path(purelib) / "_openllm_test_deps.pth").write_text(deps + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{fresh / 'bin'}:/usr/bin:/bin"

    def run(*args):
        r = subprocess.run([str(py), *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
        return r.stdout

    package = Path(purelib) / "openllm_ds"
    where = run("-c", "import openllm_ds, openllm_ds.checkpoint as c; print(openllm_ds.__file__, c.__file__)").split()
    assert where == [str(package / "__init__.py"), str(package / "checkpoint" / "__init__.py")]
    assert "train-tokenizer" in run("-m", "openllm_ds", "--help")
    # the lm-eval tasks ship too, found by name, with the utils their YAMLs name
    tasks = run("-c", "import importlib.util as u\nfrom openllm_ds.evaluation.lm_eval_tasks import task_files, tasks_dir\n"
                      "s = u.spec_from_file_location('utils', tasks_dir() / 'utils.py'); m = u.module_from_spec(s)\n"
                      "s.loader.exec_module(m); print(sorted(task_files()), m.squad_dataset.__name__, tasks_dir())").split()
    assert tasks[-1] == str(package / "presets" / "eval" / "lm_eval") and tasks[-2] == "squad_dataset"
    assert tasks[:-2] == ["['openllm_squad_v1',", "'openllm_squad_v2',", "'openllm_validation_ppl',", "'openllm_wikitext2_ppl']"]
    run("-m", "openllm_ds", "train", "--config", "tiny", "--data_file", str(token_shards["train"]),
        "--eval_data", str(token_shards["val"]), "--tokenizer_dir", str(tokenizer_dir), "--output_dir", "run",
        "--max_steps", "2", "--batch_size", "2", "train.eval_every=2", "train.save_every=2", "train.log_every=1",
        "train.eval_batches=1")
    assert (elsewhere / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    printed = run("-m", "openllm_ds", "generate", "--model_dir", "run", "--prompt", "The Normans", "--temperature",
                  "0", "--max_new_tokens", "8")
    loaded = run("-c", "import openllm_ds\nwith openllm_ds.load('run') as lm:\n"
                       "    print(repr(lm.generate('The Normans', max_new_tokens=8)))")
    generated = eval(loaded.strip())
    assert generated and generated in printed


def test_chat_is_the_servers_chat_completion(small_run):
    """load(...).chat renders with the model's chat template and generates as /v1/chat/completions does."""
    import json
    import urllib.request

    from openllm_ds.serve import start_server
    from openllm_ds.tokenizer.chat import render_conversation

    messages = [{"role": "user", "content": "river"}]  # the model's context is 32 tokens
    with openllm_ds.load(small_run, context_length=32) as lm:
        answer = lm.chat(messages, max_new_tokens=6)
        template = lm.completer.chat_template
        ids = lm.completer.encode(render_conversation(messages, True, template), add_prefix=False)
        assert ids[0] == lm.tokenizer.prompt_prefix_id  # the template writes the prompt prefix itself
        assert answer == lm.completer.complete(ids, _greedy(6))[0][0]
        with start_server(completer=lm.completer, context_length=32) as srv:
            body = json.dumps({"model": lm.completer.model_name, "messages": messages, "max_tokens": 6,
                               "temperature": 0}).encode()
            req = urllib.request.Request(srv.url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
            served = json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["message"]["content"]
        assert served == answer
        with pytest.raises(UserError, match=r"messages\[0\] needs a role"):
            lm.chat([{"role": "narrator", "content": "x"}])


def _greedy(n):
    from openllm_ds.inference import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0)


def test_the_torch_backend_loads_where_generate_does(small_run, monkeypatch):
    """load_completer (the server's torch backend, load, generate) puts the model on utils.select_device(): CUDA
    when visible, so the server and `openllm-ds generate` agree on a GPU box."""
    import openllm_ds.checkpoint as checkpoint
    import openllm_ds.inference.load as loader

    real, seen = checkpoint.load_model, []

    def spy(*a, **kw):
        seen.append(kw.get("device"))
        return real(*a, **{**kw, "device": "cpu"})

    monkeypatch.setattr(checkpoint, "load_model", spy)
    monkeypatch.setattr(loader, "select_device", lambda: "cuda:7")  # what a GPU box's select_device gives
    completer = loader.load_completer(small_run, max_concurrency=1)
    completer.close()
    assert seen == ["cuda:7"]
