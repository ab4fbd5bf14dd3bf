"""vLLM serving the Hugging Face export of a trained and fine-tuned tiny model (conftest's finetuned_export), started by `openllm-ds serve` (engine auto picks
vLLM where it is installed: its CPU build here, from `scripts/setup.sh --vllm`), against the official openai
client; its greedy tokens against the built-in server's and `openllm-ds generate`'s; and the prompt convention
(generation starts after </s>) compared by the first generated token's logits across generate, evaluation, the
built-in server, transformers, vLLM and the lm-eval task YAMLs.

CI installs vLLM (.ci/run), so there these tests run; elsewhere without vLLM they skip and say how to install it.
"""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import free_port, place_conversation
from openllm_ds.model import generate
from openllm_ds.serve import start_server
from openllm_ds.serve.vllm import vllm_python, vllm_unavailable_reason

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-trained"
KEY = "vllm-k3y"
PROMPTS = ["The Normans were", "Super Bowl 50 was", "The University of Chicago", "Oxygen is a chemical element",
           "In 1066 the", "The Amazon rainforest"]

if vllm_python() is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must install vLLM (scripts/setup.sh --vllm, as .ci/run does)")
    pytest.skip("vLLM is not installed: scripts/setup.sh --vllm installs it into .venv-vllm", allow_module_level=True)


@pytest.fixture(scope="module")
def vllm(finetuned_export, tmp_path_factory):
    """`openllm-ds serve --engine auto` on the export, with the key in OPENLLM_API_KEY; (process, port, log file)."""
    export_dir, _ = finetuned_export
    assert vllm_unavailable_reason(export_dir) is None, vllm_unavailable_reason(export_dir)
    port = free_port()
    log_file = tmp_path_factory.mktemp("vllm") / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENLLM_API_KEY": KEY}
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "openllm_ds.cli", "serve", "--model_path", str(export_dir),
                                 "--port", str(port), "--max_length", "128", "--model_name", MODEL,
                                 "--vllm_arg=--enforce-eager"],  # no compile step: a quicker start for the test
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while "serving '" not in log_file.read_text(errors="replace"):
            assert proc.poll() is None, log_file.read_text(errors="replace")[-4000:]
            assert time.time() < deadline, log_file.read_text(errors="replace")[-4000:]
            time.sleep(0.5)
        yield proc, port, log_file
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


@pytest.fixture(scope="module")
def client(vllm):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{vllm[1]}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def builtin(finetuned_export):
    with start_server(finetuned_export[0], context_length=128, model_name=MODEL) as srv:
        yield openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=120), srv


def greedy(model, ids: list[int], n: int) -> list[int]:
    out = []
    for t in generate(model, torch.tensor([ids]), n, temperature=0, eos_id=2):
        out.append(int(t))
        if out[-1] == 2:
            break
    return out


def test_vllm_answers_the_openai_client(vllm, client):
    proc, port, log_file = vllm
    assert "starting vLLM in float32:" in log_file.read_text() and "vllm.entrypoints.openai.api_server" in log_file.read_text()
    assert KEY not in log_file.read_text()  # the key travels in the environment, never on the command line
    assert [m.id for m in client.models.list().data] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
    # the fine-tuned model may close a plain completion after a word: ignore_eos streams all 12 tokens
    full = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert full.object == "text_completion" and full.usage.completion_tokens == 12
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text and len(chunks) > 3
    messages = [{"role": "user", "content": "Who were the Normans?"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    stream = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content


def test_greedy_tokens_equal_builtin_and_generate(client, builtin, finetuned_export, tokenizer_dir):
    from openllm_ds.evaluation import generate_text
    from openllm_ds.tokenizer import load_tokenizer

    export_dir, model = finetuned_export
    ours, srv = builtin
    tok = load_tokenizer(tokenizer_dir)
    for prompt in PROMPTS:
        want = greedy(model, tok.encode_prompt(prompt), 16)
        v = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                      extra_body={"return_token_ids": True})
        assert v.choices[0].token_ids == want, prompt  # vLLM's generated ids (EOS included when it stopped)
        b = ours.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
        g = generate_text(export_dir, prompt, max_new_tokens=16, temperature=0, stream=False)[0]
        assert b.choices[0].text == g == v.choices[0].text, prompt
        assert b.usage == v.usage  # prompt tokens counted with the </s> both put first
    assert len({tuple(greedy(model, tok.encode_prompt(p), 16)) for p in PROMPTS}) >= 3  # not one answer for all


def test_one_prompt_convention_first_token_logits(client, builtin, finetuned_export, tokenizer_dir):
    """Where generation starts: after </s>, the same ids and the same first-token logits in generate, evaluation,
    the built-in server, transformers (`generate(**tok(text))`), vLLM and the lm-eval YAMLs."""
    import transformers

    from openllm_ds.evaluation.qa_tasks import fit_prompt, qa_prompt
    from openllm_ds.tokenizer import load_tokenizer

    export_dir, model = finetuned_export
    ours, srv = builtin
    tok = load_tokenizer(tokenizer_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export_dir))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32).eval()
    for prompt in PROMPTS[:3]:
        ids = tok.encode_prompt(prompt)  # `openllm-ds generate`
        assert ids[0] == tok.eos_id == 2
        assert fit_prompt(tok.prompt_prefix_id, tok.encode(prompt), 100)[0] == ids  # evaluation's QA/cloze prompts
        assert srv.completer.encode(prompt) == ids  # the built-in server
        assert hf_tok(prompt)["input_ids"] == ids and hf_tok.bos_token_id == 2  # transformers, by itself
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
            hf_logits = hf_model(**hf_tok(prompt, return_tensors="pt")).logits[0, -1]
            no_prefix = model(torch.tensor([ids[1:]]))[0, -1]
        assert (hf_logits - logits).abs().max() < 1e-4
        # the convention matters: without </s> the logits differ, by far more than the implementations do
        assert (no_prefix - logits).abs().max() > 1e-3
        # vLLM: its prompt ids, and its top-5 log-probabilities of the first generated token
        v = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=5,
                                      extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
        assert v.choices[0].prompt_token_ids == ids
        top = {int(k.split(":")[1]): lp for k, lp in v.choices[0].logprobs.top_logprobs[0].items()}  # "token_id:N"
        want = torch.log_softmax(logits, -1)
        assert set(top) == set(want.topk(5).indices.tolist())
        for token_id, lp in top.items():
            assert abs(lp - want[token_id].item()) < 1e-3, (prompt, token_id)
        # the built-in server counts (and so generates after) the same ids
        assert ours.completions.create(model=MODEL, prompt=prompt, max_tokens=1).usage.prompt_tokens == len(ids)

    # lm-eval: rolling perplexity starts each text with the tokenizer's BOS (</s>); the QA tasks' description puts
    # </s> before the (few-shot) context, tokenized without special tokens (lm-eval's default for causal models)
    tasks = {f.stem: yaml.safe_load(f.read_text().replace("!function", "")) for f in (ROOT / "eval/lm_eval").glob("*.yaml")}
    for name, task in tasks.items():
        if task["output_type"] == "loglikelihood_rolling":
            assert hf_tok.bos_token_id == tok.prompt_prefix_id, name
        else:
            text = task["description"] + qa_prompt("Normandy is in France.", "Where is Normandy?")
            assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode_prompt(
                qa_prompt("Normandy is in France.", "Where is Normandy?")), name
            assert task["doc_to_text"] == "Context: {{context}}\nQuestion: {{question}}\nAnswer:"


CONVERSATIONS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who were the Normans?"},
     {"role": "assistant", "content": "A people of Normandy."}, {"role": "user", "content": "When?"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Où est Köln? 東京は?"}],
    [{"role": "user", "content": "Normandy is in France.\n\nWhere is Normandy?"}],
]


def test_one_chat_template_gives_the_same_prompt_ids_everywhere(client, builtin, finetuned_export):
    """A conversation's prompt ids: the same in training (tokenizer/chat.encode_conversation), the built-in server,
    `openllm_ds.load(...).chat`, transformers' apply_chat_template and vLLM's /v1/chat/completions."""
    import transformers

    import openllm_ds
    from openllm_ds.tokenizer.chat import SpecialTokens, encode_conversation, load_chat_template

    export_dir, _ = finetuned_export
    ours, srv = builtin
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export_dir))
    lm = openllm_ds.load(str(export_dir))
    template = load_chat_template(export_dir, lm.tokenizer)
    for messages in CONVERSATIONS:
        ids = SpecialTokens(lm.tokenizer).encode(template.render(messages, add_generation_prompt=True))
        assert ids[0] == 2 and len(ids) > 5
        assert srv.completer.encode(srv.completer.render_chat(messages), add_prefix=False) == ids  # built-in server
        assert lm.completer.encode(lm.completer.render_chat(messages), add_prefix=False) == ids  # load(...).chat's
        assert list(hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                               return_dict=False)) == ids  # transformers
        v = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0,
                                           extra_body={"return_token_ids": True})
        assert v.prompt_token_ids == ids  # vLLM
        b = ours.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0)
        assert b.usage.prompt_tokens == len(ids)
        # training: the conversation with an answer starts with these very ids; the new answer has loss from its
        # first token to its closing </s>, the "Assistant:" before it none
        train_ids, labels = encode_conversation([*messages, {"role": "assistant", "content": "In France."}], template,
                                                SpecialTokens(lm.tokenizer))
        assert train_ids[:len(ids)] == ids and labels[len(ids) - 1] == -100
        assert labels[len(ids):] == train_ids[len(ids):] and labels[-1] == 2


def test_the_finetuned_export_answers_a_squad_style_chat_alike_in_vllm_and_builtin(client, builtin):
    """`openllm-ds serve` on the fine-tuned export: a SQuAD-style question (a passage, a blank line, the question)
    through the openai client gets the same greedy answer from vLLM and the built-in server, ended by the </s> the
    fine-tune taught it to close its answers with."""
    ours, _ = builtin
    for a, b in (("river", "forest"), ("market", "church")):
        messages = place_conversation(a, b)[:1]
        v = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
        o = ours.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
        assert v.choices[0].message.content == o.choices[0].message.content
        assert v.choices[0].finish_reason == o.choices[0].finish_reason == "stop"
        assert 1 <= v.usage.completion_tokens < 24 and v.choices[0].message.content.strip()


def test_serve_stops_vllm_cleanly(vllm, client):
    proc, port, log_file = vllm
    assert client.completions.create(model=MODEL, prompt="The", max_tokens=2).usage.completion_tokens >= 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    log = log_file.read_text(errors="replace")
    assert "stopping vLLM" in log and "vLLM stopped (exit code 0)" in log
    with pytest.raises(OSError):  # nothing listens any more: vLLM's processes are gone
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        conn.getresponse()
    marker = f"--port\0{port}\0".encode()
    leftover = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes():
                leftover.append(cmdline.parent.name)
        except OSError:
            pass
    assert leftover == [], leftover
