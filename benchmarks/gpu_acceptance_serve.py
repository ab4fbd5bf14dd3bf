"""The serving stage of the GPU acceptance run (benchmarks/gpu_acceptance.py): a Hugging Face export, greedy
continuations from `openllm-ds generate`, the built-in server and vLLM (where installed), compared.

Greedy text is token-exact only between equal computations: two sides on one device and dtype must agree on every
prompt (a check). Where the sides differ (fp16 against fp32, CPU against GPU) the stage reports "k of N identical,
first divergence at token t" with both sides named, and the check is marked as reported, not failed: a correct model
may differ there. The built-in server loads where `generate` does (openllm_ds.inference.load_completer: CUDA when
visible, the export's dtype), so the two are compared exactly.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
from pathlib import Path

from gpu_acceptance_train import (ROOT, Ctx, TrainRun, error_tail, free_port, preset, run, small_run_name, train,
                                  zero)

MODEL_NAME = "acceptance"


def cli(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "openllm_ds", *args]


def export_dtype(export: Path) -> str:
    cfg = json.loads((export / "config.json").read_text())
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").removeprefix("torch.")


def model_to_export(ctx: Ctx) -> Path | None:
    """The small stage's model when it trained in this work dir; else a short run of the same preset made here."""
    from openllm_ds.checkpoint import CHECKPOINTS, LATEST

    small = ctx.work / "models" / small_run_name(ctx.plan)
    if (small / CHECKPOINTS / LATEST).is_file():
        return small
    plan = ctx.plan
    res = train(ctx, TrainRun("serve-model", plan.small, zero(2), plan.fp16, False, min(plan.steps, 30)))
    ctx.stages[ctx.stage]["runs"].append(res)
    if not res["ok"]:
        ctx.check("serve: a model to export", False, f"the small stage has no model here and training one failed: "
                                                      f"{res['error']}")
        return None
    return ctx.work / "models" / "serve-model"


def stage_export(ctx: Ctx, model: Path) -> Path | None:
    out = ctx.work / "exports" / "huggingface"
    shutil.rmtree(out, ignore_errors=True)
    p = run(ctx, "export", cli("export", "--model_dir", str(model), "--format", "huggingface", "--output_dir",
                               str(out)), ctx.timeout(300))
    ctx.stages[ctx.stage]["export"] = {"ok": p.returncode == 0, "model": str(model), "dir": str(out),
                                       "wall_s": round(p.wall_s, 1)}
    ctx.check("export: Hugging Face files written and verified (logits against ours)", p.returncode == 0,
              error_tail(p) if p.returncode else f"{out} from {model.name} in {p.wall_s:.0f} s")
    return out if p.returncode == 0 else None


def generate(ctx: Ctx, export: Path, device: str) -> dict:
    """Greedy continuations of every prompt by `openllm-ds generate` on ``device`` (cpu: no GPU visible to it)."""
    texts, env = {}, ({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})
    for i, prompt in enumerate(ctx.plan.prompts):
        p = run(ctx, f"generate-{device}-{i}", cli("generate", "--model_dir", str(export), "--prompt", prompt,
                                                   "--max_new_tokens", str(ctx.plan.new_tokens), "--temperature", "0"),
                ctx.timeout(300), env)
        if p.returncode or not p.stdout.startswith(prompt):
            why = error_tail(p) if p.returncode else f"stdout does not start with the prompt: {p.stdout[:200]!r}"
            return {"ok": False, "error": why}
        texts[prompt] = p.stdout[len(prompt):].removesuffix("\n")
    return {"ok": True, "texts": texts}


def http_json(port: int, method: str, path: str, body: dict | None = None, timeout: float = 300):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def serve_and_complete(ctx: Ctx, name: str, engine: str, export: Path, extra: tuple[str, ...] = (),
                       ready_s: float = 300) -> dict:
    """`openllm-ds serve --engine ENGINE` on a free port; greedy completions of the prompts; then stopped."""
    port = free_port()
    context_length = preset(ctx.plan.small)["model"]["max_seq_len"]
    cmd = cli("serve", "--model_dir", str(export), "--engine", engine, "--port", str(port), "--context_length",
              str(context_length), "--model_name", MODEL_NAME, *extra)
    ctx.command(name, cmd)
    log = ctx.work / "logs" / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
                mine = [ln for ln in tail if ln.startswith("error:")]
                return {"ok": False, "error": (mine or tail[-4:] or ["no output"])[-1][-1500:]}
            try:
                if http_json(port, "GET", "/health", timeout=5)[0] == 200:
                    break
            except (OSError, ValueError):
                pass
            if time.perf_counter() - t0 > min(ready_s, ctx.timeout(ready_s)):
                return {"ok": False, "error": f"no answer on /health within {ready_s:.0f} s (log {log})"}
            time.sleep(0.5)
        ready, texts = time.perf_counter() - t0, {}
        for prompt in ctx.plan.prompts:
            try:
                status, body = http_json(port, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": prompt,
                                                                          "max_tokens": ctx.plan.new_tokens,
                                                                          "temperature": 0})
                if status != 200:
                    return {"ok": False, "error": f"/v1/completions: HTTP {status}: {json.dumps(body)[:500]}"}
                texts[prompt] = body["choices"][0]["text"]
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
                return {"ok": False, "error": f"/v1/completions: {type(e).__name__}: {e}"}
        return {"ok": True, "ready_s": round(ready, 1), "texts": texts, "log": str(log)}
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it stops its own children, vLLM included), then SIGKILL."""
    import os
    import signal

    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind in its group
    except (ProcessLookupError, PermissionError):
        pass


def divergence(tokenizer, prompt: str, a: str, b: str) -> int | None:
    """The first token (of the continuation) where two continuations of ``prompt`` differ; None when equal."""
    if a == b:
        return None
    base = len(tokenizer.encode(prompt))
    ia, ib = tokenizer.encode(prompt + a)[base:], tokenizer.encode(prompt + b)[base:]
    return next((i for i, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))


def compare(ctx: Ctx, export: Path, label: str, got: dict, got_side: str, ref: dict, ref_side: str) -> dict:
    """Check ``got`` against ``ref`` (each {ok, texts}); exact where the sides (device and dtype) are equal."""
    from openllm_ds.tokenizer import load_tokenizer

    what = f"{label} ({got_side}) == openllm-ds generate ({ref_side}), greedy"
    if not got["ok"]:
        ctx.check(what, False, got["error"])
        return {}
    tok = load_tokenizer(export)
    at = {p: divergence(tok, p, got["texts"][p], ref["texts"][p]) for p in ctx.plan.prompts}
    same = [p for p, t in at.items() if t is None]
    first = min((t for t in at.values() if t is not None), default=None)
    n = len(ctx.plan.prompts)
    text = f"{len(same)} of {n} identical ({ctx.plan.new_tokens} new tokens each)" + \
           ("" if first is None else f", first divergence at token {first}")
    if got.get("ready_s") is not None:
        text += f"; ready in {got['ready_s']} s"
    exact = got_side == ref_side
    ctx.check(what, len(same) == n if exact else (True if len(same) == n else None),
              text + ("" if exact or len(same) == n else "; the sides differ, so this is reported, not required"))
    return {"identical": len(same), "of": n, "first_divergence": first, "sides": [got_side, ref_side]}


def stage_serve(ctx: Ctx) -> None:
    plan, res = ctx.plan, ctx.stages[ctx.stage]
    model = model_to_export(ctx)
    export = stage_export(ctx, model) if model else None
    if export is None:
        return
    dtype = export_dtype(export)
    gpu = "cpu" if plan.dry_run else "cuda"
    sides = {"generate": f"{gpu}, {dtype}", "builtin": f"{gpu}, {dtype}"}  # one loader, one device and dtype
    res["generate"] = ours = generate(ctx, export, gpu)
    ctx.check(f"generate: greedy continuations ({sides['generate']})", ours["ok"],
              ours.get("error") or f"{len(plan.prompts)} prompts, {plan.new_tokens} new tokens each")
    if not ours["ok"]:
        return
    reference = ours
    res["builtin"] = serve_and_complete(ctx, "serve-builtin", "builtin", export, ready_s=180)
    if reference["ok"]:
        res["builtin_vs_generate"] = compare(ctx, export, "built-in server", res["builtin"], sides["builtin"],
                                             reference, sides["builtin"])
    else:
        ctx.check("built-in server == openllm-ds generate", False, f"generate on {gpu}: {reference['error']}")
    if plan.vllm == "off":
        ctx.check("vLLM == openllm-ds generate (greedy)", None, "not tried (--vllm off)")
        return
    stage_vllm(ctx, export, ours, sides["generate"])


def stage_vllm(ctx: Ctx, export: Path, ours: dict, ours_side: str) -> None:
    """`serve --engine vllm` in the export's dtype (what serve passes by itself), else in float16 where vLLM's
    build cannot run that dtype; compared with generate's text, dtypes named."""
    res, dtype = ctx.stages[ctx.stage], export_dtype(export)
    device = ours_side.split(",")[0]
    for extra in ((), ("--vllm_arg=--dtype=float16",)):
        side = f"{device}, {'float16' if extra else dtype}"
        served = serve_and_complete(ctx, f"serve-vllm-{side.split(', ')[1]}", "vllm", export,
                                    (*extra, "--vllm_arg=--enforce-eager"), ready_s=420)
        served["side"] = side
        res.setdefault("vllm_tries", []).append(served)
        unavailable = "--engine vllm:" in served.get("error", "")  # the CLI's word: not installed, no GPU
        if served["ok"] or unavailable or (extra == () and dtype == "float16"):
            break
    res["vllm"] = served
    if unavailable:
        ctx.check("vLLM == openllm-ds generate (greedy)", None, served["error"])
    else:
        res["vllm_vs_generate"] = compare(ctx, export, "vLLM", served, served["side"], ours, ours_side)
