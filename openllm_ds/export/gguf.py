"""GGUF export: one ``model.gguf`` that llama.cpp and the tools built on it (llama-cpp-python, Ollama, LM Studio)
run, written with ``gguf``'s ``GGUFWriter`` (llama.cpp's own gguf-py).

The file holds what llama.cpp's ``convert_hf_to_gguf.py`` writes for a Llama with a SentencePiece tokenizer:

- ``llama`` architecture metadata: context length, sizes, heads, RoPE theta and dimension, the RMSNorm epsilon;
- the tensors under llama.cpp's names (``gguf``'s own name map from Hugging Face's), with the q/k rows permuted
  into llama.cpp's RoPE layout (pairs of adjacent dimensions, where Hugging Face rotates halves); a tied embedding
  is ``token_embd`` alone (llama.cpp reuses it as the output);
- the SentencePiece vocabulary (tokenizer model ``llama``): every piece with its score and type (normal, unknown,
  control, user-defined, unused, byte), the BOS/EOS/UNK/PAD ids and the prompt convention: BOS is ``</s>``, added
  before every prompt (``add_bos_token``), as the Hugging Face export's tokenizer does;
- the model's ``chat_template`` when its tokenizer has one (llama-cpp-python's chat handler renders it).

``--gguf_type``: ``f32``; ``f16`` (matrices in half precision, norms in f32, llama.cpp's default); ``q8_0`` (matrices
in 8-bit blocks of 32). Beside the file: ``Modelfile`` for Ollama (``export/ollama.py``) and ``openllm_ds.json``.

Verification (on by default) reads the file back with ``gguf``'s ``GGUFReader``: every tensor, dequantised, against the model's (to each type's tolerance), and the token list against SentencePiece's. The
tests run the file in llama.cpp itself (``tests/export/test_gguf.py``, through ``.venv-gguf``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from openllm_ds.checkpoint import EXPORT_INFO, LoadedModel
from openllm_ds.errors import UserError, VerificationError
from openllm_ds.export.common import export_info
from openllm_ds.export.formats import GGUF_TYPES
from openllm_ds.model.hf_map import to_hf_state_dict
from openllm_ds.utils import atomic_write_json

GGUF_FILE = "model.gguf"
DEFAULT_GGUF_TYPE = "f16"
# largest |GGUF weight - ours| accepted, relative to the tensor's largest |weight|
VERIFY_TOLERANCE = {"f32": 0.0, "f16": 1e-3, "q8_0": 1e-2}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install gguf (or reinstall openllm-ds)") from None
    return gguf


def check_gguf_layout(src: LoadedModel, gguf_type: str) -> None:
    """Refuse, by name, what GGUF's llama layout (or the chosen type) cannot hold."""
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    cfg, tok = src.model_config, src.tokenizer
    if tok.vocab_size != cfg.vocab_size:
        raise UserError(f"GGUF's llama vocabulary needs one piece per embedding row: the tokenizer has "
                        f"{tok.vocab_size} pieces, model.vocab_size is {cfg.vocab_size}")
    if tok.pad_id == tok.eos_id or tok.bos_id < 0 or tok.eos_id < 0:
        raise UserError(f"{src.tokenizer_dir / 'tokenizer.model'} needs distinct EOS and PAD ids and a BOS piece for "
                        "GGUF's special-token ids; train the tokenizer with `openllm-ds train-tokenizer`")
    if gguf_type == "q8_0":
        block = 32  # Q8_0's block: a row length must be a multiple of it
        rows = {"model.d_model": cfg.d_model, "model.d_ff": cfg.d_ff}
        odd = [f"{k} = {v}" for k, v in rows.items() if v % block]
        if odd:
            raise UserError(f"--gguf_type q8_0 quantises rows in blocks of {block}: {', '.join(odd)} (not a multiple "
                            f"of {block}); export with --gguf_type f16 or f32")


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's q/k rows (each head's rotated halves) -> llama.cpp's (rotated pairs), as its converter does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(src: LoadedModel) -> dict[str, np.ndarray]:
    """llama.cpp's tensor name -> the fp32 weights in its layout."""
    gguf = _gguf()
    cfg = src.model_config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    out = {}
    for hf_name, t in to_hf_state_dict(src.model.state_dict(), cfg).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor {hf_name} has no name in GGUF's llama layout")
        w = t.detach().to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            w = permute_rope(w, cfg.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = permute_rope(w, cfg.num_kv_heads)
        out[name] = np.ascontiguousarray(w)  # get_name keeps the suffix: "blk.0.attn_q.weight"
    return out


def tensor_type(name: str, w: np.ndarray, gguf_type: str):
    """The stored type of one tensor: vectors (the norms) stay f32, as in llama.cpp's own conversions."""
    q = _gguf().GGMLQuantizationType
    if w.ndim == 1 or gguf_type == "f32":
        return q.F32
    return q.F16 if gguf_type == "f16" else q.Q8_0


def vocabulary(src: LoadedModel) -> tuple[list[bytes], list[float], list[int]]:
    """The SentencePiece pieces, scores and GGUF token types, by id."""
    gguf = _gguf()
    sp, types = src.tokenizer.sp, gguf.TokenType
    pieces, scores, kinds = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(float(sp.get_score(i)))
        kinds.append(types.UNKNOWN if sp.is_unknown(i) else types.CONTROL if sp.is_control(i)
                     else types.BYTE if sp.is_byte(i) else types.UNUSED if sp.is_unused(i)
                     else types.USER_DEFINED if _is_user_defined(sp, i) else types.NORMAL)
    return pieces, scores, [int(k) for k in kinds]


def _is_user_defined(sp, i: int) -> bool:
    return getattr(sp, "IsUserDefined", lambda _: False)(i)


def add_space_prefix(src: LoadedModel) -> bool:
    """SentencePiece's add_dummy_prefix (a space before the text), which llama.cpp's tokenizer must repeat."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(src.tokenizer.sp.serialized_model_proto())
    return proto.normalizer_spec.add_dummy_prefix


def export_gguf(src: LoadedModel, out: Path, dtype: str = "fp32", verify: bool = True,
                gguf_type: str | None = None) -> dict:
    gguf = _gguf()
    gguf_type = gguf_type or DEFAULT_GGUF_TYPE
    check_gguf_layout(src, gguf_type)
    cfg, tok = src.model_config, src.tokenizer
    chat = model_chat_template(src)
    template = chat.source if chat else None
    writer = gguf.GGUFWriter(str(out / GGUF_FILE), "llama")
    writer.add_name(src.run_name or "openllm-ds model")
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    pieces, scores, kinds = vocabulary(src)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    writer.add_bos_token_id(tok.prompt_prefix_id)  # the prompt convention: every prompt starts after `</s>`
    writer.add_eos_token_id(tok.eos_id)
    writer.add_unk_token_id(tok.unk_id)
    if tok.pad_id >= 0:
        writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(add_space_prefix(src))
    if template:
        writer.add_chat_template(template)
    types, tensors = {}, gguf_tensors(src)
    for name, w in tensors.items():
        qtype = tensor_type(name, w, gguf_type)
        types[name] = qtype.name
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from openllm_ds.export.ollama import write_modelfile

    modelfile = write_modelfile(out, chat, tok)
    atomic_write_json(out / EXPORT_INFO, {**export_info(src), "format": "gguf", "gguf_type": gguf_type,
                                          "gguf": {"file": GGUF_FILE, "chat_template": bool(template),
                                                   "modelfile_template": modelfile}})
    report = {"gguf_type": gguf_type, "tensors": len(types), "chat_template": bool(template),
              "modelfile_template": modelfile}
    report["verification"] = (verify_gguf(out / GGUF_FILE, src, gguf_type, tensors, pieces) if verify
                              else {"skipped": "--no-verify"})
    return report


def model_chat_template(src: LoadedModel):
    from openllm_ds.tokenizer.chat import load_chat_template

    return load_chat_template(src.tokenizer_dir, src.tokenizer)


def verify_gguf(path: Path, src: LoadedModel, gguf_type: str, tensors: dict[str, np.ndarray],
                pieces: list[bytes]) -> dict:
    """Read the file back: the vocabulary and every tensor (dequantised) against what was written from the model
    (``tensors``: ``gguf_tensors``; ``pieces``: ``vocabulary``'s)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    tokens = [t.encode("utf-8") for t in fields["tokenizer.ggml.tokens"].contents()]
    if tokens != pieces:
        raise VerificationError(f"{path}: the token list read back differs from {src.tokenizer_dir / 'tokenizer.model'}")
    want = dict(tensors)
    worst = 0.0
    for t in reader.tensors:
        if t.name not in want:
            raise VerificationError(f"{path} holds a tensor {t.name} the model does not have")
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want[t.name].shape)
        ref = want.pop(t.name)
        scale = float(np.abs(ref).max()) or 1.0
        worst = max(worst, float(np.abs(got - ref).max()) / scale)
    if want:
        raise VerificationError(f"{path} lacks the tensors {', '.join(sorted(want))}")
    tol = VERIFY_TOLERANCE[gguf_type]
    if worst > tol:
        raise VerificationError(f"{path}: weights read back differ by {worst:.3g} of their largest value (> {tol})")
    return {"verified": True, "max_relative_diff": worst, "tolerance": tol, "tokens": len(tokens),
            "tensors": len(reader.tensors)}
