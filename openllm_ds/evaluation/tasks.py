"""Harness tasks: one YAML file each in eval/ (which data, which kind, which metric, how many shots).

A task YAML::

    name: squad_v1_qa                         # default: the file name
    kind: squad_qa                            # perplexity | squad_qa | squad_chat | cloze | answer_ranking
    data: ../shared/data/squad/dev-v1.1.json  # see resolve_data_path for how relative paths resolve
    metric: f1                                # the headline metric (one of the kind's metrics)
    num_shots: 2                              # squad_qa: worked examples in the prompt
    limit: 50                                 # examples evaluated (documents for perplexity)
    seed: 1234                                # example sampling
    # kind-specific: max_new_tokens, stop, no_answer_text (squad_qa, cloze); num_choices
    # (answer_ranking); stride, batch_size (perplexity, answer_ranking)

Every result reports ``metric``, ``value``, ``num_examples`` and a ``baseline`` (chance or unigram,
``baseline_kind`` says which) so a number can be judged without context.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from openllm_ds.errors import ConfigError, UserError
from openllm_ds.paths import check_path
from openllm_ds.inference.sampling import SamplingParams
from openllm_ds.utils import read_yaml

KINDS: dict[str, tuple[str, ...]] = {  # kind -> its metrics, the first is the default
    "perplexity": ("perplexity", "loss", "word_perplexity", "bits_per_byte"),
    "squad_qa": ("f1", "exact_match"),
    "squad_chat": ("f1", "exact_match", "no_answer_accuracy"),
    "cloze": ("accuracy",),
    "answer_ranking": ("accuracy", "accuracy_norm"),
}
LOWER_IS_BETTER = {"perplexity", "loss", "word_perplexity", "bits_per_byte"}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    data: str
    metric: str = ""
    num_shots: int = 0
    limit: int | None = None
    seed: int = 1234
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ("\n",)
    no_answer_text: str = "unanswerable"
    layout: str = "passage_question"  # squad_chat: the user turn's layout (prepare-sft's --layout)
    num_choices: int = 4
    stride: int | None = None
    batch_size: int = 8
    description: str = ""
    source: str = field(default="", compare=False)  # the YAML file, for messages

    def __post_init__(self):
        where = f"task {self.name!r} ({self.source or 'inline'})"
        if self.kind not in KINDS:
            raise ConfigError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.metric:
            object.__setattr__(self, "metric", KINDS[self.kind][0])
        if self.metric not in KINDS[self.kind]:
            raise ConfigError(f"{where}: metric {self.metric!r} is not one of {self.kind}'s metrics: {', '.join(KINDS[self.kind])}")
        for key, low in (("num_shots", 0), ("num_choices", 2), ("batch_size", 1)):
            if getattr(self, key) < low:
                raise ConfigError(f"{where}: {key} must be >= {low}, got {getattr(self, key)}")
        try:  # greedy generation's parameters, in the ranges every generation takes (openllm_ds.inference.sampling)
            params = SamplingParams.build({"max_tokens": "max_new_tokens"}, max_tokens=self.max_new_tokens,
                                          temperature=0.0, stop=self.stop)
        except UserError as e:
            raise ConfigError(f"{where}: {e}") from None
        object.__setattr__(self, "stop", params.stop)
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{where}: limit must be >= 1 or null (all), got {self.limit}")
        from openllm_ds.config import LAYOUTS

        if self.layout not in LAYOUTS:
            raise ConfigError(f"{where}: layout must be {' or '.join(LAYOUTS)}, got {self.layout!r}")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"{where}: stride must be >= 1 or null (half the context), got {self.stride}")

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def task_dirs() -> list[Path]:
    """Where task names are looked up: ./eval, then the task YAMLs shipped with the package."""
    from openllm_ds.presets import shipped_dir

    dirs = [Path.cwd() / "eval", shipped_dir("eval")]
    out = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def available_tasks() -> dict[str, Path]:
    """Task name -> YAML file, from the task dirs (first one wins)."""
    found: dict[str, Path] = {}
    for d in task_dirs():
        for f in sorted(d.glob("*.yaml")):
            found.setdefault(f.stem, f)
    return found


def resolve_data_path(data: str, yaml_file: Path | None, fix: str = "") -> Path:
    """A task's data path: absolute as written; a relative one is tried against the working directory, then
    the repository root the YAML belongs to (the parent of its eval/ folder), then the YAML's own folder.
    The first that exists wins; else a UserError naming every place tried and ``fix``."""
    p = Path(data).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p]
    if yaml_file is not None and not p.is_absolute():
        folder = yaml_file.resolve().parent
        root = next((d.parent for d in (folder, folder.parent) if d.name == "eval"), folder.parent)
        candidates += [root / p, folder / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    tried = ", ".join(dict.fromkeys(str(c) for c in candidates))
    fix = fix or "fix 'data:' in the task YAML or create the file (e.g. `openllm-ds prepare`)"
    raise UserError(f"task {yaml_file or ''}: data file {data!r} not found (tried {tried}); {fix}")


def load_task(task: str | Path | TaskSpec, check_data: bool = True) -> TaskSpec:
    """A TaskSpec from a YAML path or a task name in eval/; the data path is made absolute."""
    if isinstance(task, TaskSpec):
        return task
    text = str(task)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") and path.exists():
        check_path(path, "task file", "file", "pass a task YAML or a task name (eval/*.yaml)")
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        known = available_tasks()
        name = path.stem if path.suffix in (".yaml", ".yml") else text
        if name not in known:
            names = ", ".join(sorted(known)) or "none (no eval/ folder found)"
            raise UserError(f"unknown task {text!r}; available tasks: {names} (or pass a path to a task YAML)")
        path = known[name]
    raw = read_yaml(path, "write a mapping of name, kind, data, metric, ... (see eval/*.yaml)", "task file",
                    (dict, type(None)), ConfigError) or {}
    fields = {f.name for f in dataclasses.fields(TaskSpec)} - {"source"}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"task file {path}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(fields))}")
    for key in ("kind", "data"):
        if not raw.get(key):
            raise ConfigError(f"task file {path} lacks '{key}:' (kind: {' | '.join(KINDS)}; data: a file path)")
    raw.setdefault("name", path.stem)  # stop: a string or a list, as TaskSpec takes it
    data = resolve_data_path(str(raw["data"]), path) if check_data else Path(str(raw["data"]))
    try:
        return TaskSpec(**{**raw, "data": str(data), "source": str(path)})
    except TypeError as e:
        raise ConfigError(f"task file {path}: {e}") from None


def run_task_on_model(task, model, tokenizer, progress: bool = True) -> dict:
    """Run one task on a model in memory (e.g. from the trainer); returns the result dict."""
    from openllm_ds.evaluation import chat_tasks, qa_tasks

    spec = load_task(task)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.cfg.vocab_size}; "
                        "use the tokenizer the model was trained with")
    if spec.kind in ("squad_qa", "squad_chat", "cloze") and spec.max_new_tokens > model.cfg.max_seq_len - 2:
        raise UserError(f"task {spec.name!r} ({spec.source or 'inline'}): max_new_tokens {spec.max_new_tokens} leaves "
                        f"no room for a prompt in the model's context of {model.cfg.max_seq_len} tokens; lower "
                        f"max_new_tokens to {max(1, model.cfg.max_seq_len // 4)} or so")
    runners = {
        "perplexity": run_perplexity,
        "squad_qa": qa_tasks.run_squad_qa,
        "squad_chat": chat_tasks.run_squad_chat,
        "cloze": qa_tasks.run_cloze,
        "answer_ranking": qa_tasks.run_answer_ranking,
    }
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        metrics = runners[spec.kind](spec, model, tokenizer, progress)
    finally:
        model.train(was_training)
    baselines = metrics.pop("baseline")
    return {
        "task": spec.name,
        "kind": spec.kind,
        "metric": spec.metric,
        "value": metrics[spec.metric],
        "baseline": baselines[spec.metric],
        "baseline_kind": metrics.pop("baseline_kind"),
        "higher_is_better": spec.higher_is_better,
        "num_examples": metrics.pop("num_examples"),
        "metrics": metrics,
        "baselines": baselines,
        "data": spec.data,
        "seconds": round(time.perf_counter() - start, 3),
    }


def run_task(task_yaml_or_name, model_dir, step: int | None = None, device: str | None = None,
             progress: bool = True) -> dict:
    """Run one harness task on the checkpoint at ``step`` (default: latest) of ``model_dir``."""
    from openllm_ds.checkpoint import load_model
    from openllm_ds.utils import select_device

    spec = load_task(task_yaml_or_name)
    loaded = load_model(model_dir, step=step, device=device or select_device())
    result = run_task_on_model(spec, loaded.model, loaded.tokenizer, progress)
    return {**result, "step": loaded.step, "model_dir": str(model_dir), "checkpoint": str(loaded.path)}


# ---- perplexity -----------------------------------------------------------------------------------

def run_perplexity(spec: TaskSpec, model, tokenizer, progress: bool) -> dict:
    from openllm_ds.evaluation.sliding_window import (encode_documents, perplexity, perplexity_metrics,
                                                  read_documents, text_stats)

    docs = read_documents(spec.data, spec.limit)
    stats = text_stats(docs)
    ids = encode_documents(tokenizer, docs)
    stride = spec.stride or max(1, model.cfg.max_seq_len // 2)
    total_nll, num_tokens = perplexity(model, ids, model.cfg.max_seq_len, stride, spec.batch_size, progress)
    # the best context-free model of these very tokens: their empirical unigram distribution
    counts = Counter(ids[1:])
    unigram_nll = -sum(c * math.log(c / num_tokens) for c in counts.values())
    return {
        **perplexity_metrics(total_nll, num_tokens, stats),
        "baseline": perplexity_metrics(unigram_nll, num_tokens, stats),
        "baseline_kind": "unigram (the empirical token distribution of the evaluated text)",
        "uniform_perplexity": float(model.cfg.vocab_size),
        "num_examples": stats.num_documents,
        "num_tokens": num_tokens,
        "num_words": stats.num_words,
        "num_bytes": stats.num_bytes,
        "stride": stride,
    }
