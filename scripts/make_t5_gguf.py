#!/usr/bin/env python3
"""Write a random-weight T5-XXL encoder (FLUX's text encoder, T5 v1.1) as a llama.cpp-named Q8_0 GGUF, plus a
matching `tokenizer.json` made offline, for issue 16 item 7.

    /work/venv/bin/python scripts/make_t5_gguf.py --out /data/t5xxl-random-Q8_0.gguf              # real size
    /work/venv/bin/python scripts/make_t5_gguf.py --out /tmp/t5-small.gguf --layers 2               # check

GGUF layout (llama.cpp `convert_hf_to_gguf.py` T5EncoderModel, as city96/t5-v1_1-xxl-encoder-gguf ships it;
../shared/MODELS.md §4.1): `general.architecture = "t5encoder"`, `t5encoder.*` hyper-parameters (context 512,
embedding 4096, feed-forward 10240, 24 blocks, 64 heads of 64, 32 relative buckets, RMS eps 1e-6), the vocabulary
as `tokenizer.ggml.*` (model "t5", 32128 entries: the 32100 pieces of the tokenizer padded with `[PAD{i}]` to the
embedding rows, as llama.cpp pads); tensors `token_embd`, `enc.blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_o,
ffn_norm, ffn_gate, ffn_up, ffn_down}`, `enc.blk.0.attn_rel_b` (layer 0 only), `enc.output_norm`. Norms and the
relative-position bias in F32, every matrix Q8_0 (random blocks: float16 scale, random int8, weight std ≈
1/sqrt(fan_in); embedding std 1). Streamed tensor by tensor (peak RSS < 0.5 GB besides the tokenizer training).

tokenizer.json (`<out stem>.tokenizer.json` beside the GGUF): a SentencePiece-style Unigram (Metaspace "▁"
pre-tokenizer with prepend, `$A </s>` post-processor, Metaspace decoder; no precompiled normaliser) trained with the
`tokenizers` library on generated text (random words of random syllables: the weights are random anyway) to 32000
pieces with `<pad>` 0, `</s>` 1, `<unk>` 2, then `<extra_id_99>` … `<extra_id_0>` at 32000–32099 as T5's tokenizer
has them. Deterministic for a seed; training takes 3–8 minutes on 2 busy cores.

Sizes: real T5-XXL encoder 4,762,310,656 parameters → ~5.06 GB Q8_0 file (needs ~5.1 GB free disk), a few
minutes; `--layers 2` (check) ~0.48 GB.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import gguf

D, DKV, HEADS, FF, BUCKETS, CONTEXT = 4096, 64, 64, 10240, 32, 512
VOCAB_PIECES, EXTRA_IDS, EMBED_ROWS = 32000, 100, 32128


def generated_text(seed, lines):
    """Random sentences of random words (syllable strings with a Zipf-like word frequency), digits and punctuation."""
    rng = np.random.default_rng(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w", "x",
              "z", "br", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "st", "str", "th", "tr", "ch", "sp", "sk"]
    nuclei = ["a", "e", "i", "o", "u", "y", "ai", "ea", "ee", "oo", "ou", "ie", "au"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "ng", "st", "ck", "nd", "x"]
    words = []
    for _ in range(60000):
        n = int(rng.integers(1, 5))
        w = "".join(onsets[rng.integers(len(onsets))] + nuclei[rng.integers(len(nuclei))] + codas[rng.integers(len(codas))]
                    for _ in range(n))
        words.append(w)
    ranks = np.arange(1, len(words) + 1)
    p = 1.0 / ranks**1.05
    p /= p.sum()
    for _ in range(lines):
        k = int(rng.integers(4, 18))
        picked = rng.choice(len(words), size=k, p=p)
        toks = []
        for j in picked:
            w = words[j]
            r = rng.random()
            if r < 0.08:
                w = w.capitalize()
            elif r < 0.1:
                w = str(int(rng.integers(0, 10000)))
            toks.append(w)
        yield " ".join(toks) + rng.choice([".", ",", "!", "?", ";", ""])


def train_tokenizer(seed, lines):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=VOCAB_PIECES, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", max_piece_length=16, show_progress=False)
    tok.train_from_iterator(generated_text(seed, lines), trainer=trainer)
    n = tok.get_vocab_size()
    if n != VOCAB_PIECES:
        raise SystemExit(f"the Unigram trainer produced {n} pieces, not {VOCAB_PIECES}: raise --lines")
    tok.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(EXTRA_IDS))])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    assert tok.token_to_id("<pad>") == 0 and tok.token_to_id("</s>") == 1 and tok.token_to_id("<unk>") == 2
    assert tok.token_to_id("<extra_id_0>") == 32099 and tok.token_to_id("<extra_id_99>") == 32000
    return tok


def vocab_metadata(tok):
    """tokens, scores and types for `tokenizer.ggml.*` (SentencePiece types: 1 normal, 2 unknown, 3 control,
    5 unused), padded to the embedding rows."""
    model = json.loads(tok.to_str())["model"]
    tokens, scores, types = [], [], []
    for piece, score in model["vocab"]:
        tokens.append(piece)
        scores.append(float(score))
        types.append(2 if piece == "<unk>" else 3 if piece in ("<pad>", "</s>") else 1)
    for i in reversed(range(EXTRA_IDS)):
        tokens.append(f"<extra_id_{i}>")
        scores.append(0.0)
        types.append(3)
    while len(tokens) < EMBED_ROWS:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(5)
    return tokens, scores, types


def tensors(layers):
    out = [("token_embd.weight", (EMBED_ROWS, D), "embed")]
    for n in range(layers):
        p = f"enc.blk.{n}"
        out.append((f"{p}.attn_norm.weight", (D,), "norm"))
        for m in ["attn_q", "attn_k", "attn_v"]:
            out.append((f"{p}.{m}.weight", (HEADS * DKV, D), "weight"))
        out.append((f"{p}.attn_o.weight", (D, HEADS * DKV), "weight"))
        if n == 0:
            out.append((f"{p}.attn_rel_b.weight", (BUCKETS, HEADS), "relb"))
        out.append((f"{p}.ffn_norm.weight", (D,), "norm"))
        out.append((f"{p}.ffn_gate.weight", (FF, D), "weight"))
        out.append((f"{p}.ffn_up.weight", (FF, D), "weight"))
        out.append((f"{p}.ffn_down.weight", (D, FF), "weight"))
    out.append(("enc.output_norm.weight", (D,), "norm"))
    return out


def q8_0_blocks(rng, rows, cols, std):
    nb = rows * (cols // 32)
    raw = np.empty((nb, 34), dtype=np.uint8)
    raw[:, 2:] = rng.integers(-127, 128, size=(nb, 32), dtype=np.int8).view(np.uint8)
    d = (std / math.sqrt((255**2 - 1) / 12)) * rng.uniform(0.75, 1.25, size=nb)
    raw[:, :2] = d.astype("<f2").view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, cols // 32 * 34)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--layers", type=int, default=24, help="encoder blocks (T5-XXL: 24)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lines", type=int, default=200000, help="generated sentences to train the tokenizer on")
    a = ap.parse_args(argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(a.seed, a.lines)
    tok_path = a.out.with_name(a.out.stem + ".tokenizer.json")
    tok.save(str(tok_path))
    print(f"wrote {tok_path} ({tok.get_vocab_size()} tokens); 'a red fox' → {tok.encode('a red fox').tokens}")

    specs = tensors(a.layers)
    params = sum(math.prod(s) for _, s, _ in specs)
    if a.layers == 24:
        assert params == 4_762_310_656, params  # T5-XXL encoder (transformers T5EncoderModel)
    w = gguf.GGUFWriter(str(a.out), "t5encoder")
    w.add_name("t5-v1_1-xxl-random")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_block_count(a.layers)
    w.add_head_count(HEADS)
    w.add_key_length(DKV)
    w.add_value_length(DKV)
    w.add_layer_norm_eps(1e-6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_relative_attn_buckets_count(BUCKETS)
    w.add_decoder_start_token_id(0)
    w.add_file_type(7)  # MOSTLY_Q8_0
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, scores, types = vocab_metadata(tok)
    w.add_tokenizer_model("t5")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_pad_token_id(0)
    w.add_eos_token_id(1)
    w.add_unk_token_id(2)
    w.add_add_bos_token(False)
    w.add_add_eos_token(True)
    plan = []
    for name, shape, kind in specs:
        if kind in ("norm", "relb"):
            nbytes = math.prod(shape) * 4
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
        else:
            byte_shape = (shape[0], shape[1] // 32 * 34)
            nbytes = math.prod(byte_shape)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        plan.append((name, shape, kind, nbytes))
    total = sum(p[3] for p in plan)
    print(f"{a.out}: {len(plan)} tensors, {params:,} parameters, {total / 1e9:.3f} GB of tensor data (Q8_0)")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i, (name, shape, kind, nbytes) in enumerate(plan):
        rng = np.random.default_rng([a.seed, 1, i])
        if kind == "norm":
            data = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
        elif kind == "relb":
            data = (rng.standard_normal(size=shape) * 0.5).astype(np.float32)
        else:
            std = 1.0 if kind == "embed" else 1.0 / math.sqrt(shape[1])
            data = q8_0_blocks(rng, shape[0], shape[1], std)
        assert data.nbytes == nbytes, name
        w.write_tensor_data(data)
        del data
    w.close()
    print(f"wrote {a.out} ({a.out.stat().st_size / 1e9:.3f} GB)")


if __name__ == "__main__":
    sys.exit(main())
