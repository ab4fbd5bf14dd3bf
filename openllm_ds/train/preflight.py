"""Checks that run before any compute: each failure is one line naming the key or file and the fix."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from openllm_ds.checkpoint import read_train_state
from openllm_ds.config import RunConfig, validation_source
from openllm_ds.errors import ConfigError, DataError, UserError
from openllm_ds.output_lock import OutputLock
from openllm_ds.paths import check_path, missing_reason, same_path
from openllm_ds.train.checkpointing import TRAINING_RUN, check_fresh_output_dir, find_resume_checkpoint
from openllm_ds.train.elastic import UNIVERSAL, ZERO0, needs_universal, saved_layout
from openllm_ds.train.data import num_windows, windows_needed
from openllm_ds.train.distributed import DistEnv, broadcast_object
from openllm_ds.train.ds_config import build_ds_config, resolve_precision, zero_stage
from openllm_ds.train.validation import check_validation_apart
from openllm_ds.utils import claim_output_dir, ensure_writable_dir, read_yaml


@dataclass(frozen=True)
class RunInputs:
    tokenizer: object  # openllm_ds.tokenizer.Tokenizer
    ds_config: dict
    precision: str  # fp32 | fp16 | bf16, resolved for the device
    resume_from: Path | None
    eval_tasks: tuple = ()  # openllm_ds.evaluation.tasks.TaskSpec, run at each evaluation
    resume_step: int | None = None  # the step of resume_from
    max_steps: int = 0
    universal: bool = False  # resume_from is loaded through its universal conversion (another layout)
    resume_note: str | None = None  # what a resume in another layout changes, said once

    @property
    def complete(self) -> bool:
        """The checkpoint resumed from is already at train.max_steps: nothing is trained or rewritten."""
        return self.resume_step is not None and self.resume_step >= self.max_steps


def dry_run(cfg: RunConfig) -> dict:
    """``train --dry_run``: the checks a run makes before it tokenizes or trains (the launcher's, the output dir's
    lock, ``check_run_inputs``), creating and writing nothing; what the run would do. Not checked: whether each
    source has tokens enough for a step (``check_lengths``), which needs the token shards the run builds first."""
    from openllm_ds.output_lock import in_use, output_in_use
    from openllm_ds.settings import env_int
    from openllm_ds.train.launch import check_launcher
    from openllm_ds.utils import select_device

    check_launcher(cfg)
    holder = output_in_use(cfg.output_dir)
    if holder:
        raise ConfigError(in_use(cfg.output_dir, holder, "--output_dir (train.output_dir)"))
    world = cfg.train.num_workers or env_int("WORLD_SIZE", 1)
    checked, inputs = check_run_inputs(cfg, DistEnv(rank=0, local_rank=0, world_size=world, device=select_device()),
                                       dry_run=True)
    t = checked.train
    return {"dry_run": "every check a run makes before its work passed; nothing was written",
            "output_dir": cfg.output_dir, "world_size": world, "precision": inputs.precision,
            "zero_stage": zero_stage(inputs.ds_config),
            "global_batch": t.micro_batch_size * t.gradient_accumulation_steps * world,
            "resume_from": str(inputs.resume_from) if inputs.resume_from else None, "resume_step": inputs.resume_step,
            "resume_note": inputs.resume_note, "complete": inputs.complete,
            "not_checked": "whether each source holds tokens enough for a step: the run checks it once it has "
                           "tokenized the sources"}


def check_run_inputs(cfg: RunConfig, env: DistEnv, dry_run: bool = False) -> tuple[RunConfig, RunInputs]:
    """The run config to train with (a resume on another number of ranks may change its gradient accumulation) and
    the checked inputs. ``dry_run``: create nothing (the output dir is only checked to be creatable)."""
    from openllm_ds.tokenizer import load_tokenizer

    t = cfg.train
    ds_config = build_ds_config(cfg, env.world_size, env.device)
    if t.eval_batches < 1:
        raise ConfigError(f"train.eval_batches must be >= 1, got {t.eval_batches}")
    try:
        tokenizer = load_tokenizer(t.tokenizer_dir)
    except UserError as e:
        raise ConfigError(f"train.tokenizer_dir (--tokenizer_dir): {e}") from None
    if cfg.model.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer in {t.tokenizer_dir} has "
                          f"{tokenizer.vocab_size} tokens; set model.vocab_size={tokenizer.vocab_size} "
                          "(or train the tokenizer with that --vocab_size)")
    for key, spec in data_keys(cfg):
        check_source_exists(key, spec)
    check_validation_apart(cfg)
    eval_tasks = load_eval_tasks(t.eval_tasks)
    resume_from = find_resume_checkpoint(cfg)
    if resume_from is None and t.init_from:  # a resumed run goes on from its own checkpoint instead
        check_init_from(cfg, tokenizer)
    check_output_dir(cfg, tokenizer, create=not dry_run)
    resume_step, universal, note = None, False, None
    if resume_from is None:
        check_fresh_output_dir(cfg)
    else:
        saved = read_train_state(resume_from)
        resume_step = saved["step"]
        if resume_step > t.max_steps:
            raise ConfigError(f"train.max_steps (--max_steps) is {t.max_steps}, below step {resume_step} of the "
                              f"checkpoint it resumes ({resume_from}); pass --max_steps above {resume_step} to train "
                              "on, or --resume none with a new --output_dir to start over")
        check_resumed_tokenizer(resume_from, saved.get("tokenizer_sha256"), tokenizer, t.tokenizer_dir)
        check_resumed_base(resume_from, t.init_from)
        new_cfg, universal, note = plan_layout_change(cfg, resume_from, saved, env.world_size, zero_stage(ds_config),
                                                      resolve_precision(t.precision, env.device))
        if new_cfg is not cfg:
            cfg = new_cfg
            ds_config = build_ds_config(cfg, env.world_size, env.device)
    return cfg, RunInputs(tokenizer, ds_config, resolve_precision(t.precision, env.device), resume_from, eval_tasks,
                          resume_step, t.max_steps, universal, note)


def plan_layout_change(cfg: RunConfig, tag_dir: Path, saved: dict, world_size: int, stage: int, precision: str
                       ) -> tuple[RunConfig, bool, str | None]:
    """A checkpoint written on another number of ranks or under another ZeRO stage: (the run config with the
    gradient accumulation that keeps the checkpoint's global batch, whether the step must be loaded through
    DeepSpeed's universal checkpoint, the line that says so). The data order depends on the global batch only."""
    layout = saved_layout(tag_dir, saved)
    here = f"ZeRO-{stage} on {world_size} rank(s)"
    if stage == 0 and layout.zero_stage != 0 and precision != "fp32":
        raise ConfigError(f"checkpoint {tag_dir} was written with {layout.describe()}; a run without ZeRO in "
                          f"{precision} keeps DeepSpeed's own optimizer state, which a ZeRO state cannot become: "
                          f"resume it under ZeRO (--ds_config ds_configs/zero{layout.zero_stage}.json, any number of "
                          f"ranks), or start a new run from its weights with --resume none --init_from {tag_dir}")
    t = cfg.train
    notes = []
    global_batch = saved.get("global_batch") or (layout.world_size and saved_global_batch(tag_dir, layout.world_size))
    if global_batch and t.micro_batch_size * t.gradient_accumulation_steps * world_size != global_batch:
        if global_batch % (t.micro_batch_size * world_size):
            options = [b for b in range(1, global_batch // world_size + 1) if global_batch % (b * world_size) == 0]
            fix = (f"pass a --batch_size that makes it a whole number of micro batches ({', '.join(map(str, options[-4:]))}"
                   " work)" if options else f"resume on a number of ranks that divides {global_batch}")
            raise ConfigError(
                f"checkpoint {tag_dir} was trained with a global batch of {global_batch} windows "
                f"({layout.describe()}); on {world_size} rank(s) no gradient accumulation with train."
                f"micro_batch_size (--batch_size) {t.micro_batch_size} gives it: {fix}, or start a new run from "
                f"its weights with --resume none --init_from {tag_dir}")
        accum = global_batch // (t.micro_batch_size * world_size)  # one step: one global batch of the data order
        notes.append(f"train.gradient_accumulation_steps {t.gradient_accumulation_steps} -> {accum} keeps its "
                     f"global batch of {global_batch} windows")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, gradient_accumulation_steps=accum))
    universal = needs_universal(layout, world_size, stage)
    if universal:
        via = (f"a stage-0 checkpoint made from DeepSpeed's universal checkpoint ({tag_dir / ZERO0}, converted once)"
               if stage == 0 else f"DeepSpeed's universal checkpoint ({tag_dir / UNIVERSAL}, converted once)")
        notes.insert(0, f"{tag_dir.name} was written with {layout.describe()} and resumes with {here} through {via}")
    elif notes:
        notes.insert(0, f"{tag_dir.name} was written on {layout.world_size} rank(s) and resumes on {world_size}"
                     if layout.world_size not in (None, world_size) else f"resuming {tag_dir.name}")
    return cfg, universal, "; ".join(notes) or None


SHAPE = ("vocab_size", "d_model", "n_layers", "n_heads", "num_kv_heads", "d_ff", "tie_embeddings")


def check_init_from(cfg: RunConfig, tokenizer) -> None:
    """train.init_from names weights of this run's model shape, trained with this run's tokenizer."""
    from openllm_ds.checkpoint import weights_source

    path = cfg.train.init_from
    check_path(path, "train.init_from (--init_from)", "dir", "pass a training output, one of its checkpoints/step_* "
               "dirs or a Hugging Face Llama dir", ConfigError)
    try:
        src = weights_source(path)
    except UserError as e:
        raise ConfigError(f"train.init_from (--init_from): {e}") from None
    diff = [f"model.{k}: {getattr(src.model_config, k)} there, {getattr(cfg.model, k)} here" for k in SHAPE
            if getattr(src.model_config, k) != getattr(cfg.model, k)]
    if diff:
        raise ConfigError(f"train.init_from {path} holds a model of another shape ({'; '.join(diff)}); give this run "
                          "that model's config (--config or model.KEY=VALUE), or start from weights of this shape")
    if holds_other_tokenizer(src.tokenizer_dir, tokenizer):
        raise ConfigError(f"train.init_from {path} was trained with another tokenizer ({src.tokenizer_dir}) than "
                          f"train.tokenizer_dir {cfg.train.tokenizer_dir}: its token ids mean other text; train with "
                          f"--tokenizer_dir {src.tokenizer_dir}")


def saved_global_batch(tag_dir: Path, world_size: int) -> int | None:
    """micro x accumulation (the step's run_config.yaml) x world size, for checkpoints that did not record it."""
    saved = read_yaml(tag_dir / "run_config.yaml", "pass another checkpoint with --resume PATH", expect=dict) \
        if (tag_dir / "run_config.yaml").is_file() else None
    train = saved.get("train") if isinstance(saved, dict) else None
    if not isinstance(train, dict):
        return None
    micro, accum = train.get("micro_batch_size"), train.get("gradient_accumulation_steps", 1)
    return micro * accum * world_size if isinstance(micro, int) and isinstance(accum, int) else None


def check_resumed_tokenizer(tag_dir: Path, recorded: str | None, tokenizer, tokenizer_dir: str) -> None:
    """A checkpoint goes on only with the tokenizer it was trained with (the copy in its run dir, and the
    sha256 its train state records)."""
    run_dir = tag_dir.parent.parent
    if holds_other_tokenizer(run_dir / "tokenizer", tokenizer) or recorded not in (None, tokenizer.sha256):
        raise ConfigError(f"checkpoint {tag_dir} was trained with another tokenizer ({run_dir / 'tokenizer'}) than "
                          f"train.tokenizer_dir {tokenizer_dir}; resume with --tokenizer_dir {run_dir / 'tokenizer'}, "
                          "or start a new run (--resume none, a new --output_dir)")


def check_resumed_base(tag_dir: Path, init_from: str | None) -> None:
    """A checkpoint goes on only as the run it belongs to: a run that names starting weights (train.init_from, a
    fine-tune's --model_dir) resumes a checkpoint only if that run started from the same weights. Two fine-tunes of
    different bases given one output dir (the default models/NAME-sft) are two runs, never one."""
    saved = tag_dir / "run_config.yaml"
    if not init_from or not saved.is_file():
        return
    train = read_yaml(saved, "pass another checkpoint with --resume PATH", expect=dict).get("train")
    started = train.get("init_from") if isinstance(train, dict) else None
    if started and same_path(started, init_from):
        return
    own = f"--init_from/--model_dir {started}" if started else "config (no --init_from)"
    raise ConfigError(f"checkpoint {tag_dir} belongs to a run started from {started or 'scratch (no init_from)'}, not "
                      f"from {init_from} (train.init_from, a fine-tune's --model_dir); pass a new --output_dir for a "
                      f"run from these weights, or resume that run with its own {own}")


class RunLock:
    """The output lock of a training run (``output_lock.OutputLock``), taken once per run: by rank 0 of a
    torch.distributed job (the deepspeed launcher's), whose error every rank raises alike; not at all by
    ``holder=False`` processes (Ray Train's workers: their driver holds it for the whole job)."""

    def __init__(self, out: Path, env: DistEnv, command: str = "train", holder: bool = True):
        self.lock, error = None, None
        if holder and env.is_rank_zero:
            try:
                self.lock = OutputLock(out, command, "--output_dir (train.output_dir)")
            except UserError as e:
                error = str(e)
        error = broadcast_object(error, env) if holder else None
        if error:
            raise ConfigError(error)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def load_eval_tasks(names) -> tuple:
    """train.eval_tasks: harness task YAMLs or names (eval/*.yaml), parsed and their data checked now."""
    if not names:
        return ()
    from openllm_ds.evaluation.tasks import load_task

    try:
        return tuple(load_task(n) for n in names)
    except UserError as e:
        raise ConfigError(f"train.eval_tasks: {e}") from None


def check_output_dir(cfg: RunConfig, tokenizer, create: bool = True) -> None:
    """Writable (created unless ``create`` is false), not another stage's output (an export, a tokenizer, token shards,
    prepared data: ``utils.claim_output_dir``), and not a run trained with another tokenizer."""
    what = "train.output_dir (--output_dir)"
    claim_output_dir(cfg.output_dir, TRAINING_RUN, what)
    out = ensure_writable_dir(cfg.output_dir, what) if create else check_creatable_dir(cfg.output_dir, what)
    if holds_other_tokenizer(out / "tokenizer", tokenizer):
        raise ConfigError(f"output dir {out} holds a run trained with another tokenizer ({out / 'tokenizer'}) than "
                          f"train.tokenizer_dir {cfg.train.tokenizer_dir}; choose another --output_dir")


def check_creatable_dir(path: str | Path, what: str) -> Path:
    """``ensure_writable_dir``'s checks, creating nothing: a writable directory, or one that could be created."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{what} {p} is a file, not a directory; pass a directory (or move the file away)")
    existing = p if p.is_dir() else next((a for a in p.parents if a.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"{what} {p} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {p} is not writable ({existing}: permission denied); choose another directory or "
                        "fix its permissions")
    return p


def holds_other_tokenizer(directory: Path, tokenizer) -> bool:
    """``directory`` holds a tokenizer.model other than ``tokenizer``'s (a run dir's copy, an export's)."""
    theirs = Path(directory) / tokenizer.model_file.name
    return theirs.is_file() and theirs.read_bytes() != tokenizer.model_file.read_bytes()


def data_keys(cfg: RunConfig) -> list[tuple[str, str]]:
    """(config key, source) of every training and validation source the user named."""
    t = cfg.train
    key = "train.data_files (--data_files)" if t.data_files else "train.data_file (--data_file)"
    keys = [(key, spec) for spec, _ in t.sources]
    if cfg.eval_data:
        keys.append(("train.eval_data (--eval_data)", cfg.eval_data))
    elif t.data_files:
        keys += [("train.data_files: its validation", v) for spec, _ in t.sources if (v := validation_source(spec))]
    return keys


def check_source_exists(key: str, spec: str, fix: str = "run `openllm-ds prepare` first or pass an existing file, "
                        "folder, glob pattern or hf:NAME") -> None:
    """Something is at the source ``spec`` (a path, a glob that matches, an hf: dataset): else a DataError naming
    ``key`` and why (missing, under a file, a broken link), before anything else is said about it."""
    import glob

    from openllm_ds.data.units import is_glob, is_hub_source

    if is_hub_source(spec) or Path(spec).exists() or is_glob(spec) and glob.glob(spec, recursive=True):
        return
    raise DataError(f"{key} {spec} {missing_reason(spec)}; {fix}")


def check_lengths(cfg: RunConfig, sources: list, world_size: int) -> None:
    """Every source has enough tokens for one global batch of training windows and one validation window per rank."""
    T = cfg.model.max_seq_len
    batch = cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size
    key = "train.data_files" if cfg.train.data_files else "train.data_file"
    for s, need in zip(sources, windows_needed([s.weight for s in sources], batch)):
        tokens = len(s.train)
        have = num_windows(tokens, T)
        if have < need:
            what = (f"one global batch of {need} windows" if need == batch else
                    f"the {need} windows a step takes from it (weight {s.weight:.3g} of a global batch of {batch})")
            raise DataError(
                f"{key} {s.source} has {tokens:,} tokens = {have} windows of model.max_seq_len+1 = {T + 1} tokens, "
                f"fewer than {what} (micro {cfg.train.micro_batch_size} x grad_accum "
                f"{cfg.train.gradient_accumulation_steps} x {world_size} rank(s)); lower --batch_size or "
                "model.max_seq_len, or train on more text")
        tokens = len(s.val)
        have = num_windows(tokens, T)
        if have < world_size:
            fix = ("raise train.holdout_fraction or pass --eval_data" if s.val.split == "heldout"
                   else "use a longer file or a smaller model.max_seq_len")
            raise DataError(
                f"validation data ({s.val_name}) has {tokens:,} tokens = {have} windows of model.max_seq_len+1 = "
                f"{T + 1} tokens; validation needs at least {world_size}; {fix}")
