#!/usr/bin/env python3
"""Build the text-encoder and tokenizer fixtures of lowvram (tests/fixtures/text/) with transformers.

How to run (from the repository root; CPU only; no network access):

    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-fixtures.txt \
        && .venv/bin/python scripts/make_text_fixtures.py

The real CLIP BPE vocabulary comes from open-clip-torch 3.3.0 (`open_clip/bpe_simple_vocab_16e6.txt.gz`, MIT),
the file the library embeds (src/text/bpe_simple_vocab_16e6.txt.gz): vocab.json and merges.txt are derived from it
exactly as OpenAI's `simple_tokenizer.py` does (256 byte tokens, the same with `</w>`, 48894 merges, the two
specials = 49408 entries) and written in the format of the Hugging Face hub's CLIP tokenizer folders.

What it writes (tests/fixtures/text/README.md lists every file):

    sd1/text_encoder/       CLIPTextModel, SD 1.x-like (quick_gelu, eos_token_id 49407), keys `text_model.*` as in
                            the hub's SD 1.x folders; weights fp16
    sd1/tokenizer/          vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json (pad = EOS);
                            vocab.json and merges.txt committed as .gz (tests restore the exact bytes)
    sdxl/text_encoder_2/    CLIPTextModelWithProjection, bigG-like (gelu, legacy eos_token_id 2); weights fp16
    sdxl/tokenizer_2/       tokenizer.json + tokenizer_config.json + special_tokens_map.json (pad "!", id 0), as
                            transformers' save_pretrained writes them (tokenizer.json compact, committed as .gz)
    tokens.json             prompts and their ids from transformers' CLIPTokenizer (= CLIPTokenizerFast in 5.x)
                            loaded from each folder, and from the other file set of the same tokenizer
    encoders.safetensors    ids, last_hidden_state, hidden_states[-2], pooled output, text_embeds and the
                            diffusers clip-skip states for a batch of prompts, computed in float32

Deterministic: one thread, seeded generators; two runs give byte-identical files.
"""

import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["MKL_CBWR"] = "COMPATIBLE"
os.environ["ATEN_CPU_CAPABILITY"] = "default"

import torch  # noqa: E402

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
torch.backends.mkldnn.enabled = False

import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPTokenizerFast,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "text"
BPE_GZ = ROOT / "src" / "text" / "bpe_simple_vocab_16e6.txt.gz"
EXPECTED_TRANSFORMERS = "5.23.0"
EXPECTED_TORCH = "2.15.0"

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Tricky prompts for the tokenizers: punctuation, unicode (NFC vs decomposed accents, CJK, emoji, ligature,
# no-break space), > 77 tokens, "!" (SDXL's pad token), empty, extra whitespace, numbers, apostrophes, specials.
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    " ",
    "!",
    "!!",
    "wow! amazing!! (really)!",
    "Hello, World!!! It's a dog's life; isn't it?",
    "  extra   whitespace\tand\nnew\r\nlines  ",
    "numbers 12345 and 3.14159, 1st 2nd 1,000,000",
    "don't won't I'll we've they're she'd I'm O'Neil'S",
    "UPPER lower MiXeD CaSe",
    "caf\u00e9 vs cafe\u0301, na\u00efve r\u00e9sum\u00e9, \u6771\u4eac\u30bf\u30ef\u30fc, \U0001f680\U0001f525, \ufb01ne, a\u00a0b",
    "(masterpiece:1.2), [blurry], {braces}, <lora:x:0.5>, a_b-c/d\\e",
    "<|startoftext|>literal specials<|endoftext|> inside",
    "upper-case special <|EndOfText|> and a!b",
    "a very detailed oil painting of a medieval castle on a hill at sunset, " * 8,
    ", ".join(f"word{i}" for i in range(80)),
]

# Prompts the encoders run on (one batch), chosen to cover empty, short, long (truncated) and "!".
ENCODER_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "wow! amazing!! (really)!",
    "a very detailed oil painting of a medieval castle on a hill at sunset, " * 8,
]

SD1_CONFIG = dict(
    vocab_size=49408,
    # 8 wide: the 49408-token embedding table is most of the file (fp16: 49408 x 8 x 2 B = 0.8 MB).
    hidden_size=8,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=8,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)

# bigG-like: exact GELU, projection, and the legacy eos_token_id 2 of SDXL's text_encoder_2/config.json (pooling
# by argmax of the ids).
SDXL_CONFIG = dict(
    vocab_size=49408,
    hidden_size=8,
    intermediate_size=45,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=20,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


def bytes_to_unicode():
    """OpenAI CLIP's (and GPT-2's) reversible byte -> unicode table, in its order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
    bs += list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab():
    """vocab (token -> id) and merges, as OpenAI's SimpleTokenizer builds them from the gz."""
    lines = gzip.open(BPE_GZ).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    assert len(tokens) == 49408 and len(set(tokens)) == 49408
    return {t: i for i, t in enumerate(tokens)}, merges


def special(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_vocab_folder(path, vocab, merges, pad):
    """A tokenizer folder as the hub's SD 1.x (pad = EOS) / SDXL tokenizer_2 (pad "!") ship it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (path / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    config = {
        "add_prefix_space": False,
        "bos_token": special(BOS),
        "do_lower_case": True,
        "eos_token": special(EOS),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad if pad == "!" else special(pad),
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": special(EOS),
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    stm = {"bos_token": special(BOS), "eos_token": special(EOS), "pad_token": pad if pad == "!" else special(pad),
           "unk_token": special(EOS)}
    for v in stm.values():
        if isinstance(v, dict):
            v.pop("__type")
    (path / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n")


def gz_write(path):
    """Replace `path` by `path.gz`: deterministic gzip (no name, mtime 0, level 9)."""
    data = path.read_bytes()
    with open(str(path) + ".gz", "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                             compresslevel=9) as gz:
        gz.write(data)
    path.unlink()
    with gzip.open(str(path) + ".gz", "rb") as gz:
        assert gz.read() == data, path


def encode_all(tok):
    out = []
    for p in PROMPTS:
        enc = tok(p, padding="max_length", max_length=77, truncation=True)
        ids = enc["input_ids"]
        assert len(ids) == 77, (p, len(ids))
        out.append({"ids": ids, "mask": enc["attention_mask"]})
    return out


def redraw(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight") or "final_layer_norm.weight" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            # The files are fp16 (as users download them): the reference runs on the fp16 values in float32.
            p.copy_(p.half().float())


def save_encoder(model, folder, prefix):
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix; the hub's SD folders have it.
    sd = {(k if k.startswith(prefix) or k.startswith("text_projection") else prefix + k): v for k, v in sd.items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return sorted(sd)


def encoder_reference(model, tok, tag, refs):
    ids = tok(ENCODER_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hs = out.hidden_states
    n = model.config.num_hidden_layers
    assert len(hs) == n + 1
    text_model = model.text_model if hasattr(model, "text_model") else model
    refs[f"{tag}.input_ids"] = ids.to(torch.int64)
    refs[f"{tag}.last_hidden_state"] = out.last_hidden_state
    refs[f"{tag}.penultimate"] = hs[-2]
    if hasattr(out, "text_embeds"):
        refs[f"{tag}.text_embeds"] = out.text_embeds
        # pooled = final-LN state at the EOS position (legacy rule for eos_token_id 2: argmax of the ids).
        pos = ids.argmax(dim=-1)
        refs[f"{tag}.pooled"] = out.last_hidden_state[torch.arange(ids.shape[0]), pos]
    else:
        refs[f"{tag}.pooled"] = out.pooler_output
    # diffusers' StableDiffusionPipeline.encode_prompt with clip_skip = k: final_layer_norm(hidden_states[-(k+1)]);
    # StableDiffusionXLPipeline: hidden_states[-(k+2)] without the final norm.
    for k in range(1, n):
        with torch.no_grad():
            refs[f"{tag}.clip_skip{k}.sd"] = text_model.final_layer_norm(hs[-(k + 1)])
        refs[f"{tag}.clip_skip{k}.sdxl"] = hs[-(k + 2)]
    for k, v in list(refs.items()):
        refs[k] = v.contiguous()


def main():
    if transformers.__version__ != EXPECTED_TRANSFORMERS or not torch.__version__.startswith(EXPECTED_TORCH):
        sys.exit(f"need transformers {EXPECTED_TRANSFORMERS} and torch {EXPECTED_TORCH}, have "
                 f"{transformers.__version__} / {torch.__version__}")
    assert CLIPTokenizerFast is CLIPTokenizer or issubclass(CLIPTokenizerFast, CLIPTokenizer)
    for old in ("sd1", "sdxl"):
        shutil.rmtree(OUT / old, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab()

    # Tokenizers: SD 1.x style from vocab.json + merges.txt; SDXL tokenizer_2 style as tokenizer.json, written by
    # transformers' save_pretrained from the vocab folder (the way diffusers pipelines save it).
    sd1_tok_dir = OUT / "sd1" / "tokenizer"
    write_vocab_folder(sd1_tok_dir, vocab, merges, EOS)
    tokens = {"prompts": PROMPTS, "encoder_prompts": ENCODER_PROMPTS, "tokenizers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sdxl_vocab_dir = tmp / "sdxl_vocab"
        write_vocab_folder(sdxl_vocab_dir, vocab, merges, "!")
        sd1 = CLIPTokenizer.from_pretrained(sd1_tok_dir)
        sdxl = CLIPTokenizer.from_pretrained(sdxl_vocab_dir)
        assert sd1.pad_token_id == 49407 and sdxl.pad_token_id == 0, (sd1.pad_token_id, sdxl.pad_token_id)
        sdxl_dir = OUT / "sdxl" / "tokenizer_2"
        sdxl.save_pretrained(sdxl_dir)
        for f in ("vocab.json", "merges.txt"):
            (sdxl_dir / f).unlink(missing_ok=True)
        # The same JSON without indentation (3.6 MB -> 1.7 MB); the tokenizer read back from it is checked below.
        tj = sdxl_dir / "tokenizer.json"
        tj.write_text(json.dumps(json.loads(tj.read_text(encoding="utf-8")), ensure_ascii=False,
                                 separators=(",", ":")) + "\n", encoding="utf-8")
        sd1_json_dir = tmp / "sd1_json"
        sd1.save_pretrained(sd1_json_dir)
        tokens["tokenizers"]["sd1.vocab_merges"] = encode_all(sd1)
        tokens["tokenizers"]["sd1.tokenizer_json"] = encode_all(CLIPTokenizerFast.from_pretrained(sd1_json_dir))
        tokens["tokenizers"]["sdxl.vocab_merges"] = encode_all(sdxl)
        sdxl_json = CLIPTokenizerFast.from_pretrained(sdxl_dir)
        tokens["tokenizers"]["sdxl.tokenizer_json"] = encode_all(sdxl_json)
    for name in ("sd1.tokenizer_json",):
        assert tokens["tokenizers"][name] == tokens["tokenizers"]["sd1.vocab_merges"], name
    assert tokens["tokenizers"]["sdxl.tokenizer_json"] == tokens["tokenizers"]["sdxl.vocab_merges"]
    (OUT / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    # Encoders.
    refs = {}
    torch.manual_seed(0)
    te1 = CLIPTextModel(CLIPTextConfig(**SD1_CONFIG)).eval()
    redraw(te1, 1)
    save_encoder(te1, OUT / "sd1" / "text_encoder", "text_model.")
    encoder_reference(te1, sd1, "sd1", refs)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_CONFIG)).eval()
    redraw(te2, 2)
    save_encoder(te2, OUT / "sdxl" / "text_encoder_2", "text_model.")
    encoder_reference(te2, sdxl_json, "sdxl", refs)
    save_file(refs, str(OUT / "encoders.safetensors"), metadata={"transformers": transformers.__version__})
    # The BPE tables are committed gzip-compressed (3.2 MB -> 1.1 MB): tests/text_encoders.rs restores the exact
    # bytes written above into a scratch copy of this folder before reading it.
    for f in (sd1_tok_dir / "vocab.json", sd1_tok_dir / "merges.txt", OUT / "sdxl" / "tokenizer_2" / "tokenizer.json"):
        gz_write(f)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
