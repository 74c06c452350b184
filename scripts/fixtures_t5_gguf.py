#!/usr/bin/env python3
"""Write the tiny T5 v1.1 encoder of tests/fixtures/t5 as a llama.cpp-style T5 GGUF (`enc.blk.N.*` names, the
SentencePiece vocabulary in `tokenizer.ggml.*`), for `--text-encoder-2 FILE` (lowvram's api/t5_file.rs).

    /work/venv/bin/python scripts/fixtures_t5_gguf.py

Tensors stay F32 (the exact weights of text_encoder_2/model.safetensors), so the GGUF-loaded encoder must give the
folder's hidden states bit for bit: the test proves the name mapping, the config read from shapes and the tokenizer
rebuilt from the vocabulary metadata, not dequantisation (tests/quant_formats.rs covers that). Vocabulary: the
Unigram pieces and scores of tokenizer_2/tokenizer.json, types as SentencePiece gives them (2 unknown, 3 control for
<pad>, </s> and the <extra_id_N> sentinels, 1 normal), its NFKC `precompiled_charsmap`. Deterministic (no randomness). gguf==0.19.0.
"""
import base64
import json
from pathlib import Path

import numpy as np
import gguf
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
T5 = ROOT / "tests" / "fixtures" / "t5"

TO_GGUF = {
    "layer.0.layer_norm": "attn_norm",
    "layer.0.SelfAttention.q": "attn_q",
    "layer.0.SelfAttention.k": "attn_k",
    "layer.0.SelfAttention.v": "attn_v",
    "layer.0.SelfAttention.o": "attn_o",
    "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b",
    "layer.1.layer_norm": "ffn_norm",
    "layer.1.DenseReluDense.wi_0": "ffn_gate",
    "layer.1.DenseReluDense.wi_1": "ffn_up",
    "layer.1.DenseReluDense.wo": "ffn_down",
}


def gguf_name(name):
    if name == "shared.weight":
        return "token_embd.weight"
    if name == "encoder.final_layer_norm.weight":
        return "enc.output_norm.weight"
    if name == "encoder.embed_tokens.weight":
        return None  # transformers' tied copy of shared.weight
    stem = name.removeprefix("encoder.block.").removesuffix(".weight")
    n, rest = stem.split(".", 1)
    return f"enc.blk.{int(n)}.{TO_GGUF[rest]}.weight"


def main():
    weights = load_file(str(T5 / "text_encoder_2" / "model.safetensors"))
    tok = json.loads((T5 / "tokenizer_2" / "tokenizer.json").read_text())
    out = T5 / "t5-tiny-f32.gguf"
    w = gguf.GGUFWriter(str(out), "t5encoder")
    w.add_tokenizer_model("t5")
    pieces = tok["model"]["vocab"]
    unk = tok["model"]["unk_id"]
    w.add_token_list([p for p, _ in pieces])
    w.add_token_scores([float(s) for _, s in pieces])
    control = lambda p: p in ("<pad>", "</s>") or p.startswith("<extra_id_")  # noqa: E731
    w.add_token_types([2 if i == unk else 3 if control(p) else 1 for i, (p, _) in enumerate(pieces)])
    w.add_unk_token_id(unk)
    w.add_pad_token_id(0)
    w.add_eos_token_id(1)
    norm = tok["normalizer"]
    assert norm["type"] == "Precompiled", norm["type"]
    w.add_precompiled_charsmap(base64.b64decode(norm["precompiled_charsmap"]))
    for name in sorted(weights):
        g = gguf_name(name)
        if g is not None:
            w.add_tensor(g, np.ascontiguousarray(weights[name].astype(np.float32)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
