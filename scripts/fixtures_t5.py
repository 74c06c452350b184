"""Tiny T5 encoder fixtures (issue 16, item 2): a random-weight `T5EncoderModel` (gated-GELU v1.1 layout) and a tiny
SentencePiece unigram tokenizer converted by transformers into `tokenizer.json` + `tokenizer_config.json`, with token
ids and `last_hidden_state` references for prompts at max lengths 48 and 20, and transformers' relative-position
buckets for the tiny and the real (T5-XXL) bucket settings.

Nothing is downloaded: the tokenizer is trained here on procedurally generated text (sentencepiece, nmt_nfkc
normalisation as T5's own model uses), then converted exactly as transformers converts `spiece.model` (T5Converter:
Precompiled normaliser, WhitespaceSplit + Metaspace, `$A </s>` post-processor, 100 `<extra_id_*>` sentinels).
Deterministic: fixed seeds, one thread.

    /work/venv/bin/python scripts/fixtures_t5.py            # writes tests/fixtures/t5/
"""

import io
import json
import os
import random
import shutil
import tempfile

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["MKL_CBWR"] = "COMPATIBLE"
os.environ["ATEN_CPU_CAPABILITY"] = "default"

import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import T5Config, T5EncoderModel, T5Tokenizer  # noqa: E402

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "t5")

# Lengths the references are computed at: 48 is what the tokenizer folder states (model_max_length), 20 a
# caller-given length shorter than the long prompts.
LENGTHS = (48, 20)

PROMPTS = [
    "",
    "a photo of a cat",
    "A Red dog and the blue light, on a photo of kato rimu.",
    # Long: truncated at both lengths, `</s>` kept last.
    " ".join(["the quick brown fox jumps over the lazy dog"] * 8),
    # NFKC (the Precompiled normaliser): ligature, full-width digits, roman numeral, fraktur, ellipsis.
    "café naïve Straße über ﬁne １２３ Ⅻ ℌ … — “quoted”",
    # Characters not in the vocabulary (unk) and CJK / emoji.
    "東京 日本語 😀 ʘ‿ʘ ☃ ✓ ∮",
    "  leading, trailing   and   repeated   spaces  ",
    "tabs\tand\nnewlines\r\nmixed",
    "Hello,world!!! ... ?? (x) [y] {z} #tag @home 100% 3.14 e-mail x2",
    "<extra_id_0> sentinel and </s> inside <pad>",
]


def corpus(rng):
    syll = ["ka", "to", "ri", "mu", "sen", "lo", "pa", "qui", "zor", "ben", "dra", "fle", "gho", "ny", "stre",
            "wa", "xi", "yel", "cat", "dog", "the", "and", "red", "blue", "light", "photo", "of", "a", "in", "on",
            "quick", "brown", "fox", "over", "lazy"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    extra = ["café", "naïve", "Straße", "東京", "日本語", "über", "fine", "123", "XII", "...", "—", "\"quoted\"",
             "'s", "e-mail", "x2", "3.14", "100%", "#tag", "@home", "(x)", "[y]", "{z}"]

    def sentence():
        out = []
        for _ in range(rng.randint(3, 14)):
            r = rng.random()
            if r < 0.1:
                out.append(rng.choice(extra))
            elif r < 0.15:
                out.append(str(rng.randint(0, 2000)))
            else:
                w = rng.choice(words)
                out.append(w.capitalize() if rng.random() < 0.15 else w)
            if rng.random() < 0.08:
                out[-1] += rng.choice([",", ".", "!", "?", ";", ":"])
        return " ".join(out)

    return [sentence() for _ in range(3000)]


def tokenizer(out_dir):
    """Train a 384-piece unigram (pad 0, </s> 1, unk 2, no BOS: T5's ids) and convert it as transformers does."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(random.Random(0))), model_writer=buf, vocab_size=384, model_type="unigram",
        normalization_rule_name="nmt_nfkc", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "spiece.model"), "wb") as f:
            f.write(buf.getvalue())
        tok = T5Tokenizer.from_pretrained(tmp, model_max_length=LENGTHS[0])
    tok.save_pretrained(out_dir)
    return tok


def model(out_dir, vocab, feed_forward_proj="gated-gelu", seed=1):
    # inner_dim (heads × d_kv = 40) differs from d_model (32) and d_ff (48), as in T5 v1.1 small; 32 buckets with a
    # max distance of 20 so that the log buckets saturate within 48 tokens.
    config = T5Config(vocab_size=vocab, d_model=32, d_kv=10, d_ff=48, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=32, relative_attention_max_distance=20, dropout_rate=0.0,
                      layer_norm_epsilon=1e-6, feed_forward_proj=feed_forward_proj, is_encoder_decoder=False,
                      use_cache=False)
    torch.manual_seed(0)
    m = T5EncoderModel(config).eval()
    g = torch.Generator().manual_seed(seed)
    seen = 0
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "relative_attention_bias" in name or name == "shared.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            seen += 1
    assert seen == len(list(m.parameters()))
    m.save_pretrained(out_dir, safe_serialization=True)
    return m


README = """# T5 encoder fixtures (written by scripts/fixtures_t5.py; do not edit)

- `tokenizer_2/`: `tokenizer.json` + `tokenizer_config.json` as transformers 5.23 writes them for a SentencePiece
  unigram model (384 pieces trained here on generated text, nmt_nfkc normalisation, pad 0 / `</s>` 1 / unk 2, no
  BOS) converted by `T5Tokenizer.from_pretrained` (T5Converter: Precompiled normaliser, WhitespaceSplit + Metaspace,
  `$A </s>`, 100 `<extra_id_*>` sentinels, ids 384..483), `model_max_length` 48.
- `text_encoder_2/`: `T5EncoderModel` (`config.json`, `model.safetensors`, F32): vocab 512, d_model 32, 4 heads of
  d_kv 10 (inner 40), d_ff 48 gated-gelu, 2 layers, 32 buckets, max distance 20. Every parameter redrawn: norms
  1 + N(0, 0.2), token table and relative bias N(0, 1), projections N(0, 1/fan_in).
- `text_encoder_v1_0/`: the same shapes with `feed_forward_proj` "relu" (one `wi`), other weights.
- `prompts.json`: the prompts (empty, plain, long, NFKC unicode, unk characters, whitespace runs, punctuation,
  sentinels in the text).
- `reference.safetensors`: for n in 48, 20: `ids_{n}`, `mask_{n}` [P, n] (i64, `padding="max_length"`,
  `truncation=True`), `hidden_{n}` [P, n, 32] = `last_hidden_state` without a mask (FLUX), `hidden_masked_{n}` with
  `attention_mask`; `hidden_v1_0_20` (v1.0 model, ids_20, no mask); `buckets_{nb}_{md}` [2001] (i64) =
  `T5Attention._relative_position_bucket(arange(-1000, 1001), bidirectional=True, nb, md)` for (32, 20), (32, 128),
  (16, 50), (64, 256).
"""


def main():
    if os.path.isdir(ROOT):
        shutil.rmtree(ROOT)
    tok_dir, enc_dir = os.path.join(ROOT, "tokenizer_2"), os.path.join(ROOT, "text_encoder_2")
    tok = tokenizer(tok_dir)
    m = model(enc_dir, vocab=512)
    # T5 v1.0's feed-forward (`relu`, one `wi`): the ungated path, referenced at length 20 only.
    m10 = model(os.path.join(ROOT, "text_encoder_v1_0"), vocab=512, feed_forward_proj="relu", seed=2)
    assert len(tok) <= 512
    refs = {}
    for n in LENGTHS:
        enc = tok(PROMPTS, padding="max_length", max_length=n, truncation=True, return_tensors="pt")
        ids, mask = enc.input_ids, enc.attention_mask
        assert (ids[:, -1] == 1).any() and ids.shape == (len(PROMPTS), n)
        with torch.no_grad():
            refs[f"ids_{n}"] = ids.to(torch.int64)
            refs[f"mask_{n}"] = mask.to(torch.int64)
            # FLUX passes no mask: pads attend like tokens.
            refs[f"hidden_{n}"] = m(input_ids=ids).last_hidden_state.contiguous()
            refs[f"hidden_masked_{n}"] = m(input_ids=ids, attention_mask=mask).last_hidden_state.contiguous()
            if n == 20:
                refs["hidden_v1_0_20"] = m10(input_ids=ids).last_hidden_state.contiguous()
    # The folder states 48: the default call gives the same ids.
    default = tok(PROMPTS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert torch.equal(default, refs["ids_48"])
    attn = m.encoder.block[0].layer[0].SelfAttention
    rel = torch.arange(-1000, 1001, dtype=torch.long)
    for nb, md in [(32, 20), (32, 128), (16, 50), (64, 256)]:
        refs[f"buckets_{nb}_{md}"] = attn._relative_position_bucket(rel, bidirectional=True, num_buckets=nb,
                                                                    max_distance=md).to(torch.int64).contiguous()
    save_file(refs, os.path.join(ROOT, "reference.safetensors"),
              metadata={"generated_by": f"scripts/fixtures_t5.py, torch {torch.__version__}, "
                                        f"transformers {transformers.__version__}, sentencepiece {spm.__version__}"})
    with open(os.path.join(ROOT, "README.md"), "w", encoding="utf-8") as f:
        f.write(README)
    with open(os.path.join(ROOT, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump({"prompts": PROMPTS, "lengths": list(LENGTHS), "relative_positions": [-1000, 1000]}, f,
                  ensure_ascii=False, indent=1)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ROOT) for f in fs)
    print(f"wrote {ROOT}: {total} bytes")


if __name__ == "__main__":
    main()
