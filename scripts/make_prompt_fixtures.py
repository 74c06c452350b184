#!/usr/bin/env python3
"""Build the prompt -> image fixtures of lowvram (tests/fixtures/prompt/) with diffusers' pipelines.

How to run (from the repository root; CPU only; no network access):

    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements-fixtures.txt \
        && .venv/bin/python scripts/make_prompt_fixtures.py [--sd1-model DIR] [--sdxl-model DIR]

--sd1-model: the untrained tiny SD 1.x pipeline folder (unet/, vae/, scheduler/) of scripts/make_fixtures.py;
default tests/fixtures/tiny-sd-random, else tests/fixtures/tiny-sd/model. --sdxl-model: default tests/fixtures/tiny-sdxl/model.
The folders used are written into tests/fixtures/prompt/prompts.json and README.md.

What it writes (tests/fixtures/prompt/README.md lists every file and tensor):

    {sd1,sdxl}/tokenizer*/  a SMALL CLIP BPE vocabulary in CLIPTokenizer's format (vocab.json + merges.txt +
                            tokenizer_config.json + special_tokens_map.json): the 256 byte tokens, the same with
                            `</w>`, merges that make a few dozen common words single tokens, <|startoftext|> and
                            <|endoftext|>; sdxl/tokenizer_2 pads with "!" as SDXL ships it
    sd1/text_encoder/       CLIPTextModel, hidden 32 (= the tiny SD UNet's cross_attention_dim), 2 layers
    sdxl/text_encoder/      CLIPTextModel, hidden 24; sdxl/text_encoder_2/: CLIPTextModelWithProjection, hidden 40,
                            projection 32 (= the tiny SDXL UNet's pooled width); 24 + 40 = 64 = its cross_attention_dim
    tokens.json             the prompts' ids from CLIPTokenizer (= CLIPTokenizerFast, and the tokenizer.json it saves)
    {sd1,sdxl}/*.safetensors  diffusers' encode_prompt outputs and pipeline(prompt=...) latents and decoded images

Deterministic: one thread, seeded generators; two runs give byte-identical files.
"""

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import fixture_env  # noqa: E402,F401  (deterministic single-threaded CPU torch; before torch)

import torch  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPTokenizerFast,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "prompt"
EXPECTED_TORCH = "2.15.0"
EXPECTED_DIFFUSERS = "0.42.1"
EXPECTED_TRANSFORMERS = "5.23.0"

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NUM_STEPS = 8
SD1_GUIDANCE = 7.5
SDXL_GUIDANCE = 5.0
SD1_LATENT_HW = (8, 8)
SDXL_LATENT_HW = (8, 12)  # as tests/fixtures/tiny-sdxl: non-square, so an H/W swap in the time ids shows

# Words the small vocabulary holds as single tokens (checked below); everything else falls back to byte tokens.
WORDS = """a an the of on in with and at by photo photograph painting portrait cat dog horse astronaut riding
castle hill sunset red blue green bright dark detailed oil best quality low blurry ugly watermark medieval old
city night sky forest river""".split()

SD1_PROMPT = "a photo of an astronaut riding a horse on the hill, best quality!"
SD1_NEGATIVE = "blurry, low quality, watermark"
SDXL_PROMPT = "a detailed oil painting of a red castle at sunset"
SDXL_NEGATIVE = "ugly, blurry"

# Tokenizer prompts: known words, unknown words (byte fallback), punctuation, unicode, "!" (SDXL's pad), empty, > 77.
TOKEN_PROMPTS = [
    SD1_PROMPT,
    SD1_NEGATIVE,
    SDXL_PROMPT,
    SDXL_NEGATIVE,
    "",
    "!",
    "wow!! (Best) quality, isn't it?",
    "caf\u00e9 na\u00efve \u6771\u4eac \U0001f680 a\u00a0cat",
    "a red cat " * 30,
]


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


def bpe(word, ranks):
    """CLIP's BPE of one word (OpenAI's simple_tokenizer.py): merge the lowest-ranked adjacent pair until none."""
    syms = list(word[:-1]) + [word[-1] + "</w>"]
    while len(syms) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(syms, syms[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        syms[i : i + 2] = [syms[i] + syms[i + 1]]
    return syms


def small_vocab(words):
    """The words whose merge chains do not disturb each other (longest first; a word another word's merges split
    is dropped), and their vocabulary."""
    words = sorted(words, key=lambda w: (-len(w), w))
    while True:
        vocab, merges = chain_vocab(words)
        ranks = {m: i for i, m in enumerate(merges)}
        broken = [w for w in words if bpe(w, ranks) != [w + "</w>"]]
        if not broken:
            return words, vocab, merges
        words = [w for w in words if w != broken[-1]]


def chain_vocab(words):
    """vocab (token -> id) and merges: byte tokens, byte tokens + `</w>`, each word's left-to-right merge chain
    (shared prefixes merged once), the two specials last (so EOS is the largest id, as in the real vocabulary)."""
    merges, seen = [], set()
    for w in words:
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        cur = syms[0]
        for s in syms[1:]:
            if (cur, s) not in seen:
                seen.add((cur, s))
                merges.append((cur, s))
            cur = cur + s
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += [BOS, EOS]
    assert len(set(tokens)) == len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def special(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_tokenizer(path, vocab, merges, pad):
    """A tokenizer folder as the hub's SD 1.x `tokenizer` (pad = EOS) / SDXL `tokenizer_2` (pad "!") ship it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    pad_entry = pad if pad == "!" else special(pad)
    config = {
        "add_prefix_space": False,
        "bos_token": special(BOS),
        "do_lower_case": True,
        "eos_token": special(EOS),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_entry,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": special(EOS),
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    stm = {"bos_token": special(BOS), "eos_token": special(EOS), "pad_token": copy.deepcopy(pad_entry),
           "unk_token": special(EOS)}
    for v in stm.values():
        if isinstance(v, dict):
            v.pop("__type")
    (path / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n")


def ids_of(tok, prompts):
    return [tok(p, padding="max_length", max_length=77, truncation=True)["input_ids"] for p in prompts]


def check_tokenizer(path, vocab, words):
    """CLIPTokenizer, CLIPTokenizerFast and the tokenizer.json CLIPTokenizer saves give identical ids; every WORD is
    one token. Returns the tokenizer and the prompts' ids."""
    slow = CLIPTokenizer.from_pretrained(path)
    fast = CLIPTokenizerFast.from_pretrained(path)
    ids = ids_of(slow, TOKEN_PROMPTS)
    assert ids == ids_of(fast, TOKEN_PROMPTS), path
    with tempfile.TemporaryDirectory() as tmp:
        slow.save_pretrained(tmp)
        for f in ("vocab.json", "merges.txt"):
            (Path(tmp) / f).unlink(missing_ok=True)
        assert ids == ids_of(CLIPTokenizerFast.from_pretrained(tmp), TOKEN_PROMPTS), f"{path}: tokenizer.json"
    for w in words:
        got = slow(w)["input_ids"]
        assert got == [vocab[BOS], vocab[w + "</w>"], vocab[EOS]], (w, got)
    assert all(len(x) == 77 for x in ids)
    return slow, ids


def redraw(model, seed):
    """LayerNorm weights U[0.5, 1.5], biases N(0, 0.1²), embeddings N(0, 0.5²), linear weights N(0, 1/fan_in);
    rounded to fp16 (the files are fp16, as users download them; the references run on those values in f32)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "layer_norm" in name and name.endswith(".weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            p.copy_(p.half().float())


def save_encoder(model, folder):
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    # transformers 5 saves the keys without the `text_model.` prefix; the hub's SD folders have it.
    sd = {(k if k.startswith("text_model.") or k.startswith("text_projection") else "text_model." + k): v
          for k, v in sd.items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


# The MLPs are wide so that each encoder's weights (f32 on the device) exceed the largest block of its pipeline's
# UNet: one cap then streams every model, encoders included (tests/prompt.rs).
def encoder(cls, vocab, seed, **kw):
    config = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, layer_norm_eps=1e-5,
                            bos_token_id=vocab[BOS], pad_token_id=1, **kw)
    torch.manual_seed(seed)
    model = cls(config).eval()
    redraw(model, seed)
    return model


def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(shape, seed):
    return torch.randn(shape, generator=gen(seed), dtype=torch.float32)


def save_tensors(path, tensors):
    out = {}
    for k, v in tensors.items():
        v = v.detach().to(torch.float32).contiguous().clone()
        if not torch.isfinite(v).all():
            raise SystemExit(f"{path.name}:{k}: non-finite values")
        out[k] = v
    meta = (f"scripts/make_prompt_fixtures.py; torch {torch.__version__.split('+')[0]}; diffusers "
            f"{diffusers.__version__}; transformers {transformers.__version__}")
    save_file(out, str(path), metadata={"generated_by": meta})
    print(f"  wrote {path.relative_to(ROOT)}")
    for k, v in out.items():
        print(f"    {k:34s} {str(list(v.shape)):16s} max|x| {v.abs().max().item():.4f}")


SAMPLERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
}


class Recorder:
    """Wraps the UNet's forward and records what the pipeline passes it on the first call (uncond half first)."""

    def __init__(self, unet):
        self.unet, self.first, self.calls, self.original = unet, None, 0, unet.forward

    def __enter__(self):
        def fwd(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
            if self.first is None:
                self.first = {"encoder_hidden_states": encoder_hidden_states.clone()}
                for k, v in (added_cond_kwargs or {}).items():
                    self.first[k] = v.clone()
            self.calls += 1
            return self.original(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs,
                                 **kwargs)

        self.unet.forward = fwd
        return self

    def __exit__(self, *exc):
        self.unet.forward = self.original
        return False


def run(pipe, sampler, init_noise, hw, **kw):
    """pipe(prompt=..., latents=init_noise, 8 steps, output_type="latent"), then the VAE decode of the result (as
    scripts/make_fixtures.py: latents / scaling_factor through vae.decode)."""
    base = pipe.scheduler
    cls, overrides = SAMPLERS[sampler]
    pipe.scheduler = cls.from_config(base.config, **overrides)
    h, w = hw[0] * pipe.vae_scale_factor, hw[1] * pipe.vae_scale_factor
    with Recorder(pipe.unet) as rec, torch.no_grad():
        latents = pipe(latents=init_noise.clone(), height=h, width=w, num_inference_steps=NUM_STEPS,
                       output_type="latent", **kw).images
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    assert rec.calls == NUM_STEPS, rec.calls
    pipe.scheduler = base
    return latents, image, rec.first


def sd1(model_dir, words, vocab, merges, tokens):
    out = OUT / "sd1"
    write_tokenizer(out / "tokenizer", vocab, merges, EOS)
    tok, tokens["sd1.tokenizer"] = check_tokenizer(out / "tokenizer", vocab, words)
    assert tok.pad_token_id == vocab[EOS]
    te = encoder(CLIPTextModel, vocab, 11, hidden_size=32, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, hidden_act="quick_gelu", projection_dim=32, eos_token_id=vocab[EOS])
    save_encoder(te, out / "text_encoder")
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), text_encoder=te, tokenizer=tok, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False,
                                                   dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.cross_attention_dim == 32
    refs = {}
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(SD1_PROMPT, "cpu", 1, True, SD1_NEGATIVE)
        refs["prompt_embeds"], refs["negative_prompt_embeds"] = cond, uncond
        # clip_skip = 1 as StableDiffusionPipeline.encode_prompt computes it: final_layer_norm(hidden_states[-2]).
        # (diffusers 0.42.1 reaches the norm through `text_encoder.text_model`, which transformers 5.23's
        # CLIPTextModel no longer has, so the same formula is applied here to the same states.)
        for text, key in ((SD1_PROMPT, "prompt_embeds"), (SD1_NEGATIVE, "negative_prompt_embeds")):
            ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            hs = te(ids, output_hidden_states=True).hidden_states
            norm = te.text_model.final_layer_norm if hasattr(te, "text_model") else te.final_layer_norm
            refs["clip_skip1." + key] = norm(hs[-2])
        # An empty negative prompt is the encoding of "" in SD 1.x.
        _, refs["empty_negative_prompt_embeds"] = pipe.encode_prompt(SD1_PROMPT, "cpu", 1, True, None)
    save_tensors(out / "encode.safetensors", refs)
    init_noise = randn((1, 4) + SD1_LATENT_HW, 5100)
    for sampler in SAMPLERS:
        latents, image, seen = run(pipe, sampler, init_noise, SD1_LATENT_HW, prompt=SD1_PROMPT,
                                   negative_prompt=SD1_NEGATIVE, guidance_scale=SD1_GUIDANCE)
        assert torch.equal(seen["encoder_hidden_states"],
                           torch.cat([refs["negative_prompt_embeds"], refs["prompt_embeds"]])), "embeddings order"
        save_tensors(out / f"sample_{sampler}.safetensors",
                     {"sampling.init_noise": init_noise, "latents": latents, "image": image})


def sdxl(model_dir, words, vocab, merges, tokens):
    out = OUT / "sdxl"
    write_tokenizer(out / "tokenizer", vocab, merges, EOS)
    write_tokenizer(out / "tokenizer_2", vocab, merges, "!")
    tok1, tokens["sdxl.tokenizer"] = check_tokenizer(out / "tokenizer", vocab, words)
    tok2, tokens["sdxl.tokenizer_2"] = check_tokenizer(out / "tokenizer_2", vocab, words)
    assert tok2.pad_token_id == vocab["!"] == 0
    # SDXL's text encoders both carry the legacy eos_token_id 2 (pooling at the argmax id: EOS is the largest).
    # MLPs 4x the width, as CLIP's (the files stay at 0.1 and 0.2 MB).
    te1 = encoder(CLIPTextModel, vocab, 21, hidden_size=24, intermediate_size=96, num_hidden_layers=5,
                  num_attention_heads=2, hidden_act="quick_gelu", projection_dim=24, eos_token_id=2)
    te2 = encoder(CLIPTextModelWithProjection, vocab, 22, hidden_size=40, intermediate_size=160, num_hidden_layers=4,
                  num_attention_heads=4, hidden_act="gelu", projection_dim=32, eos_token_id=2)
    save_encoder(te1, out / "text_encoder")
    save_encoder(te2, out / "text_encoder_2")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), text_encoder=te1, text_encoder_2=te2,
                                                     tokenizer=tok1, tokenizer_2=tok2, add_watermarker=False,
                                                     dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.cross_attention_dim == 24 + 40 and pipe.config.force_zeros_for_empty_prompt
    refs = {}
    with torch.no_grad():
        for neg, tag in ((None, "none."), (SDXL_NEGATIVE, "neg."), ("", "empty.")):
            r = pipe.encode_prompt(SDXL_PROMPT, device="cpu", num_images_per_prompt=1,
                                   do_classifier_free_guidance=True, negative_prompt=neg)
            for k, v in zip(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                             "negative_pooled_prompt_embeds"), r):
                refs[tag + k] = v
        cond, _, pooled, _ = pipe.encode_prompt(SDXL_PROMPT, device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=True, clip_skip=1)
        refs["clip_skip1.prompt_embeds"], refs["clip_skip1.pooled_prompt_embeds"] = cond, pooled
    assert refs["none.negative_prompt_embeds"].abs().max() == 0
    save_tensors(out / "encode.safetensors", refs)
    init_noise = randn((1, 4) + SDXL_LATENT_HW, 5200)
    for neg, tag in ((None, "none"), (SDXL_NEGATIVE, "neg")):
        for sampler in SAMPLERS:
            latents, image, seen = run(pipe, sampler, init_noise, SDXL_LATENT_HW, prompt=SDXL_PROMPT,
                                       negative_prompt=neg, guidance_scale=SDXL_GUIDANCE)
            assert torch.equal(seen["encoder_hidden_states"],
                               torch.cat([refs[f"{tag}.negative_prompt_embeds"], refs[f"{tag}.prompt_embeds"]]))
            save_tensors(out / f"sample_{tag}_{sampler}.safetensors", {
                "sampling.init_noise": init_noise,
                "time_ids": seen["time_ids"][1:],
                "debug.unet_text_embeds": seen["text_embeds"],
                "latents": latents,
                "image": image,
            })


def main():
    ap = argparse.ArgumentParser()
    default_sd1 = ROOT / "tests" / "fixtures" / "tiny-sd-random"
    if not default_sd1.exists():
        default_sd1 = ROOT / "tests" / "fixtures" / "tiny-sd" / "model"
    ap.add_argument("--sd1-model", type=Path, default=default_sd1)
    ap.add_argument("--sdxl-model", type=Path, default=ROOT / "tests" / "fixtures" / "tiny-sdxl" / "model")
    args = ap.parse_args()
    tv = torch.__version__.split("+")[0]
    if (tv, diffusers.__version__, transformers.__version__) != (EXPECTED_TORCH, EXPECTED_DIFFUSERS,
                                                                 EXPECTED_TRANSFORMERS):
        sys.exit(f"need torch {EXPECTED_TORCH}, diffusers {EXPECTED_DIFFUSERS}, transformers {EXPECTED_TRANSFORMERS}; "
                 f"have {tv}, {diffusers.__version__}, {transformers.__version__}")
    for sub in ("sd1", "sdxl"):
        shutil.rmtree(OUT / sub, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    words, vocab, merges = small_vocab(WORDS)
    dropped = sorted(set(WORDS) - set(words))
    print(f"vocabulary: {len(vocab)} entries, {len(merges)} merges, {len(words)} words ({dropped} split by others)")
    tokens = {}
    sd1(args.sd1_model.resolve(), words, vocab, merges, tokens)
    sdxl(args.sdxl_model.resolve(), words, vocab, merges, tokens)
    rel = lambda p: str(p.resolve().relative_to(ROOT))  # noqa: E731
    meta = {
        "sd1_model": rel(args.sd1_model),
        "sdxl_model": rel(args.sdxl_model),
        "steps": NUM_STEPS,
        "sd1": {"prompt": SD1_PROMPT, "negative_prompt": SD1_NEGATIVE, "guidance": SD1_GUIDANCE,
                "latent_hw": SD1_LATENT_HW},
        "sdxl": {"prompt": SDXL_PROMPT, "negative_prompt": SDXL_NEGATIVE, "guidance": SDXL_GUIDANCE,
                 "latent_hw": SDXL_LATENT_HW},
        "words": words,
        "token_prompts": TOKEN_PROMPTS,
        "tokens": tokens,
    }
    (OUT / "prompts.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT.relative_to(ROOT)} ({total / 1e6:.2f} MB) from {meta['sd1_model']} and {meta['sdxl_model']}")


if __name__ == "__main__":
    main()
