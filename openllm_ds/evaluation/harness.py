"""Harness tasks x checkpoints, fanned out across Ray workers, written where training logs live.

One Ray task per (task, checkpoint). Results go to:
- the run's TensorBoard (``<model_dir>/tensorboard/``, tags ``harness/<task>/<metric>`` and
  ``harness/<task>/baseline_<metric>`` at global step = checkpoint step, beside the training curves);
- a JSON report (``<model_dir>/eval/report.json`` unless ``output`` is given);
- ``<model_dir>/eval/summary.md``: one table per task, and ``curves.png``, each task's headline
  metric against the step (perplexity on a log axis) with its baseline dashed.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

from tqdm import tqdm

from openllm_ds.checkpoint import is_hf_export, list_checkpoints, resolve_checkpoint
from openllm_ds.errors import UserError
from openllm_ds.evaluation.tasks import TaskSpec, load_task, run_task
from openllm_ds.output_lock import OutputLock
from openllm_ds.paths import normal_path
from openllm_ds.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

TAG_PREFIX = "harness"


def resolve_steps(model_dir: str | Path, checkpoints: str | None) -> list[int | None]:
    """'all' | 'latest' | '10,20' -> training steps (None: an export, whose step may be unknown)."""
    root = Path(model_dir)
    spec = (checkpoints or "latest").strip()
    if is_hf_export(root):
        if spec not in ("all", "latest"):
            raise UserError(f"--model_dir {root} is a Hugging Face export (one set of weights); "
                            f"use --checkpoints latest or all, not {spec!r}")
        return [None]
    if spec == "latest":
        from openllm_ds.checkpoint import checkpoint_step

        return [checkpoint_step(resolve_checkpoint(root))]
    have = [s for s, _ in list_checkpoints(root)]
    if not have:
        resolve_checkpoint(root)  # raises the "no checkpoint" error with the full explanation
    if spec == "all":
        return have
    try:
        wanted = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--checkpoints must be 'all', 'latest' or a comma list of steps (e.g. 100,200), got {spec!r}") from None
    missing = [s for s in wanted if s not in have]
    if missing or not wanted:
        raise UserError(f"--checkpoints {spec}: no complete checkpoint for step {missing[0] if missing else '?'} "
                        f"in {root} (have: {', '.join(map(str, have))})")
    return sorted(set(wanted))


def _run_job(spec: TaskSpec, model_dir: str, step: int | None) -> dict:
    """One (task, checkpoint) on a worker; a UserError comes back as a result, not a crash."""
    try:
        return run_task(spec, model_dir, step=step, progress=False)
    except UserError as e:
        return {"task": spec.name, "step": step, "error": str(e)}


def run_jobs(jobs: list[tuple[TaskSpec, int | None]], model_dir: str, num_workers: int) -> list[dict]:
    """Run every (task, step) job: in this process when num_workers is 0, else on Ray with at
    most ``num_workers`` jobs in flight."""
    results = []
    if num_workers == 0:
        for spec, step in tqdm(jobs, desc="harness", unit="job"):
            results.append(_run_job(spec, model_dir, step))
        return results
    from openllm_ds.utils import init_ray

    ray = init_ray()
    gpus = ray.cluster_resources().get("GPU", 0)
    # on a GPU cluster the workers share the GPUs (tiny evaluation models fit many to a GPU)
    remote = ray.remote(num_cpus=1, num_gpus=min(1.0, gpus / num_workers) if gpus else 0)(_run_job)
    pending = list(jobs)
    in_flight = []
    with tqdm(total=len(jobs), desc=f"harness ({num_workers} Ray workers)", unit="job") as bar:
        while pending or in_flight:
            while pending and len(in_flight) < num_workers:
                spec, step = pending.pop(0)
                in_flight.append(remote.remote(spec, model_dir, step))
            done, in_flight = ray.wait(in_flight, num_returns=1)
            results.extend(ray.get(done))
            bar.update(len(done))
    return results


def run_harness(model_dir, tasks, checkpoints: str | None = None, num_workers: int = 2,
                output: str | None = None, extra_specs: list[TaskSpec] = ()) -> dict:
    """Run ``tasks`` (names or YAML paths) on the checkpoints of ``model_dir``; write the report,
    the TensorBoard scalars, summary.md and curves.png; return the report."""
    if num_workers < 0:
        raise UserError(f"--num_workers must be >= 0 (0 = in this process), got {num_workers}")
    specs = [load_task(t) for t in tasks] + list(extra_specs)  # bad task or data fails here, before any work
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"task names repeat in --tasks: {', '.join(names)}")
    root = normal_path(model_dir)
    steps = resolve_steps(root, checkpoints)
    with OutputLock(root / "eval", "evaluate", "--model_dir (its eval/)"):  # one writer of the run's eval/
        return _run_harness(root, specs, names, steps, num_workers, output)


def _run_harness(root: Path, specs: list[TaskSpec], names: list[str], steps: list[int | None], num_workers: int,
                 output: str | None) -> dict:
    start = time.perf_counter()
    jobs = [(spec, step) for step in steps for spec in specs]
    results = run_jobs(jobs, str(root), num_workers)
    errors = [r for r in results if "error" in r]
    if errors:
        raise UserError(f"task {errors[0]['task']} at step {errors[0]['step']}: {errors[0]['error']}")
    results.sort(key=lambda r: (names.index(r["task"]), r["step"] if r["step"] is not None else -1))

    eval_dir = root / "eval"
    report_path = Path(output) if output else eval_dir / "report.json"
    report = {
        "model_dir": str(root),
        "tasks": {s.name: s.to_dict() for s in specs},
        "steps": steps,
        "results": results,
        "seconds": round(time.perf_counter() - start, 2),
        "report": str(report_path),
        "summary": str(eval_dir / "summary.md"),
        "plot": str(eval_dir / "curves.png"),
        "tensorboard_dir": None,
    }
    if all(s is not None for s in steps):
        report["tensorboard_dir"] = str(write_tensorboard(root / "tensorboard", results))
    write_plot(eval_dir / "curves.png", results, names)
    atomic_write_text(eval_dir / "summary.md", summary_markdown(report, names))
    atomic_write_json(report_path, report)
    return report


def write_tensorboard(log_dir: Path, results: list[dict]) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    log_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(log_dir), filename_suffix=".harness")
    try:
        for r in results:
            for key, value in _scalars(r).items():
                writer.add_scalar(f"{TAG_PREFIX}/{r['task']}/{key}", value, global_step=r["step"])
    finally:
        writer.close()
    return log_dir


def _scalars(result: dict) -> dict[str, float]:
    """The numeric metrics of a result, plus baseline_<metric> for each baseline."""
    out = {k: float(v) for k, v in result["metrics"].items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    out.update({f"baseline_{k}": float(v) for k, v in result["baselines"].items()})
    out["num_examples"] = float(result["num_examples"])
    return out


def write_plot(path: Path, results: list[dict], names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.5 * nrows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        rows = [r for r in results if r["task"] == name]
        steps = [r["step"] if r["step"] is not None else 0 for r in rows]
        ax.plot(steps, [r["value"] for r in rows], marker="o", label=rows[0]["metric"])
        ax.plot(steps, [r["baseline"] for r in rows], linestyle="--", marker="x", color="grey", label="baseline")
        if rows[0]["kind"] == "perplexity" and rows[0]["metric"] in ("perplexity", "word_perplexity"):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(rows[0]["metric"])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def summary_markdown(report: dict, names: list[str]) -> str:
    lines = [f"# Evaluation of {report['model_dir']}", "",
             f"{len(report['results'])} runs: {len(names)} task(s) x {len(report['steps'])} checkpoint(s), "
             f"{report['seconds']:.1f} s.", "", "![metrics against step](curves.png)", ""]
    for name in names:
        rows = [r for r in report["results"] if r["task"] == name]
        first = rows[0]
        better = "higher" if first["higher_is_better"] else "lower"
        lines += [f"## {name} ({first['kind']})", "",
                  f"Metric: `{first['metric']}` ({better} is better); baseline: {first['baseline_kind']}.", "",
                  f"| step | {first['metric']} | baseline | examples |", "|---:|---:|---:|---:|"]
        for r in rows:
            step = r["step"] if r["step"] is not None else "export"
            lines.append(f"| {step} | {r['value']:.4g} | {r['baseline']:.4g} | {r['num_examples']} |")
        lines.append("")
    return "\n".join(lines)
