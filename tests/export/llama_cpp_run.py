"""Run a GGUF file in llama.cpp through llama-cpp-python, for tests/export/test_gguf.py.

Run by .venv-gguf's interpreter (scripts/setup.sh --gguf), never imported by the test process: the main venv does
not need llama-cpp-python. Reads one JSON request on stdin, writes one JSON answer on stdout:

    {"model": PATH, "n_ctx": N,
     "tokenize": [text, ...],                 -> "tokens": [[id, ...], ...]      (no BOS)
     "prompts": [text, ...], "max_tokens": N  -> "prompt_ids", "generated": [[id, ...], ...]  (greedy, BOS added)
     "windows": [[id, ...], ...]              -> "nll": total negative log-likelihood of tokens 2.. of each window,
                                                 "predicted": how many tokens it covers (llama.cpp's own logits)
     "chat": [{"role", "content"}, ...]       -> "chat_text": create_chat_completion's greedy answer,
                                                 "chat_format": the handler llama-cpp-python chose}
"""

import json
import sys

import llama_cpp.llama_cpp as llama_c
import numpy as np
from llama_cpp import Llama


def no_weight_repacking():
    """llama.cpp's extra buffer types off (llama-server's --no-repack): on a CPU with AMX, 0.3.36's AMX repacking of
    q8_0 weights crashes (SIGSEGV) on the tests' 64-wide rows. llama-cpp-python has no argument for it."""
    default = llama_c.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_c.llama_model_default_params = params


def main() -> None:
    req = json.load(sys.stdin)
    no_weight_repacking()
    llm = Llama(model_path=req["model"], n_ctx=req["n_ctx"], n_batch=req["n_ctx"], logits_all=bool(req.get("windows")),
                verbose=False, seed=0)
    out = {"n_vocab": llm.n_vocab(), "bos": llm.token_bos(), "eos": llm.token_eos()}
    out["tokens"] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in req.get("tokenize", [])]
    out["prompt_ids"], out["generated"] = [], []
    for prompt in req.get("prompts", []):
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        llm.reset()
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            got.append(int(token))
            if len(got) == req["max_tokens"]:
                break
        out["prompt_ids"].append(ids)
        out["generated"].append(got)
    nll, predicted = 0.0, 0
    for window in req.get("windows", []):
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
        predicted += len(window) - 1
    out["nll"], out["predicted"] = nll, predicted
    if req.get("chat"):
        llm.reset()
        answer = llm.create_chat_completion(req["chat"], temperature=0.0, top_k=1, repeat_penalty=1.0,
                                            max_tokens=req["max_tokens"])
        out["chat_text"] = answer["choices"][0]["message"]["content"]
        out["chat_format"] = llm.chat_format
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
