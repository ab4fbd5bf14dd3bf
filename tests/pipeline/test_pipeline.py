"""`openllm-ds pipeline` end to end on the real SQuAD files, with a smaller model and few steps.

One pipeline is interrupted at its last stage, rerun (it picks up there) and run a third time (every
stage skipped); the same pipeline then runs as a Ray job on a real head.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from openllm_ds.cli import main
from openllm_ds.config import load_run_config
from openllm_ds.errors import UserError
from openllm_ds.model import Transformer

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["prepare", "train-tokenizer", "tokenize", "train", "evaluate", "harness", "export-huggingface", "export-onnx"]
SFT_STAGES = ["prepare-sft", "finetune", "squad_v1_chat-before", "squad_v1_chat-after", "export-huggingface-sft"]
OVERRIDES = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=192", "model.max_seq_len=64",
             "train.micro_batch_size=8", "train.max_steps=20", "train.warmup_steps=5", "train.eval_every=10",
             "train.save_every=10", "train.eval_batches=4", "finetune.max_steps=4", "finetune.batch_size=4",
             "finetune.max_seq_len=128", "finetune.warmup_steps=1", "finetune.pipeline_questions=4"]

pytestmark = pytest.mark.slow


def pipeline_argv(squad_dir, work_dir):
    """The preset by name: it and the DeepSpeed JSON it names are found from any directory."""
    return ["pipeline", "--config", "tiny", "--squad_dir", str(squad_dir), "--work_dir", str(work_dir), *OVERRIDES]


def stage_lines(out: str) -> dict[str, str]:
    """{stage: 'running' | 'skipped'} from the pipeline's [pipeline] lines."""
    found = {}
    for line in out.splitlines():
        if line.startswith("[pipeline] "):
            name, _, what = line[len("[pipeline] "):].partition(": ")
            found[name] = "skipped" if what.endswith("skipped") else what
    return found


def test_pipeline_end_to_end_resumes_and_skips(squad_dir, tmp_path, capsys, monkeypatch):
    import openllm_ds.export as export_mod

    work = tmp_path / "work"
    real_export = export_mod.export

    def onnx_fails(cfg, **kw):
        if cfg.format == "onnx":
            raise UserError("disk full (injected)")
        return real_export(cfg, **kw)

    monkeypatch.setattr(export_mod, "export", onnx_fails)
    elsewhere = tmp_path / "elsewhere"  # run from a directory outside the clone, as after a pip install
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(pipeline_argv(squad_dir, work)) == 2  # stops in its last stage
    first = capsys.readouterr()
    assert "disk full (injected)" in first.err
    assert stage_lines(first.out) == {s: "running" for s in STAGES}
    assert not (work / "runs/tiny/report.md").exists()

    monkeypatch.setattr(export_mod, "export", real_export)
    assert main(pipeline_argv(squad_dir, work)) == 0  # picks up where it stopped
    second = capsys.readouterr()
    assert stage_lines(second.out) == {**{s: "skipped" for s in STAGES[:-1]}, "export-onnx": "running",
                                       **{s: "running" for s in SFT_STAGES}}
    result = json.loads(second.out[second.out.index("\n{\n") + 1:])

    cfg = load_run_config(ROOT / "configs/tiny.yaml", dict(o.split("=", 1) for o in OVERRIDES))
    ev = result["evaluation"]
    assert ev["step"] == 20 and ev["num_documents"] == 2067  # every validation passage (the dev-v1.1 file)
    assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))
    assert ev["perplexity"] < 8000 / 3  # well below the uniform model; 20 steps do not reach the unigram one
    assert ev["unigram_baseline_perplexity"] > 100
    assert {r["task"] for r in result["harness"]} == {"validation_cloze", "squad_v1_qa", "squad_answer_ranking"}
    assert sorted({r["step"] for r in result["harness"]}) == [10, 20]
    assert (work / "exports/huggingface/config.json").is_file() and (work / "exports/onnx/model.onnx").is_file()

    report = (work / "runs/tiny/report.md").read_text()
    assert f"| parameters | {Transformer(cfg.model).num_params():,} |" in report
    assert f"| validation perplexity (per token) | {ev['perplexity']:.2f} |" in report
    assert f"| validation bits per byte | {ev['bits_per_byte']:.4f} |" in report
    assert "| dev-v2.0-part.json | validation | 646 | 0 | 0 | 646 | 0 |" in report  # cross-file dedupe
    assert "| squad_answer_ranking | 20 | accuracy |" in report
    assert "| export-onnx |" in report and "## Sample generations (greedy)" in report
    assert (work / "runs/tiny/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the SFT stage: SQuAD conversations, a fine-tune of the trained model, squad_v1_chat before and after, the export
    sft = result["finetune"]
    assert sft["scores"]["before"]["num_examples"] == sft["scores"]["after"]["num_examples"] == 4
    assert sft["scores"]["before"]["step"] == 20 and sft["scores"]["after"]["step"] == 4
    assert json.loads((work / "exports/huggingface-sft/config.json").read_text())["max_position_embeddings"] == 128
    assert "## Fine-tuning (SFT)" in report and "| squad_v1_chat F1 |" in report
    assert "- padding share of the batches:" in report and "Sample conversations" in report
    assert (work / "data/sft/train.jsonl").is_file() and (work / "models/tiny-sft/checkpoints/latest").is_file()

    assert main(pipeline_argv(squad_dir, work)) == 0
    assert stage_lines(capsys.readouterr().out) == {s: "skipped" for s in STAGES + SFT_STAGES}

    # a changed setting the finished run can take (a cadence): nothing to train, the report stays whole
    state = json.loads((work / "runs/tiny/state.json").read_text())
    assert main([*pipeline_argv(squad_dir, work), "train.eval_every=5"]) == 0
    out = capsys.readouterr().out
    assert "[pipeline] train: models/tiny is complete at step 20 (train.max_steps), nothing to train" in out
    after = json.loads((work / "runs/tiny/state.json").read_text())
    assert after["train"]["result"] == state["train"]["result"] and after["train"]["result"]["train_loss"] > 0
    assert f"| validation perplexity (per token) | {ev['perplexity']:.2f} |" in (work / "runs/tiny/report.md").read_text()
    # one it cannot go on with: one line naming what differs and --force; the run is untouched
    latest = (work / "models/tiny/checkpoints/latest").read_text()
    assert main([*pipeline_argv(squad_dir, work), "train.learning_rate=0.01"]) == 2
    err = capsys.readouterr().err
    assert "trained with other settings (train.learning_rate: 0.003 -> 0.01)" in err and "--force" in err, err
    assert (work / "models/tiny/checkpoints/latest").read_text() == latest


def test_pipeline_on_own_data_as_a_ray_job_on_a_real_head(prepared_data, tmp_path, ray_head):
    """The pipeline on a user's JSON Lines corpus (text in a "content" field), submitted as a Ray job: no
    prepare; the tokenizer trained on the corpus; validation on its held-out 1%, evaluated and reported."""
    env, address = ray_head
    passages = (prepared_data / "training_data.txt").read_text(encoding="utf-8").split("\n")[:-1]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"content": p}) + "\n" for p in passages), encoding="utf-8")
    work = tmp_path / "job"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
           "--", "python", "ray_jobs/pipeline.py", "--config", str(ROOT / "configs/tiny.yaml"), "--work_dir", str(work),
           *OVERRIDES, f"train.data_file={corpus}", "tokenizer.text_field=content"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert stage_lines(r.stdout) == {"prepare": "skipped", **{s: "running" for s in STAGES[1:]}}
    assert not (work / "data/clean").exists()
    state = json.loads((work / "runs/tiny/state.json").read_text())
    assert state["train"]["result"]["world_size"] == 1  # one Ray Train worker: the job's default
    assert state["train"]["result"]["final_step"] == 20
    (source,) = state["train"]["result"]["sources"]
    assert source["validation"] == f"the held-out 0.01 of {corpus}"
    held = [json.loads(line)["text"] for line in (work / "runs/tiny/validation.jsonl").read_text().splitlines()]
    assert 0 < len(held) < 0.03 * len(passages) and set(held) <= set(passages)
    assert state["evaluate"]["result"]["num_documents"] == len(held)
    assert state["train-tokenizer"]["result"]["input"] == str(corpus)
    report = (work / "runs/tiny/report.md").read_text()
    assert f"| `{corpus}` | 100.0% | 100.0% | {len(passages) - len(held):,} | 0 |" in report
    assert (work / "exports/huggingface/model.safetensors").is_file()


def test_force_replaces_only_the_run_the_pipeline_trained(tmp_path, monkeypatch):
    """--force retrains from step 0: the run's own outputs go, a user's file in the run dir stays; a run this
    pipeline did not train is refused and nothing is deleted."""
    from openllm_ds.pipeline import train_stage

    cfg = load_run_config(ROOT / "configs/tiny.yaml", {"train.output_dir": str(tmp_path / "run")})
    run = tmp_path / "run"
    for f in ("checkpoints/step_00000010/model.safetensors", "checkpoints/step_00000010/train_state.json",
              "tensorboard/events.out", "tokenizer/tokenizer.model", "train_log.jsonl", "notes.md"):
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        (run / f).write_text("x")
    cfg.save(run / "run_config.yaml")
    launched = []
    with pytest.raises(UserError, match="holds a run this pipeline did not train"):
        train_stage(cfg, None, tmp_path / "tok", True, launched.append)
    assert launched == [] and (run / "checkpoints/step_00000010/model.safetensors").is_file()
    train_stage(cfg, {"result": {"final_step": 10}}, tmp_path / "tok", True, lambda c: launched.append(c) or {})
    assert launched == [cfg]
    assert sorted(p.name for p in run.iterdir()) == ["notes.md"]


def test_a_rerun_on_other_ranks_or_another_zero_stage_goes_on(tmp_path):
    """Another number of workers, ZeRO config or micro batch continues the run (the trainer converts the checkpoint
    and keeps its global batch, or names the flag that does); another learning rate does not."""
    from openllm_ds.pipeline import train_stage

    run = tmp_path / "run"
    cfg = load_run_config(ROOT / "configs/tiny.yaml", {"train.output_dir": str(run)})
    for f in ("checkpoints/step_00000010/model.safetensors", "checkpoints/step_00000010/train_state.json"):
        (run / f).parent.mkdir(parents=True, exist_ok=True)
        (run / f).write_text("x")
    cfg.save(run / "run_config.yaml")
    launched = []
    other = load_run_config(ROOT / "configs/tiny.yaml", {
        "train.output_dir": str(run), "train.num_workers": "2", "train.micro_batch_size": "8",
        "train.gradient_accumulation_steps": "1", "train.ds_config": str(ROOT / "ds_configs/zero3.json")})
    train_stage(other, {"result": {"final_step": 10}}, tmp_path / "tok", False, launched.append)
    assert launched == [other]
    with pytest.raises(UserError, match=r"trained with other settings \(train\.learning_rate: 0\.003 -> 0\.01\)"):
        train_stage(load_run_config(ROOT / "configs/tiny.yaml", {"train.output_dir": str(run),
                                                                 "train.learning_rate": "0.01"}),
                    {"result": {"final_step": 10}}, tmp_path / "tok", False, launched.append)
