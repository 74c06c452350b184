#!/usr/bin/env python3
"""Write the random-weight FLUX.1 parts the real-size end-to-end run needs besides the GGUF transformer and T5
(scripts/make_flux_gguf.py, scripts/make_t5_gguf.py): the FLUX VAE (diffusers AutoencoderKL with the SD3/FLUX
config: 16 latent channels, scaling 0.3611, shift 0.1159, no quant convs; ~84 M parameters) and CLIP-L
(CLIPTextModel, ViT-L/14 text tower: 768 wide, 12 layers, 49408 tokens; ~123 M parameters) with the real CLIP BPE
tokenizer from tests/fixtures/text/sd1/tokenizer. Nothing is downloaded; weights are seeded random (the figures do not
depend on them).

    /work/venv/bin/python scripts/make_flux_parts.py --out /work/big/flux-parts
    # then: lowvram generate --model FLUX.gguf --vae OUT/vae --text-encoder OUT/text_encoder --text-encoder-2 T5.gguf

Writes OUT/vae/, OUT/text_encoder/, OUT/tokenizer/ (~0.8 GB in f32). A minute on 2 cores.
"""
import argparse
import gzip
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    vae.save_pretrained(args.out / "vae")
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                        hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=1))
    clip.save_pretrained(args.out / "text_encoder")
    tok = args.out / "tokenizer"
    tok.mkdir(parents=True, exist_ok=True)
    src = ROOT / "tests" / "fixtures" / "text" / "sd1" / "tokenizer"
    for f in src.iterdir():
        if f.suffix == ".gz":
            with gzip.open(f, "rb") as i, open(tok / f.stem, "wb") as o:
                shutil.copyfileobj(i, o)
        else:
            shutil.copy(f, tok / f.name)
    n = sum(p.numel() for p in vae.parameters()), sum(p.numel() for p in clip.parameters())
    print(f"wrote {args.out}: VAE {n[0]:,} parameters, CLIP-L {n[1]:,} parameters")


if __name__ == "__main__":
    main()
