"""Harness tasks (perplexity, squad_qa, cloze, answer_ranking), tasks x checkpoints on Ray with
TensorBoard/report/summary/plot outputs, the shipped task YAMLs, and the lm-evaluation-harness tasks."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from openllm_ds.errors import UserError
from openllm_ds.evaluation import evaluate, load_task, run_task, run_task_on_model
from openllm_ds.evaluation import qa_tasks
from openllm_ds.evaluation.harness import resolve_steps
from openllm_ds.evaluation.tasks import KINDS, available_tasks
from openllm_ds.model import Transformer
from helpers import biased, eval_run, tiny_config  # the fake training outputs

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {"wikitext2_ppl", "validation_ppl", "squad_v1_qa", "squad_v2_qa", "squad_cloze", "squad_answer_ranking",
           "squad_v1_chat", "squad_v2_chat"}


def task_yaml(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory, prepared_data) -> Path:
    lines = (prepared_data / "validation_data.txt").read_text(encoding="utf-8").split("\n")[:12]
    p = tmp_path_factory.mktemp("docs") / "val.txt"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def run3(tmp_path_factory, tokenizer_dir) -> Path:
    """A training output with checkpoints at steps 10, 20, 30."""
    return eval_run(tmp_path_factory.mktemp("run3"), tokenizer_dir, steps=(10, 20, 30))


@pytest.fixture(scope="module")
def long_run(tmp_path_factory, tokenizer_dir, tok) -> Path:
    """Context 384: a whole SQuAD question and the end of its passage fit."""
    cfg = tiny_config(tok.vocab_size, max_seq_len=384, n_layers=1)
    return eval_run(tmp_path_factory.mktemp("long"), tokenizer_dir, cfg=cfg)


# ---- the shipped task files ---------------------------------------------------------------------

def test_shipped_task_yamls_parse_and_resolve(squad_dir, wikitext_test):
    tasks = available_tasks()
    assert SHIPPED <= set(tasks)
    for name in SHIPPED:
        spec = load_task(name, check_data=False)
        assert spec.name == name and spec.kind in KINDS and spec.metric in KINDS[spec.kind]
        assert spec.limit is not None and spec.limit <= 400  # small defaults: seconds to minutes on CPU
        if spec.data.startswith("../shared/"):
            assert Path(load_task(name).data) == (ROOT / spec.data).resolve()
    assert load_task("squad_v2_qa", check_data=False).no_answer_text == "unanswerable"


def test_task_yaml_errors_name_the_file_and_field(tmp_path, docs_file):
    with pytest.raises(UserError, match=r"unknown key 'shots'; valid keys: .*num_shots"):
        load_task(task_yaml(tmp_path / "a.yaml", kind="cloze", data=str(docs_file), shots=2))
    with pytest.raises(UserError, match=r"metric 'f1' is not one of cloze's metrics: accuracy"):
        load_task(task_yaml(tmp_path / "b.yaml", kind="cloze", data=str(docs_file), metric="f1"))
    with pytest.raises(UserError, match=r"c\.yaml lacks 'kind:'"):
        load_task(task_yaml(tmp_path / "c.yaml", data=str(docs_file)))
    with pytest.raises(UserError, match=r"kind 'mmlu' is not one of perplexity, squad_qa, squad_chat, cloze, answer_ranking"):
        load_task(task_yaml(tmp_path / "d.yaml", kind="mmlu", data=str(docs_file)))
    with pytest.raises(UserError, match=r"data file 'nowhere\.txt' not found"):
        load_task(task_yaml(tmp_path / "e.yaml", kind="perplexity", data="nowhere.txt"))
    with pytest.raises(UserError, match=r"unknown task 'squad_v3_qa'; available tasks: .*squad_cloze.*squad_v1_qa"):
        load_task("squad_v3_qa")


# ---- each task kind -----------------------------------------------------------------------------

def test_perplexity_task_on_a_uniform_model_with_unigram_baseline(tmp_path, tokenizer_dir, tok, docs_file):
    run = eval_run(tmp_path / "uniform", tokenizer_dir, zero_final_norm=True)
    spec = task_yaml(tmp_path / "ppl.yaml", kind="perplexity", data=str(docs_file), limit=5, stride=16)
    r = run_task(spec, run, progress=False)
    docs = [d for d in docs_file.read_text(encoding="utf-8").split("\n") if d.strip()][:5]
    ids = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
    counts = Counter(ids)
    unigram = math.exp(-sum(c / len(ids) * math.log(c / len(ids)) for c in counts.values()))
    assert (r["task"], r["kind"], r["metric"], r["num_examples"], r["step"]) == ("ppl", "perplexity", "perplexity", 5, 10)
    assert r["value"] == pytest.approx(tok.vocab_size, rel=1e-4)
    assert r["baseline"] == pytest.approx(unigram, rel=1e-9) and "unigram" in r["baseline_kind"]
    assert r["metrics"]["num_tokens"] == len(ids) and r["higher_is_better"] is False


def _answer_key(text: str) -> tuple[str, str]:
    """(end of the passage, question) of the last question in a prompt."""
    head, question = text.rsplit("\nQuestion: ", 1)
    return head[-60:], question.split("\nAnswer:")[0]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_squad_qa_scores_generated_answers_officially(version, tmp_path, long_run, tok, squad_dir, monkeypatch):
    data = squad_dir / ("dev-v1.1.json" if version == "v1" else "dev-v2.0-part.json")
    gold = {}
    for a in json.loads(data.read_text())["data"]:
        for p in a["paragraphs"]:
            for qa in p["qas"]:
                gold[(p["context"][-60:], qa["question"])] = [x["text"] for x in qa["answers"]]
    spec = task_yaml(tmp_path / f"qa_{version}.yaml", kind="squad_qa", data=str(data), num_shots=2, limit=12, seed=3)

    random_model = run_task(spec, long_run, progress=False)
    assert random_model["num_examples"] == 12 and 0 <= random_model["value"] <= 100
    assert random_model["metrics"]["num_shots"] == 2 and random_model["baseline"] > 0  # random spans overlap

    prompts = []

    def oracle(model, tokenizer, prompt_ids, max_new_tokens, stop_when):
        text = tokenizer.decode(prompt_ids)
        prompts.append(text)
        answers = gold[_answer_key(text)]
        return " " + (answers[-1] if answers else "unanswerable") + "\nContext: more text"

    monkeypatch.setattr(qa_tasks, "greedy_continuation", oracle)
    r = run_task(spec, long_run, progress=False)
    assert (r["value"], r["metrics"]["exact_match"]) == (100.0, 100.0)  # cut at the newline, scored officially
    assert r["baseline"] == random_model["baseline"]  # same seeded random spans
    # two worked examples before the question; long passages push them out of the window first
    shots = [p.count("\nAnswer: ") for p in prompts]
    assert len(prompts) == 12 and max(shots) == 2 and min(shots) >= 0
    assert sum(not p.startswith("Context: ") for p in prompts) == r["metrics"]["num_truncated_prompts"]
    if version == "v2":
        m = r["metrics"]
        assert m["HasAns_total"] + m["NoAns_total"] == 12 and m["NoAns_total"] > 0 and m["NoAns_exact"] == 100.0
        assert m["no_answer_rate"] == pytest.approx(m["NoAns_total"] / 12)
        assert any("Answer: unanswerable\n\n" in p for p in prompts)  # an unanswerable worked example

        def always_no_answer(model, tokenizer, prompt_ids, max_new_tokens, stop_when):
            return " Unanswerable.\n"

        monkeypatch.setattr(qa_tasks, "greedy_continuation", always_no_answer)
        r = run_task(spec, long_run, progress=False)["metrics"]
        assert (r["NoAns_exact"], r["HasAns_exact"]) == (100.0, 0.0)
        assert r["exact_match"] == pytest.approx(100 * r["NoAns_total"] / 12)


CLOZE_PASSAGES = [
    "We walked through the old streets of the city and loved the city.",  # 12 context words, 1 "city"
    "After the long war the people rebuilt their homes across the city.",  # 11, 0
    "The train from the coast arrives every morning in the busy city.",  # 11, 0
    "Boats carried grain and wine along the slow and muddy river.",  # 10 context words, 0 "river"
    "Too short to use.",  # fewer than 8 words: skipped
    "The treaty was signed by both kings in the year 1492.",  # last word not alphabetic: skipped
]


def test_cloze_accuracy_with_a_model_that_always_says_city(tmp_path, tok):
    data = tmp_path / "passages.txt"
    data.write_text("\n".join(CLOZE_PASSAGES) + "\n")
    spec = load_task(task_yaml(tmp_path / "cloze.yaml", kind="cloze", data=str(data), max_new_tokens=4))
    torch.manual_seed(0)
    model = biased(Transformer(tiny_config(tok.vocab_size, tie_embeddings=False, max_seq_len=64)).eval(),
                    {tok.encode("city")[0]: 10.0})
    r = run_task_on_model(spec, model, tok, progress=False)
    assert (r["value"], r["num_examples"], r["metrics"]["num_passages_usable"]) == (0.75, 4, 4)
    assert r["baseline"] == pytest.approx((1 / 12 + 0 + 0 + 0) / 4)
    assert {e["target"] for e in r["metrics"]["examples"]} <= {"city", "river"}
    assert all(e["prediction"] == "city" for e in r["metrics"]["examples"])


def test_answer_ranking_accuracy_with_a_model_that_always_says_city(tmp_path, tok):
    context = "The river flows past the city of Lyon near the old bridge and the tall tower."
    qas = [("q1", "What does the river flow past?", "city"), ("q2", "Where is Lyon's tower?", "city"),
           ("q3", "What flows past the city?", "river"), ("q4", "What is old?", "bridge")]
    squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": i, "question": q, "answers": [{"text": a, "answer_start": context.index(a)}]} for i, q, a in qas]}]}]}
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(squad))
    spec = load_task(task_yaml(tmp_path / "rank.yaml", kind="answer_ranking", data=str(data), num_choices=4))
    torch.manual_seed(0)
    model = biased(Transformer(tiny_config(tok.vocab_size, tie_embeddings=False, max_seq_len=64)).eval(),
                    {tok.encode("city")[0]: 10.0})
    r = run_task_on_model(spec, model, tok, progress=False)
    # "city" is right for q1 and q2; for q3 and q4 it is a distractor (another question's answer)
    assert (r["value"], r["metrics"]["accuracy_norm"], r["num_examples"], r["baseline"]) == (0.5, 0.5, 4, 0.25)


def test_continuation_logprobs_match_token_by_token_scoring():
    torch.manual_seed(0)
    model = Transformer(tiny_config(97, max_seq_len=16, init_std=0.3)).eval()
    short = ([1, 5, 6, 7], [8, 9])
    long = ([1] + list(range(10, 40)), [40, 41, 42])  # 34 tokens: the context loses tokens after BOS
    got = qa_tasks.continuation_logprobs(model, [short, long])
    for (ctx, cont), value in zip([short, long], got):
        if len(ctx) + len(cont) - 1 > 16:
            ctx = ctx[:1] + ctx[len(ctx) - (16 + 1 - len(cont) - 1):]
        seq = ctx + cont
        assert len(seq) - 1 <= 16
        want = 0.0
        for j in range(len(ctx), len(seq)):
            with torch.no_grad():
                logits = model(torch.tensor([seq[:j]]))[0, -1]
            want += torch.log_softmax(logits, -1)[seq[j]].item()
        assert value == pytest.approx(want, rel=1e-5)


# ---- tasks x checkpoints --------------------------------------------------------------------------

def test_resolve_steps(run3):
    assert resolve_steps(run3, "all") == [10, 20, 30]
    assert resolve_steps(run3, "latest") == [30]
    assert resolve_steps(run3, None) == [30]
    assert resolve_steps(run3, "30,10") == [10, 30]
    with pytest.raises(UserError, match=r"no complete checkpoint for step 15 .*\(have: 10, 20, 30\)"):
        resolve_steps(run3, "10,15")
    with pytest.raises(UserError, match="must be 'all', 'latest' or a comma list"):
        resolve_steps(run3, "best")


def test_harness_over_all_checkpoints_on_ray_writes_tensorboard_report_summary_and_plot(tmp_path, run3, docs_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ppl = task_yaml(tmp_path / "val_ppl.yaml", kind="perplexity", data=str(docs_file), limit=4, stride=16)
    cloze = task_yaml(tmp_path / "val_cloze.yaml", kind="cloze", data=str(docs_file), limit=3, max_new_tokens=3)
    report = evaluate(str(run3), tasks=(str(ppl), str(cloze)), checkpoints="all", num_workers=2)

    assert report["steps"] == [10, 20, 30]
    rows = {(r["task"], r["step"]): r for r in report["results"]}
    assert set(rows) == {(t, s) for t in ("val_ppl", "val_cloze") for s in (10, 20, 30)}
    ppls = [rows[("val_ppl", s)]["value"] for s in (10, 20, 30)]
    assert len(set(ppls)) == 3 and all(7000 < p < 9000 for p in ppls)  # three different random models
    # a Ray worker computes what this process computes
    assert run_task(ppl, run3, step=20, progress=False)["value"] == pytest.approx(ppls[1], rel=1e-9)

    acc = EventAccumulator(str(run3 / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag, task, key in [("harness/val_ppl/perplexity", "val_ppl", "value"),
                           ("harness/val_ppl/baseline_perplexity", "val_ppl", "baseline"),
                           ("harness/val_cloze/accuracy", "val_cloze", "value")]:
        assert tag in tags
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [10, 20, 30]
        assert [e.value for e in events] == pytest.approx([rows[(task, s)][key] for s in (10, 20, 30)], rel=1e-6)

    eval_dir = run3 / "eval"
    assert json.loads((eval_dir / "report.json").read_text()) == json.loads(json.dumps(report))
    summary = (eval_dir / "summary.md").read_text()
    assert "![metrics against step](curves.png)" in summary
    for s in (10, 20, 30):
        assert f"| {s} | {rows[('val_ppl', s)]['value']:.4g} |" in summary
    png = (eval_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(eval_dir / "curves.png").shape[0] > 200


def test_harness_in_process_with_eval_data_and_output(tmp_path, run3, docs_file):
    out = tmp_path / "r.json"
    cloze = task_yaml(tmp_path / "c.yaml", kind="cloze", data=str(docs_file), limit=2, max_new_tokens=2)
    report = evaluate(str(run3), tasks=(str(cloze),), checkpoint=20, eval_data=str(docs_file), stride=32,
                      num_workers=0, output=str(out))
    assert report["steps"] == [20]
    assert [r["task"] for r in report["results"]] == ["c", "val_ppl"]
    assert report["results"][1]["num_examples"] == 12
    assert json.loads(out.read_text())["results"][0]["task"] == "c"


# ---- EleutherAI lm-evaluation-harness tasks -------------------------------------------------------

class _TaskLoader(yaml.SafeLoader):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: ("!function", loader.construct_scalar(node)))


def _lm_eval_utils():
    spec = importlib.util.spec_from_file_location("lm_eval_task_utils", ROOT / "eval" / "lm_eval" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lm_eval_task_yamls_are_well_formed(squad_dir, wikitext_test):
    utils = _lm_eval_utils()
    files = sorted((ROOT / "eval" / "lm_eval").glob("*.yaml"))
    assert {f.stem for f in files} == {"openllm_validation_ppl", "openllm_wikitext2_ppl", "openllm_squad_v1", "openllm_squad_v2"}
    for f in files:
        cfg = yaml.load(f.read_text(), Loader=_TaskLoader)
        assert cfg["task"] == f.stem == cfg["dataset_kwargs"]["task_name"]
        assert cfg["output_type"] in ("loglikelihood_rolling", "generate_until")
        # the data file: a path in metadata (the key dataset_kwargs.data_key names), read by a custom_dataset
        data = Path(cfg["metadata"][cfg["dataset_kwargs"]["data_key"]])
        if data.parts[0] == "..":
            assert (ROOT / data).is_file()
        for key, value in cfg.items():
            if isinstance(value, tuple):
                assert value[0] == "!function" and callable(getattr(utils, value[1].split(".", 1)[1])), key
        metrics = {m["metric"] for m in cfg["metric_list"]}
        if cfg["output_type"] == "generate_until":
            assert cfg["custom_dataset"] == ("!function", "utils.squad_dataset") and cfg["validation_split"] == "validation"
            assert metrics == {"exact_match", "f1"}
            assert cfg["generation_kwargs"]["until"] == ["\n"] and cfg["generation_kwargs"]["do_sample"] is False
        else:
            assert cfg["custom_dataset"] == ("!function", "utils.text_dataset") and cfg["test_split"] == "test"
            assert metrics == {"word_perplexity", "byte_perplexity", "bits_per_byte"}


def test_lm_eval_tasks_and_their_data_are_found_from_any_directory(squad_dir, docs_file, tmp_path, monkeypatch, capsys):
    """`openllm-ds lm-eval` finds the shipped tasks by name, and each task's data file from the working directory
    or the repository root, or from --metadata (JSON or key=value); a missing file, a directory or bad --metadata
    stops before lm-eval loads anything, with the key to pass."""
    from openllm_ds.cli import main
    from openllm_ds.evaluation import lm_eval_tasks
    from openllm_ds.presets import shipped_dir

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert lm_eval_tasks.tasks_dir() == shipped_dir("eval") / "lm_eval"
    assert set(lm_eval_tasks.task_files()) == {"openllm_validation_ppl", "openllm_wikitext2_ppl", "openllm_squad_v1",
                                               "openllm_squad_v2"}
    squad_v1 = squad_dir / "dev-v1.1.json"
    (elsewhere / "data").mkdir()
    (elsewhere / "data" / "v1.json").write_bytes(squad_v1.read_bytes())
    tasks = ["--tasks", "openllm_squad_v1,openllm_validation_ppl,hellaswag"]  # hellaswag: lm-eval's own, not checked
    found = lm_eval_tasks.check_data([*tasks, "--metadata", json.dumps({"validation_file": str(docs_file),
                                                                        "squad_v1_file": "data/v1.json"})])
    assert found == [("openllm_squad_v1", elsewhere / "data" / "v1.json"), ("openllm_validation_ppl", docs_file.resolve())]
    found = lm_eval_tasks.check_data([*tasks, "--metadata", f"validation_file={docs_file}", "squad_v1_file=data/v1.json",
                                      "--limit", "3"])
    assert found == [("openllm_squad_v1", elsewhere / "data" / "v1.json"), ("openllm_validation_ppl", docs_file.resolve())]
    if (ROOT.parent / "shared" / "data" / "squad" / "dev-v1.1.json").is_file():  # the YAML's default, from the clone root
        assert lm_eval_tasks.check_data(["--tasks=openllm_squad_v1"]) == [
            ("openllm_squad_v1", (ROOT.parent / "shared" / "data" / "squad" / "dev-v1.1.json").resolve())]

    bad = {
        ("--metadata", '{"squad_v1_file": "missing.json"}'): ["'missing.json' not found", str(elsewhere / "missing.json"),
                                                              "--metadata '{\"squad_v1_file\": \"PATH\"}'"],
        ("--metadata", '{"squad_v1_file": "data"}'): ["squad_v1_file", "is a directory, not a file"],
        ("--metadata", '{"squad_v1_file": '): ["--metadata", "is not JSON"],
        ("--metadata", "squad_v1_file"): ["neither a JSON object nor key=value"],
        ("--metadata", '{"squad_v1_file": 3}'): ["squad_v1_file", "must be a file path, got 3"],
    }
    pytest.importorskip("lm_eval")  # the CLI checks that lm-eval is there first
    for flags, words in bad.items():
        assert main(["lm-eval", "--model", "hf", "--tasks", "openllm_squad_v1", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and all(w in err for w in words), (flags, err)
    assert sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*")) == [Path("data"), Path("data/v1.json")]


def test_lm_eval_utils_on_the_real_files(squad_dir, wikitext_test, tmp_path):
    import datasets

    from openllm_ds.evaluation.sliding_window import read_documents

    utils = _lm_eval_utils()
    raw = datasets.load_dataset("json", data_files={"validation": str(squad_dir / "dev-v2.0-part.json")}, field="data",
                                cache_dir=str(tmp_path))
    docs = utils.flatten_squad(raw["validation"])
    assert len(docs) == 6078 and sum(docs["is_impossible"]) == 3168
    unanswerable = next(d for d in docs if d["is_impossible"])
    answerable = next(d for d in docs if not d["is_impossible"])
    assert unanswerable["answer"] == "unanswerable" and answerable["answer"] == answerable["answers"][0]
    assert utils.process_results(unanswerable, [" Unanswerable."]) == {"exact_match": 100.0, "f1": 100.0}
    assert utils.process_results(unanswerable, [" Paris"]) == {"exact_match": 0.0, "f1": 0.0}
    assert utils.process_results(answerable, [" " + answerable["answers"][0] + "\nmore"]) == {"exact_match": 100.0, "f1": 100.0}
    assert utils.process_results(answerable, [""]) == {"exact_match": 0.0, "f1": 0.0}
    text = datasets.load_dataset("text", data_files={"test": str(wikitext_test)}, cache_dir=str(tmp_path))
    assert len(utils.drop_blank_lines(text["test"])) == len(read_documents(wikitext_test))


def test_lm_eval_runs_the_local_tasks_on_an_export(tmp_path, tokenizer_dir, tok, docs_file, squad_dir, monkeypatch, capsys):
    """The README's `openllm-ds lm-eval` command, from a directory that is not the repository: the tasks by name,
    the data from --metadata, lm-eval's own results file."""
    pytest.importorskip("lm_eval")
    export_mod = pytest.importorskip("openllm_ds.export")
    from openllm_ds.cli import main
    from openllm_ds.config import ExportConfig

    # context 256: room for a passage and lm-eval's 32 generated tokens
    run = eval_run(tmp_path / "uniform", tokenizer_dir, cfg=tiny_config(tok.vocab_size, max_seq_len=256),
                        zero_final_norm=True)
    hf = tmp_path / "hf"
    export_mod.export(ExportConfig(model_dir=str(run), format="huggingface", output_dir=str(hf)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    metadata = {"validation_file": str(docs_file), "squad_v1_file": str(squad_dir / "dev-v1.1.json")}
    rc = main(["lm-eval", "--model", "hf", "--model_args", f"pretrained={hf},dtype=float32,add_bos_token=False",
               "--tasks", "openllm_validation_ppl,openllm_squad_v1", "--metadata", json.dumps(metadata),
               "--limit", "4", "--device", "cpu", "--batch_size", "2", "--output_path", str(elsewhere / "results")])
    assert rc == 0, capsys.readouterr().err[-3000:]
    [results] = (elsewhere / "results").rglob("results_*.json")
    res = json.loads(results.read_text())["results"]
    # a uniform model: every token costs ln V; lm-eval scores each line on its own, BOS as context
    docs = [d for d in docs_file.read_text(encoding="utf-8").split("\n") if d.strip()][:4]
    nll = sum(len(tok.encode(d)) for d in docs) * math.log(tok.vocab_size)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    num_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert res["openllm_validation_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(nll / words), rel=1e-4)
    assert res["openllm_validation_ppl"]["bits_per_byte,none"] == pytest.approx(nll / num_bytes / math.log(2), rel=1e-4)
    assert 0.0 <= res["openllm_squad_v1"]["f1,none"] <= 100.0 and "exact_match,none" in res["openllm_squad_v1"]
