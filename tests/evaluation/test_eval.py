"""Evaluation: sliding-window perplexity, bits per byte, generation, and bad input.

Models are tiny random Transformers saved in the training output layout (see make_fake_run), with
the 8k tokenizer of the session fixtures.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


from openllm_ds.errors import UserError
from openllm_ds.evaluation import evaluate, generate_text, perplexity
from openllm_ds.evaluation.sliding_window import sliding_windows
from openllm_ds.model import Transformer, generate

from helpers import biased, eval_run, tiny_config


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory, prepared_data) -> Path:
    """40 real validation passages, a blank line, and a line of non-ASCII text."""
    lines = (prepared_data / "validation_data.txt").read_text(encoding="utf-8").split("\n")[:40]
    p = tmp_path_factory.mktemp("evaltext") / "val.txt"
    p.write_text("\n".join(lines[:20] + ["   ", "Zürich – 東京 naïve café"] + lines[20:]) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def uniform_run(tmp_path_factory, tokenizer_dir) -> Path:
    return eval_run(tmp_path_factory.mktemp("uniform"), tokenizer_dir, zero_final_norm=True)


@pytest.fixture(scope="module")
def random_run(tmp_path_factory, tokenizer_dir) -> Path:
    return eval_run(tmp_path_factory.mktemp("random"), tokenizer_dir, steps=(10, 20))


# ---- perplexity ---------------------------------------------------------------------------------

def test_uniform_model_perplexity_is_vocab_size_and_counts_are_exact(uniform_run, eval_text, tok, tmp_path):
    out = tmp_path / "report.json"
    r = evaluate(str(uniform_run), eval_data=str(eval_text), metrics=("perplexity", "loss", "word_perplexity", "bits_per_byte"),
                 stride=16, batch_size=4, output=str(out))
    docs = [d for d in eval_text.read_text(encoding="utf-8").split("\n") if d.strip()]
    assert len(docs) == 41
    V = tok.vocab_size
    # every document token and every closing EOS is scored once
    num_tokens = sum(len(tok.encode(d)) + 1 for d in docs)
    num_words = sum(len(d.split()) for d in docs)
    num_bytes = sum(len(d.encode("utf-8")) + 1 for d in docs)
    assert (r["num_tokens"], r["num_words"], r["num_bytes"], r["num_documents"]) == (num_tokens, num_words, num_bytes, 41)
    assert r["perplexity"] == pytest.approx(V, rel=1e-4)
    assert r["loss"] == pytest.approx(math.log(V), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(num_tokens * math.log2(V) / num_bytes, rel=1e-5)
    assert r["word_perplexity"] == pytest.approx(math.exp(num_tokens * math.log(V) / num_words), rel=1e-4)
    assert r["step"] == 10 and r["stride"] == 16
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))


def test_metrics_select_the_reported_keys(uniform_run, eval_text):
    r = evaluate(str(uniform_run), eval_data=str(eval_text), metrics=("bits_per_byte",), stride=32)
    assert "bits_per_byte" in r and "perplexity" not in r and "loss" not in r


def test_sliding_window_equals_brute_force_per_token():
    torch.manual_seed(0)
    L = 16
    model = Transformer(tiny_config(97, max_seq_len=L, init_std=0.3)).eval()  # large weights: context matters
    ids = torch.randint(0, 97, (53,))
    results = {}
    for stride in (1, 5, 16):
        total, n = perplexity(model, ids, max_seq_len=L, stride=stride, batch_size=3, progress=False)
        # target p is scored by the first window reaching it: window k starts at k*stride
        brute = 0.0
        for p in range(1, len(ids)):
            k = max(0, math.ceil((p - L) / stride))
            ctx = ids[k * stride : p]
            assert 1 <= len(ctx) <= L
            with torch.no_grad():
                logits = model(ctx[None])[0, -1]
            brute -= F.log_softmax(logits.double(), -1)[ids[p]].item()
        assert n == len(ids) - 1
        assert total == pytest.approx(brute, rel=1e-5)
        results[stride] = total
    assert results[1] != pytest.approx(results[16], rel=1e-3)  # more context, other losses


def test_non_overlapping_windows_equal_the_models_own_loss():
    torch.manual_seed(1)
    model = Transformer(tiny_config(97, max_seq_len=16)).eval()
    ids = torch.randint(0, 97, (1 + 3 * 16,))
    total, n = perplexity(model, ids, max_seq_len=16, stride=16, batch_size=8, progress=False)
    x = ids[:-1].view(3, 16)
    y = ids[1:].view(3, 16)
    with torch.no_grad():
        loss = model(x, y)
    assert n == 48
    assert total / n == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("n,L,s", [(2, 8, 4), (10, 8, 3), (100, 16, 16), (101, 16, 1), (57, 8, 7)])
def test_sliding_windows_score_each_target_once(n, L, s):
    scored = []
    for begin, end, num in sliding_windows(n, L, s):
        assert 0 < end - begin <= L and 0 < num <= end - begin
        scored += list(range(end - num + 1, end + 1))
    assert scored == list(range(1, n))


# ---- generation ---------------------------------------------------------------------------------

def test_generate_is_reproducible_with_a_seed_and_returns_num_samples(random_run):
    kw = dict(max_new_tokens=12, temperature=1.0, stream=False)
    a = generate_text(str(random_run), "The city of", seed=7, num_samples=3, **kw)
    b = generate_text(str(random_run), "The city of", seed=7, num_samples=3, **kw)
    c = generate_text(str(random_run), "The city of", seed=8, num_samples=3, **kw)
    assert len(a) == 3 and a == b and a != c
    assert len(set(a)) == 3  # one generator drives the samples one after another
    greedy = generate_text(str(random_run), "The city of", max_new_tokens=5, temperature=0, stream=False, checkpoint=10)
    assert greedy == generate_text(str(random_run), "The city of", max_new_tokens=5, temperature=0, stream=False, checkpoint=10)


def test_generate_stops_at_eos_and_streams(random_run, tok, monkeypatch, capsys):
    import openllm_ds.checkpoint as checkpoint  # what the generation path loads through

    city = tok.encode("city")[0]
    real_load = checkpoint.load_model

    def load_biased(*a, **kw):
        loaded = real_load(*a, **kw)
        biased(loaded.model, {city: 0.0, tok.eos_id: 0.0})  # half "city", half EOS
        return loaded

    monkeypatch.setattr(checkpoint, "load_model", load_biased)
    lengths = []
    for seed in range(8):
        text = generate_text(str(random_run), "Paris is a", max_new_tokens=20, temperature=1.0, seed=seed, stream=True)[0]
        # the same draws straight from the model: the text ends where the first EOS is drawn
        loaded = load_biased(str(random_run))
        g = torch.Generator().manual_seed(seed)
        prompt = torch.tensor([[tok.eos_id] + tok.encode("Paris is a")])
        drawn = [int(t[0]) for t in generate(loaded.model, prompt, 20, temperature=1.0, eos_id=tok.eos_id, generator=g)]
        k = drawn.index(tok.eos_id) if tok.eos_id in drawn else len(drawn)
        assert text == " city" * k
        lengths.append(k)
        assert capsys.readouterr().out == "Paris is a" + " city" * k + "\n"
    assert min(lengths) < max(lengths) < 20  # stopped at different points, before max_length


def test_generate_bad_input(random_run):
    with pytest.raises(UserError, match="shorten the prompt"):
        generate_text(str(random_run), "word " * 200, stream=False)
    with pytest.raises(UserError, match="--num_samples"):
        generate_text(str(random_run), "x", num_samples=0, stream=False)
    with pytest.raises(UserError, match="no complete checkpoint for step 15"):
        generate_text(str(random_run), "x", checkpoint=15, stream=False)


# ---- evaluate: defaults and bad input -----------------------------------------------------------

def test_evaluate_defaults_to_the_runs_validation_file(tmp_path, tokenizer_dir, eval_text):
    data = tmp_path / "clean"
    data.mkdir()
    shutil.copy(eval_text, data / "validation_data.txt")
    run = eval_run(tmp_path / "run", tokenizer_dir, data_file=str(data / "training_data.txt"))
    r = evaluate(str(run), stride=32)
    assert r["eval_data"] == str(data / "validation_data.txt") and r["num_documents"] == 41


def test_evaluate_bad_input_is_one_clear_user_error(random_run, tmp_path):
    with pytest.raises(UserError, match=r"eval file .*missing\.txt does not exist"):
        evaluate(str(random_run), eval_data=str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(UserError, match=r"empty\.txt is empty"):
        evaluate(str(random_run), eval_data=str(empty))
    with pytest.raises(UserError, match=r"unknown metric 'accuracy'.*valid: perplexity, loss, word_perplexity, bits_per_byte"):
        evaluate(str(random_run), eval_data=str(empty), metrics=("perplexity", "accuracy"))
    (tmp_path / "no_ckpt").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        evaluate(str(tmp_path / "no_ckpt"), eval_data=__file__)
    with pytest.raises(UserError, match=r"unknown task 'nope'; available tasks: .*squad_v1_qa"):
        evaluate(str(random_run), tasks=("nope",))
    with pytest.raises(UserError, match="--checkpoints selects checkpoints for --tasks"):
        evaluate(str(random_run), eval_data=__file__, checkpoints="all")
    with pytest.raises(UserError, match="--stride"):
        evaluate(str(random_run), eval_data=__file__, stride=0)


def test_checkpoint_perplexity_equals_its_hugging_face_export(random_run, eval_text, tmp_path):
    export_mod = pytest.importorskip("openllm_ds.export")
    if not hasattr(export_mod, "export"):
        pytest.skip("openllm_ds.export.export is not written yet")
    from openllm_ds.config import ExportConfig

    out = tmp_path / "hf"
    export_mod.export(ExportConfig(model_dir=str(random_run), format="huggingface", output_dir=str(out)))
    text = tmp_path / "short.txt"
    text.write_text("\n".join(eval_text.read_text(encoding="utf-8").split("\n")[:8]), encoding="utf-8")
    a = evaluate(str(random_run), eval_data=str(text), stride=16)
    b = evaluate(str(out), eval_data=str(text), stride=16)
    assert a["num_tokens"] == b["num_tokens"]
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-5)
