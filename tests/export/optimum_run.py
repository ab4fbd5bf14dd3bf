"""Generate with optimum's ORTModelForCausalLM from an ONNX export, for tests/export/test_optimum.py.

Run by .venv-optimum's interpreter (scripts/setup.sh --optimum; optimum-onnx pins transformers < 4.58, so it never
goes into .venv), never imported by the test process. Reads one JSON request on stdin, writes one JSON answer:

    {"model": EXPORT_DIR, "prompts": [text, ...], "batch": [text, text], "max_new_tokens": N}
    -> {"prompt_ids": [[id, ...], ...], "single": [[new id, ...], ...], "batch": [[new id, ...], ...],
        "batch_input_ids": [[id, ...], ...], "batch_attention_mask": [[0|1, ...], ...], "inputs": [graph input names]}

Greedy (do_sample=False) throughout; the batch is left-padded by the export's tokenizer.
"""

import json
import sys

from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer


def new_tokens(output, width: int) -> list[list[int]]:
    return [row[width:].tolist() for row in output]


def main() -> None:
    req = json.load(sys.stdin)
    tok = AutoTokenizer.from_pretrained(req["model"])
    model = ORTModelForCausalLM.from_pretrained(req["model"])
    n = req["max_new_tokens"]
    out = {"prompt_ids": [], "single": [], "inputs": [i.name for i in model.model.get_inputs()]}
    for prompt in req["prompts"]:
        enc = tok(prompt, return_tensors="pt")
        out["prompt_ids"].append(enc["input_ids"][0].tolist())
        out["single"] += new_tokens(model.generate(**enc, max_new_tokens=n, do_sample=False), enc["input_ids"].size(1))
    enc = tok(req["batch"], return_tensors="pt", padding=True)
    out["batch_input_ids"], out["batch_attention_mask"] = enc["input_ids"].tolist(), enc["attention_mask"].tolist()
    out["batch"] = new_tokens(model.generate(**enc, max_new_tokens=n, do_sample=False), enc["input_ids"].size(1))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
