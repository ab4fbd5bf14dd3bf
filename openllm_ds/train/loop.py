"""``train(cfg)``: the one training loop, whichever launcher started the process.

    set up  -> process group, checks, token shards, output dir, DeepSpeed engine, resume
    loop    -> step (grad-accumulated through the engine) -> log -> on a loss spike, roll back to the
               last good checkpoint -> maybe validate -> maybe save
    finish  -> final validation and checkpoint, summary
"""

from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from openllm_ds.config import RunConfig
from openllm_ds.errors import TrainingError, UserError
from openllm_ds.model import Transformer
from openllm_ds.train.checkpointing import TRAINING_RUN, TrainState, load_checkpoint, save_checkpoint
from openllm_ds.train.data import DataPosition, DataSource, EvalWindows, TrainBatches, load_sources
from openllm_ds.train.distributed import (DistEnv, all_reduce_mean, all_reduce_sum, broadcast_object, import_deepspeed,
                                         init_distributed)
from openllm_ds.train.ds_config import zero_stage
from openllm_ds.train.metrics import RunLog, exp_loss, flops_per_token, memory_gb, peak_flops
from openllm_ds.train.optim import build_lr_scheduler, param_groups
from openllm_ds.train.preflight import RunInputs, RunLock, check_lengths, check_run_inputs
from openllm_ds.train.spikes import SpikeGuard
from openllm_ds.tokenizer.chat import IGNORE_INDEX
from openllm_ds.utils import OutputKind, atomic_dir, keep_freed_memory, write_manifest

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def train(cfg: RunConfig, hold_lock: bool = True) -> dict:
    """Train ``cfg.model`` on the training sources with DeepSpeed; returns a summary of the run.

    The output dir's lock is taken before anything is read there (a second run on it stops at once, before its
    checks could see a half-written run); ``hold_lock=False``: the launcher holds it (Ray Train's driver)."""
    env = init_distributed()
    if env.device == "cpu":
        keep_freed_memory()  # no page faults for every step's fresh buffers
    out = Path(cfg.output_dir).resolve()
    with RunLock(out, env, holder=hold_lock):
        sft = None
        if cfg.finetune.model_dir:  # a fine-tune: conversations instead of token shards (finetune/run.py)
            from openllm_ds.finetune.run import load_sft

            cfg, sft = load_sft(cfg, env)
        cfg, inputs = check_run_inputs(cfg, env)
        return _train(cfg, env, inputs, out, sft)


def _train(cfg: RunConfig, env: DistEnv, inputs: RunInputs, out: Path, sft=None) -> dict:
    log = RunLog(env, out)

    t = cfg.train
    if sft is not None:
        from openllm_ds.finetune.run import sft_data

        sources, batches, eval_sets, data_sha256, notes = sft_data(cfg, inputs.tokenizer, env, sft)
    else:
        sources, batches, eval_sets, data_sha256, notes = token_data(cfg, inputs, env)
    T = cfg.model.max_seq_len

    engine, num_params = build_engine(cfg, inputs, env)
    stage = zero_stage(inputs.ds_config)
    state = TrainState(data=DataPosition.start(len(sources)).sources, source_tokens=[0] * len(sources),
                       data_sha256=data_sha256, tokenizer_sha256=inputs.tokenizer.sha256)
    if inputs.resume_from is not None:
        t0 = time.perf_counter()
        state = check_resumed_data(load_checkpoint(engine, inputs.resume_from, env, inputs.universal, cfg.model), sources,
                                   data_sha256, cfg, inputs.resume_from, log)
        if inputs.resume_note:
            log.info(f"{inputs.resume_note}; loaded in {time.perf_counter() - t0:.1f} s")
        state.tokenizer_sha256 = inputs.tokenizer.sha256  # checked against the checkpoint's by check_run_inputs
        where = ", ".join(f"{src.name + ' ' if len(sources) > 1 else ''}epoch {e}, window {i}" for src, (e, i, _) in
                          zip(sources, state.data))
        log.info(f"resumed from {inputs.resume_from} at step {state.step} ({where})")
    elif t.init_from:
        log.info(f"starting from the weights of {t.init_from} (train.init_from): step 0, a new optimizer and "
                 "learning-rate schedule")
    if inputs.complete:
        log.info(f"{inputs.resume_from} is at train.max_steps ({cfg.train.max_steps}): the run is complete, nothing "
                 "to train; pass a larger --max_steps to train on")
    elif env.is_rank_zero:  # only once the inputs and the resumed checkpoint are known to be usable
        prepare_output_dir(cfg, out)
    resumed_step = state.step
    state.world_size, state.zero_stage, state.global_batch = env.world_size, stage, batches.global_batch

    peak_source = peak_flops(env.torch_device, PRECISION_DTYPES[inputs.precision])
    peak = peak_source.flops
    flops_tok = flops_per_token(cfg.model, num_params)
    log.info(f"model: {num_params:,} parameters ({cfg.model.n_layers} layers, d_model {cfg.model.d_model}, "
             f"{cfg.model.n_heads} heads, context {T}); {env.world_size} rank(s) on {env.device}, {inputs.precision}, "
             f"ZeRO-{stage}; global batch {batches.global_batch} x {T} tokens; "
             f"{batches.steps_per_epoch} steps per epoch; output {out}")
    if notes.get("finetune"):
        n = notes["finetune"]
        log.info(f"fine-tuning {n['base_model']} on {n['conversations']:,} conversations ({t.max_steps} steps); "
                 f"padding {n['padding_share']:.1%} of the batches; {n['truncated']} conversation(s) longer than the "
                 f"context truncated")
    if len(sources) > 1:
        log.info("data: " + ", ".join(f"{s.name} {s.weight:.1%} ({len(s.train):,} tokens)" for s in sources))

    last_ckpt = inputs.resume_from
    loss = None
    guard = SpikeGuard(t.spike_factor, t.spike_steps)
    run_start, run_tokens = time.perf_counter(), 0
    log.start(state.step, t.max_steps, t.log_every, {
        "parameters": f"{num_params:,}", "layers / d_model / heads / context": f"{cfg.model.n_layers} / "
        f"{cfg.model.d_model} / {cfg.model.n_heads} / {T}", "ranks": env.world_size, "device": env.device,
        "precision": inputs.precision, "ZeRO stage": stage, "global batch (sequences)": batches.global_batch,
        "tokens per step (global batch x context)": f"{batches.global_batch * T:,}", "training FLOPs per token": f"{flops_tok:.4g}",
        "peak FLOP/s per rank (perf/mfu's denominator)": peak_source.source, "max steps": t.max_steps})
    try:
        while state.step < t.max_steps:
            t0 = time.perf_counter()
            micro_batches, pos, taken = batches.next_batch(DataPosition(state.data))
            step_tokens = batches.step_tokens(taken)
            lr = engine.get_lr()[0]
            loss, grad_norm, skipped = train_step(engine, micro_batches, env, stage, inputs.precision)
            dt = time.perf_counter() - t0
            state.step += 1
            state.data = pos.sources
            state.source_tokens = [n + k for n, k in zip(state.source_tokens, step_tokens)]
            state.tokens_seen += sum(step_tokens)
            state.nonfinite_skipped += skipped
            run_tokens += sum(step_tokens)
            tokens_per_sec = sum(step_tokens) / dt
            log.step(state.step, loss, tokens_per_sec)
            if state.step % t.log_every == 0 or state.step == t.max_steps:
                log.scalars(state.step, {
                    "train/loss": loss, "train/perplexity": exp_loss(loss), "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    **({"train/loss_scale": loss_scale(engine)} if inputs.precision == "fp16" else {}),
                    "perf/tokens_per_s": tokens_per_sec,
                    "perf/mfu": flops_tok * tokens_per_sec / (peak * env.world_size),
                    "perf/memory_gb": memory_gb(env.torch_device),
                    **({f"data/share/{s.name}": share for s, share in zip(sources, token_shares(state))}
                       if len(sources) > 1 else {}),
                })
            guard.observe(state, loss)
            if guard.tripped:
                state = roll_back(engine, state, last_ckpt, guard, cfg, env, log,
                                  universal=inputs.universal and last_ckpt == inputs.resume_from)
                continue
            if state.step % t.eval_every == 0 or state.step == t.max_steps:
                state.source_eval_losses = [validate(engine, w, env) for w in eval_sets]
                state.last_eval_loss = sum(s.weight * v for s, v in zip(sources, state.source_eval_losses))
                log.scalars(state.step, {"eval/loss": state.last_eval_loss,
                                         "eval/perplexity": exp_loss(state.last_eval_loss),
                                         **({f"eval/{s.name}/loss": v for s, v in zip(sources, state.source_eval_losses)}
                                            if len(sources) > 1 else {})})
                log.info(f"step {state.step}: train loss {loss:.4f}, val loss {state.last_eval_loss:.4f}, "
                         f"val perplexity {exp_loss(state.last_eval_loss):.2f}")
                if inputs.eval_tasks:
                    results = run_eval_tasks(engine, inputs, env, stage)
                    log.scalars(state.step, {f"harness/{r['task']}/{r['metric']}": r["value"] for r in results})
                    log.info(f"step {state.step}: " + ", ".join(f"{r['task']} {r['metric']} {r['value']:.4g} "
                                                                f"(baseline {r['baseline']:.4g})" for r in results))
            if state.step % t.save_every == 0 or state.step == t.max_steps:
                if guard.streak:
                    log.info(f"step {state.step}: not saving a checkpoint after a non-finite or spiking loss")
                else:
                    last_ckpt = save_checkpoint(engine, cfg, state, env, stage)
    finally:
        log.close()

    elapsed = time.perf_counter() - run_start
    summary = {
        "final_step": state.step,
        "train_loss": loss,
        "val_loss": state.last_eval_loss,
        "val_perplexity": exp_loss(state.last_eval_loss) if state.last_eval_loss is not None else None,
        "tokens_seen": state.tokens_seen,
        "num_params": num_params,
        "output_dir": str(out),
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "nonfinite_skipped": state.nonfinite_skipped,
        "rollbacks": state.rollbacks,
        "resumed_from_step": resumed_step if inputs.resume_from is not None else None,
        "world_size": env.world_size,
        "precision": inputs.precision,
        "zero_stage": stage,
        "elapsed_s": round(elapsed, 2),
        "tokens_per_sec": run_tokens / elapsed if elapsed > 0 else None,
        "sources": [{"name": s.name, "source": s.source, "weight": s.weight, "token_share": share,
                     "train_tokens": len(s.train), "validation": s.val_name, "val_loss": v}
                    for s, share, v in zip(sources, token_shares(state),
                                           state.source_eval_losses or [None] * len(sources))],
        **notes,
    }
    return summary


def token_data(cfg: RunConfig, inputs: RunInputs, env: DistEnv):
    """Pretraining's data: (sources, batches of windows, validation windows, data fingerprint, notes: none)."""
    t = cfg.train
    sources = load_sources(cfg, inputs.tokenizer.sha256, env)
    check_lengths(cfg, sources, env.world_size)
    T = cfg.model.max_seq_len
    batches = TrainBatches([s.train for s in sources], [s.weight for s in sources], T, t.micro_batch_size,
                           t.gradient_accumulation_steps, env, t.seed)
    eval_sets = [EvalWindows(s.val, T, t.eval_batches * t.micro_batch_size, t.micro_batch_size, env) for s in sources]
    return sources, batches, eval_sets, data_fingerprint(sources), {}


def token_shares(state: TrainState) -> list[float]:
    total = sum(state.source_tokens)
    return [n / total if total else 0.0 for n in state.source_tokens]


def data_fingerprint(sources: list[DataSource]) -> str:
    """What the run trains on: each source's documents (meta.json's source_sha256), how they were split and
    deduplicated, and its weight."""
    import hashlib
    import json

    parts = [[s.train.meta["source_sha256"], s.train.meta["source"]["holdout"], s.train.meta["source"]["dedup"],
              round(s.weight, 12)] for s in sources]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def check_resumed_data(state: TrainState, sources: list[DataSource], data_sha256: str, cfg: RunConfig,
                       tag_dir: Path, log: RunLog) -> TrainState:
    """A checkpoint goes on with the data it was trained on; other data only when the user says so."""
    if state.data_sha256 in (None, data_sha256) and len(state.data) == len(sources):
        state.data_sha256 = data_sha256
        state.source_tokens = state.source_tokens or [state.tokens_seen] + [0] * (len(sources) - 1)
        return state
    if not cfg.train.allow_data_change:
        raise UserError(f"checkpoint {tag_dir} was trained on other data than {', '.join(s.source for s in sources)} "
                        "(their documents, holdout or weights differ); resume with the run's own --data_file/"
                        "--data_files, pass train.allow_data_change=true to go on from this step with the new data "
                        "(from the start of its order), or start a new --output_dir")
    log.info(f"train.allow_data_change: {tag_dir.name} was trained on other data; going on from step {state.step} "
             "with the new data from the start of its order")
    state.data = DataPosition.start(len(sources)).sources
    state.source_tokens = [0] * len(sources)
    state.data_sha256 = data_sha256
    return state


def roll_back(engine, state: TrainState, last_ckpt: Path | None, guard: SpikeGuard, cfg: RunConfig, env: DistEnv,
              log: RunLog, universal: bool = False) -> TrainState:
    """Reload the last good checkpoint and continue with the data after the bad steps (all ranks agree:
    the loss they judge is already averaged over ranks). Stops the run when no rollback is left."""
    t = cfg.train
    what = guard.describe(state)
    if last_ckpt is None or state.rollbacks >= t.max_rollbacks:
        why = ("no checkpoint was saved before them" if last_ckpt is None
               else f"{state.rollbacks} rollback(s) made already, train.max_rollbacks={t.max_rollbacks}")
        raise TrainingError(f"{what}; {why}, so the run stops; the last good checkpoint is "
                            f"{last_ckpt or 'none (no checkpoint yet)'}; lower train.learning_rate, raise "
                            "train.warmup_steps, or check the data")
    restored = load_checkpoint(engine, last_ckpt, env, universal, cfg.model)
    skipped = state.step - restored.step
    restored.data = state.data  # skip every batch since the checkpoint
    restored.rollbacks = state.rollbacks + 1
    log.scalars(state.step, {"train/rollbacks": restored.rollbacks, "train/rollback_to_step": restored.step})
    log.info(f"step {state.step}: {what}; rolled back to {last_ckpt.name} and skipped the {skipped} batch(es) "
             f"since it (rollback {restored.rollbacks} of at most {t.max_rollbacks})")
    log.rewind(restored.step)
    guard.reset()
    return restored


RUN_TOKENIZER = OutputKind("the run's copy of its tokenizer", "openllm-ds train", lambda name: not name.startswith("."))

def prepare_output_dir(cfg: RunConfig, out: Path) -> None:
    """The manifest that marks a training run, the resolved config and a copy of the tokenizer, beside the
    checkpoints (rank 0)."""
    write_manifest(out, TRAINING_RUN, [e.name for e in out.iterdir() if TRAINING_RUN.ours(e.name)])
    cfg.save(out / "run_config.yaml")
    dst = out / "tokenizer"
    if not dst.is_dir():
        with atomic_dir(dst, RUN_TOKENIZER) as tmp:
            for f in Path(cfg.train.tokenizer_dir).iterdir():
                if f.is_file() and not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)


def build_engine(cfg: RunConfig, inputs: RunInputs, env: DistEnv):
    """The model wrapped by ``deepspeed.initialize`` with AdamW and the warmup-cosine schedule, and its number
    of parameters (counted before ZeRO-3 partitions them: a partitioned parameter's numel() is 0)."""
    deepspeed = import_deepspeed(env.device)
    t = cfg.train
    seed_everything(t.seed)  # identical initial weights on every rank
    model = Transformer(cfg.model)
    if t.init_from and inputs.resume_from is None:  # a warm start (shape and tokenizer checked by check_run_inputs)
        from openllm_ds.checkpoint import load_model

        model.load_state_dict(load_model(t.init_from).model.state_dict())
    num_params = model.num_params()
    if t.gradient_checkpointing:
        deepspeed.checkpointing.configure(None, deepspeed_config=inputs.ds_config)
        model.gradient_checkpointing = True
        model.checkpoint_fn = deepspeed.checkpointing.checkpoint
    scheduler = None
    if "scheduler" not in inputs.ds_config:  # a scheduler block in the base JSON takes precedence
        scheduler = build_lr_scheduler(t.warmup_steps, t.max_steps, t.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, t.weight_decay),
                                           lr_scheduler=scheduler, config=inputs.ds_config)
    if t.compile:
        engine.compile()  # the module, in place: state_dict names and checkpoints are unchanged
    seed_everything(t.seed + env.rank)  # dropout differs between ranks, reproducibly
    return engine, num_params


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_step(engine, micro_batches, env: DistEnv, stage: int, precision: str) -> tuple[float, float, int]:
    """One optimizer step over this rank's micro batches. Returns (mean loss over all ranks, grad norm,
    1 if the update was dropped for non-finite gradients else 0)."""
    engine.train()
    skipped_before = engine.skipped_steps
    losses, own_norm = [], None
    for x, y in micro_batches:
        loss = engine(x, y)
        engine.backward(loss)
        if stage == 0 and precision == "fp32" and engine.is_gradient_accumulation_boundary():
            own_norm = skip_nonfinite_update(engine)
        engine.step()
        losses.append(loss.detach().float())
    mean_loss = all_reduce_mean([torch.stack(losses).mean().item()], env)[0]
    if own_norm is not None:  # fp32 without ZeRO: plain torch optimizer, no overflow check of its own
        return mean_loss, own_norm, int(not math.isfinite(own_norm))
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else math.nan
    return mean_loss, norm, engine.skipped_steps - skipped_before


def skip_nonfinite_update(engine) -> float:
    """Global grad norm at the boundary (grads are already averaged over ranks). If it is not finite,
    the grads are zeroed and this step runs with lr 0, so every parameter stays as it was (AdamW's
    moments decay by one step); the scheduler sets the lr again for the next step."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    if not math.isfinite(norm):
        for g in grads:
            g.zero_()
        for group in engine.optimizer.param_groups:
            group["lr"] = 0.0
    return norm


@torch.no_grad()
def validate(engine, windows: EvalWindows, env: DistEnv) -> float:
    """Mean next-token loss over the fixed validation windows (all ranks), over the targets that count (a
    fine-tune's answer tokens; IGNORE_INDEX targets have no loss)."""
    engine.eval()
    total, count = 0.0, 0
    with torch.compiler.set_stance("force_eager"):  # a compiled model would compile its eval mode too
        for x, y in windows.batches():
            loss = engine(x, y)
            n = int((y != IGNORE_INDEX).sum())
            total += float(loss) * n
            count += n
    total, count = all_reduce_sum([total, count], env)
    engine.train()
    return total / count


def run_eval_tasks(engine, inputs: RunInputs, env: DistEnv, stage: int) -> list[dict]:
    """train.eval_tasks on the model being trained: rank 0 alone, or every rank under ZeRO-3 (whose
    forward passes gather partitioned weights collectively; greedy decoding keeps the ranks in step)."""
    from openllm_ds.evaluation.tasks import run_task_on_model

    if not (env.is_rank_zero or stage == 3):
        broadcast_object(None, env)  # wait for rank 0 on the object group, not in the next step's all-reduce
        return []
    with torch.compiler.set_stance("force_eager"):  # generation's shapes change every step
        results = [run_task_on_model(spec, engine.module, inputs.tokenizer, progress=False)
                   for spec in inputs.eval_tasks]
    engine.train()
    if stage != 3:
        broadcast_object(None, env)
    return results


def loss_scale(engine) -> float:
    scale = getattr(engine.optimizer, "loss_scale", None)
    return float(scale) if isinstance(scale, (int, float, torch.Tensor)) else 1.0
