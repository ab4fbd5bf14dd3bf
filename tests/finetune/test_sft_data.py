"""Fine-tuning data: a conversation's ids are the rendered text's ids, its labels keep the answers only; SQuAD as
conversations (prepare-sft); bad records are one error naming file and line; length-bucketed batches; the copy drill."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openllm_ds.config import PrepareSftConfig
from openllm_ds.errors import DataError
from openllm_ds.finetune.data import (SftBatches, SftExamples, collate, conversation_of, copy_drill,
                                      load_examples)
from openllm_ds.finetune.prepare import NO_ANSWER, prepare_sft
from openllm_ds.model import Transformer
from openllm_ds.tokenizer import load_tokenizer
from openllm_ds.tokenizer.chat import (IGNORE_INDEX, SpecialTokens, encode_conversation, load_chat_template)
from openllm_ds.train.data import DataPosition
from openllm_ds.train.distributed import DistEnv

CONVERSATIONS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who were the Normans?"},
     {"role": "assistant", "content": "A people of Normandy."}, {"role": "user", "content": "When?"},
     {"role": "assistant", "content": "In the 10th century."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Où est Köln? 東京は?"},
     {"role": "assistant", "content": "Am Rhein, ça va."}],
]


@pytest.fixture(scope="module")
def chat(small_run):
    tok = load_tokenizer(small_run / "tokenizer")
    return tok, load_chat_template(small_run / "tokenizer", tok), SpecialTokens(tok)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_ids_are_the_rendered_texts_and_only_answers_have_labels(chat, messages):
    tok, template, special = chat
    ids, labels = encode_conversation(messages, template, special)
    assert ids == special.encode(template.render(messages, add_generation_prompt=False))
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    kept = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert [label for label in labels if label != IGNORE_INDEX] == kept
    assert kept.count(tok.eos_id) == len(answers)  # every answer's closing EOS has loss ...
    assert ids[0] == tok.eos_id and labels[0] == IGNORE_INDEX  # ... the conversation's opening one none
    assert tok.decode(kept).split() == " ".join(answers).split()
    # the boundary at "Assistant:" + " answer": the prompt up to each answer tokenises as the head of the whole
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = special.encode(template.render(messages[:i], add_generation_prompt=True))
            assert ids[:len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE_INDEX
            assert labels[len(prompt)] == ids[len(prompt)]  # the answer's first token is the first with loss


def test_answer_labels_alone_move_the_loss_and_gradients(chat):
    """Changing a prompt position's target leaves the loss and every gradient as they were; changing an answer
    token's target changes both."""
    tok, template, special = chat
    ids, labels = encode_conversation(CONVERSATIONS[0], template, special)
    from openllm_ds.config import ModelConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                                    max_seq_len=128, dropout=0.0))
    full = np.asarray(ids)  # every position's true next token, before the answer mask is applied

    def loss_and_grads(targets_of: np.ndarray):
        masked = np.where(np.asarray(labels) != IGNORE_INDEX, targets_of, IGNORE_INDEX)
        x, y = collate([np.asarray(ids)], [masked], 0, "cpu")
        model.zero_grad()
        loss = model(x, y)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    base_loss, base_grads = loss_and_grads(full)
    prompt_pos = next(i for i in range(1, len(ids)) if labels[i] == IGNORE_INDEX and i > 3)
    answer_pos = next(i for i in range(1, len(ids)) if labels[i] != IGNORE_INDEX)
    other = full.copy()
    other[prompt_pos] = (other[prompt_pos] + 1) % tok.vocab_size
    loss, grads = loss_and_grads(other)
    assert loss == base_loss and all(torch.equal(a, b) for a, b in zip(grads, base_grads))
    other = full.copy()
    other[answer_pos] = (other[answer_pos] + 1) % tok.vocab_size
    loss, grads = loss_and_grads(other)
    assert loss != base_loss and not all(torch.equal(a, b) for a, b in zip(grads, base_grads))


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


GOOD = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}


@pytest.mark.parametrize("record,error", [
    ({"messages": [{"content": "Q?"}, {"role": "assistant", "content": "A."}]}, r"line 2: messages\[0\] has no role"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": " "}]},
     r"line 2: messages\[1\] is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": ["Q?"]}, {"role": "assistant", "content": "A."}]},
     r"line 2: messages\[0\]\.content is list, not a string"),
    ({"messages": [{"role": "user", "content": "Q?"}]}, r"line 2: the conversation has no assistant turn"),
    ({"prompt": "Q?", "completion": 3}, r"line 2: 'completion' must be a string"),
    ({"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "A."}]},
     r"line 2: the conversation is \d+ tokens, longer than the context .*--truncate"),
    ("{not json", r"line 2 is not valid JSON"),
])
def test_a_bad_record_is_one_error_naming_file_and_line(chat, tmp_path, record, error):
    _, template, special = chat
    f = write_jsonl(tmp_path / "bad.jsonl", [GOOD, record])
    with pytest.raises(DataError, match=rf"bad\.jsonl {error}" if error.startswith("line 2 is") else
                       rf"bad\.jsonl {error}"):
        load_examples(str(f), template, special, 64, truncate=False)


def test_both_shapes_gz_and_truncation(chat, tmp_path):
    import gzip

    _, template, special = chat
    long = {"prompt": "word " * 200, "completion": "A."}  # its answer lies past the head: left out, counted
    long_answer = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "word " * 200}]}
    (tmp_path / "d").mkdir()
    with gzip.open(tmp_path / "d" / "a.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in [GOOD, {"prompt": "Q?", "completion": "A."}, long, long_answer]))
    ex = load_examples(str(tmp_path / "d"), template, special, 64, truncate=True)
    assert len(ex.ids) == 3 and ex.truncated == 2 and ex.dropped == 1
    assert ex.ids[0].tolist() == ex.ids[1].tolist() and ex.labels[0].tolist() == ex.labels[1].tolist()
    assert len(ex.ids[2]) == 64 and (ex.labels[2] != IGNORE_INDEX).any()


def test_copy_drill_repeats_a_run_of_a_conversation_and_labels_only_the_second_copy(chat):
    tok = chat[0]
    texts = [np.arange(100, 100 + k, dtype=np.int32) for k in (30, 80)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids, labels = copy_drill(rng, texts, tok.prompt_prefix_id)
        n = (len(ids) - 1) // 2
        run = ids[1:1 + n]
        assert 20 <= n <= 60 and ids[0] == tok.prompt_prefix_id and run.tolist() == ids[1 + n:].tolist()
        # a run of one conversation, past its opening token
        assert any(run.tolist() == t[s:s + n].tolist() for t in texts for s in range(1, len(t) - n + 1))
        assert (labels[:1 + n] == IGNORE_INDEX).all() and labels[1 + n:].tolist() == run.tolist()
    with pytest.raises(DataError, match="none is longer than 21 tokens; pass --copy_drill 0"):
        SftBatches(SftExamples([np.arange(5)] * 8, [np.arange(5)] * 8, "short.jsonl", "", 0, 0), 2, 1,
                   DistEnv(0, 0, 1, "cpu"), seed=0, pad_id=0, drill_share=0.5)


def test_length_buckets_pad_little_and_resume_at_their_position(chat, tmp_path):
    _, template, special = chat
    rng = np.random.default_rng(0)
    records = [{"prompt": " ".join(["word"] * int(rng.integers(1, 40))), "completion": "A."} for _ in range(300)]
    ex = load_examples(str(write_jsonl(tmp_path / "t.jsonl", records)), template, special, 256, truncate=False)
    env = DistEnv(0, 0, 1, "cpu")
    b = SftBatches(ex, 4, 2, env, seed=1, pad_id=0, drill_share=0.1, prefix_id=2)
    assert b.num_drill == 30 and b.steps_per_epoch == 330 // 8
    assert b.padding_share() < 0.05
    pos, seen = DataPosition.start(1), []
    for _ in range(b.steps_per_epoch + 2):  # into the second epoch
        mbs, pos, tokens = b.next_batch(pos)
        seen.append([x.tolist() for x, _ in mbs])
    assert pos.sources == [[1, 2, b.steps_per_epoch + 2]]
    again = SftBatches(ex, 4, 2, env, seed=1, pad_id=0, drill_share=0.1, prefix_id=2)
    mbs, _, _ = again.next_batch(DataPosition([[0, 5, 5]]))
    assert [x.tolist() for x, _ in mbs] == seen[5]


def test_prepare_sft_splits_by_passage_and_answers_no_answer_questions(tmp_path):
    def squad(paragraphs):
        return {"version": "2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}

    paragraphs = [{"context": f"Passage {i} about the river.", "qas": [
        {"id": f"{i}a", "question": f"What is passage {i} about?", "answers": [{"text": "the river", "answer_start": 0}]},
        {"id": f"{i}b", "question": "Who?", "answers": [], "is_impossible": True}]} for i in range(200)]
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "train-v2.0.json").write_text(json.dumps(squad(paragraphs)))
    (tmp_path / "squad" / "dev-v2.0.json").write_text(json.dumps(squad(paragraphs[:1])))
    stats = prepare_sft(PrepareSftConfig(squad_dir=str(tmp_path / "squad"), output_dir=str(tmp_path / "sft"),
                                         validation_share=0.1))
    rows = {n: [json.loads(line) for line in (tmp_path / "sft" / n).read_text().splitlines()]
            for n in ("train.jsonl", "validation.jsonl")}
    assert stats["train"]["conversations"] + stats["validation"]["conversations"] == 400 == sum(map(len, rows.values()))
    assert 0 < stats["validation"]["passages"] < 40 and stats["no_answer"] == 200
    passages = {n: {r["messages"][0]["content"].split("\n\n")[0] for r in rs} for n, rs in rows.items()}
    assert not passages["train.jsonl"] & passages["validation.jsonl"]
    first = rows["train.jsonl"][0]["messages"]
    assert first[0]["content"].endswith("\n\nWhat is passage 0 about?") or first[0]["content"].endswith("\n\nWho?")
    assert {r["messages"][1]["content"] for r in rows["train.jsonl"]} == {"the river", NO_ANSWER}
    from openllm_ds.errors import UserError
    from openllm_ds.utils import OutputKind, write_manifest

    (tmp_path / "other").mkdir()
    write_manifest(tmp_path / "other", OutputKind("cleaned data", "openllm-ds prepare"), ["x"])
    with pytest.raises(UserError, match=r"other is the output of `openllm-ds prepare` \(cleaned data\)"):
        prepare_sft(PrepareSftConfig(squad_dir=str(tmp_path / "squad"), output_dir=str(tmp_path / "other")))


def test_conversation_of_maps_prompt_completion():
    assert conversation_of({"prompt": "Q", "completion": "A"}, "f line 1") == [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
