"""Fine-tuning throughput vs pretraining throughput: the same DeepSpeed engine and step, one preset, one process.

    PYTHONPATH=. python benchmarks/bench_finetune.py [--preset tiny] [--steps 6] [--rounds 3] \
        [--tokenizer_dir data/tokenizer] [--data data/sft] [--squad_dir ../shared/data/squad]

Two engines of the preset's model (train.* settings, its ds_config) take turns step by step for ``--rounds`` x
``--steps`` steps: pretraining's step on windows of ``model.max_seq_len`` tokens (``train.micro_batch_size``
of them), and fine-tuning's on length-bucketed batches of SQuAD conversations (``finetune.batch_size``,
``finetune.max_seq_len``, ``finetune.truncate``; ``openllm_ds.finetune.data.SftBatches``). Tokens/s counts every
input token that is not padding (prompt and answer alike); the per-step time is the median. The padding share is
the whole epoch's. ``--data`` missing: prepare-sft writes it from ``--squad_dir`` into a temporary folder; the
tokenizer is ``--tokenizer_dir`` (an 8k BPE one is trained on the SQuAD passages when it is missing).

Target: fine-tuning tokens/s >= 90% of pretraining's on the same preset and machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openllm_ds.config import PrepareSftConfig, load_run_config  # noqa: E402
from openllm_ds.finetune.data import SftBatches, load_examples  # noqa: E402
from openllm_ds.finetune.prepare import prepare_sft  # noqa: E402
from openllm_ds.finetune.run import chat_template_of, sft_files  # noqa: E402
from openllm_ds.tokenizer import load_tokenizer  # noqa: E402
from openllm_ds.tokenizer.chat import SpecialTokens  # noqa: E402
from openllm_ds.train.data import DataPosition  # noqa: E402
from openllm_ds.train.distributed import init_distributed  # noqa: E402
from openllm_ds.train.ds_config import build_ds_config, zero_stage  # noqa: E402
from openllm_ds.train.loop import build_engine, train_step  # noqa: E402
from openllm_ds.train.preflight import RunInputs  # noqa: E402


def ensure_tokenizer(tokenizer_dir: Path, squad_dir: Path, tmp: Path) -> Path:
    if (tokenizer_dir / "tokenizer.model").is_file():
        return tokenizer_dir
    from openllm_ds.config import DataConfig, TokenizerConfig
    from openllm_ds.data import prepare
    from openllm_ds.tokenizer import train_tokenizer

    prepare(DataConfig(source="dir", squad_dir=str(squad_dir), output_dir=str(tmp / "clean"), num_workers=2))
    train_tokenizer(TokenizerConfig(input=str(tmp / "clean/training_data.txt"), output_dir=str(tmp / "tok"),
                                    vocab_size=8000))
    return tmp / "tok"


def engine_step(cfg, env):
    ds = build_ds_config(cfg, env.world_size, env.device)
    ds.pop("tensorboard", None)  # no DeepSpeed monitor while timing (the shipped JSONs have none)
    engine, _ = build_engine(cfg, RunInputs(None, ds, "fp32", None), env)
    stage = zero_stage(ds)
    return lambda mb: train_step(engine, mb, env, stage, "fp32")[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokenizer_dir", default="data/tokenizer")
    ap.add_argument("--data", default="data/sft")
    ap.add_argument("--squad_dir", default=str(ROOT.parent / "shared/data/squad"))
    args = ap.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    env = init_distributed()
    cfg = load_run_config(args.preset)
    ft = cfg.finetune
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_dir = ensure_tokenizer(Path(args.tokenizer_dir), Path(args.squad_dir), tmp)
        data = Path(args.data)
        if not (data / "train.jsonl").is_file() and not data.is_file():
            prepare_sft(PrepareSftConfig(squad_dir=args.squad_dir, output_dir=str(tmp / "sft")))
            data = tmp / "sft"
        tok = load_tokenizer(tok_dir)
        model = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size, dropout=0.0)
        seq = ft.max_seq_len or model.max_seq_len
        examples = load_examples(sft_files(str(data), None)[0], chat_template_of(tok_dir, tok), SpecialTokens(tok),
                                 seq + 1, ft.truncate)
        pre_cfg = dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, tokenizer_dir=str(tok_dir)))
        sft_cfg = dataclasses.replace(pre_cfg, model=dataclasses.replace(model, max_seq_len=seq),
                                      train=dataclasses.replace(pre_cfg.train, micro_batch_size=ft.batch_size,
                                                                learning_rate=ft.lr))
        t = pre_cfg.train
        batches = SftBatches(examples, ft.batch_size, t.gradient_accumulation_steps, env, t.seed,
                             tok.pad_id if tok.pad_id >= 0 else tok.eos_id)
        steps = {"pretrain": engine_step(pre_cfg, env), "finetune": engine_step(sft_cfg, env)}
        g = torch.Generator().manual_seed(0)
        T, B = model.max_seq_len, t.micro_batch_size
        times = {k: [] for k in steps}
        tokens = {k: [] for k in steps}
        pos = DataPosition.start(1)
        for _ in range(args.rounds * args.steps + 1):  # the first step of each: warm-up, not timed
            rows = [torch.randint(0, model.vocab_size, (B, T + 1), generator=g) for _ in range(t.gradient_accumulation_steps)]
            mb_pre = [(r[:, :-1], r[:, 1:]) for r in rows]
            mb_sft, pos, taken = batches.next_batch(pos)
            for name, mb, n in (("pretrain", mb_pre, B * T * len(rows)), ("finetune", mb_sft, batches.step_tokens(taken)[0])):
                t0 = time.perf_counter()
                steps[name](mb)
                times[name].append(time.perf_counter() - t0)
                tokens[name].append(n)
        result = {"preset": args.preset, "device": env.device, "steps_timed": args.rounds * args.steps,
                  "pretrain_context": T, "finetune_context": seq, "conversations": len(examples.ids),
                  "truncated": examples.truncated, "padding_share": round(batches.padding_share(), 4)}
        for name in steps:
            per_tok = statistics.median(s / n for s, n in zip(times[name][1:], tokens[name][1:]))
            result[f"{name}_tokens_per_s"] = round(1 / per_tok, 1)
            result[f"{name}_step_s"] = round(statistics.median(times[name][1:]), 4)
        result["finetune_vs_pretrain"] = round(result["finetune_tokens_per_s"] / result["pretrain_tokens_per_s"], 3)
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
