#!/usr/bin/env python3
"""Judge pictures drawn by the trained tiny model (scripts/train_tiny.py) from held-out prompts.

A picture is measured, not compared: the background colour is the median of the border pixels; the shape is every
pixel far from that colour; the shape's colour is the median of those pixels; its position is the centroid of that
mask (nearest of the five positions); its form is the fill ratio of the mask's bounding box (circle ~0.785, square
~1, triangle ~0.5). Colours are named by the nearest colour of the training palette. tests/trained_model.rs applies
the same rules through lowvram's public API.

Run (accuracy over seeded generations of held-out prompts through diffusers' StableDiffusionPipeline):
    /work/venv/bin/python scripts/judge.py --model models/tiny-sd --seeds 5
Does the model listen to each word? (one UNet call at t = 900 on the same noise per word swap):
    /work/venv/bin/python scripts/judge.py --model models/tiny-sd --probe
Write the Rust test's fixture (the prompts and their expected properties):
    /work/venv/bin/python scripts/judge.py --model models/tiny-sd --write-fixture tests/fixtures/tiny-sd-trained
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny import COLOURS, HELD_OUT, POSITIONS, caption  # noqa: E402

FORMS = {"circle": 0.785, "square": 1.0, "triangle": 0.5}
POS_ORDER = [None, "left", "right", "top", "bottom"]


def nearest_colour(rgb):
    return min(COLOURS, key=lambda n: float(np.sum((np.array(COLOURS[n], np.float32) - rgb) ** 2)))


def measure(img):
    """img: HxWx3 uint8 -> dict(bg, colour, shape, pos, fill) (None values when no shape is found)."""
    img = img.astype(np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    dist = np.sqrt(np.sum((img - bg_rgb) ** 2, axis=2))
    mask = dist > 80.0
    out = {"bg": nearest_colour(bg_rgb), "colour": None, "shape": None, "pos": None, "fill": 0.0}
    if mask.sum() < 40:
        return out
    out["colour"] = nearest_colour(np.median(img[mask], axis=0))
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    out["pos"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    rows = np.nonzero(mask.sum(axis=1) >= 2)[0]
    cols = np.nonzero(mask.sum(axis=0) >= 2)[0]
    if len(rows) and len(cols):
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        out["fill"] = float(mask.sum() / box)
        out["shape"] = min(FORMS, key=lambda f: abs(FORMS[f] - out["fill"]))
    return out


def held_out_prompts(seeds):
    """(prompt, expected, seed) for every held-out triple x seed; the position cycles through none/left/right/..."""
    cases = []
    for s in range(seeds):
        for i, (c, shape, bg) in enumerate(HELD_OUT):
            pos = POS_ORDER[(i + s) % len(POS_ORDER)]
            expected = {"colour": c, "shape": shape, "bg": bg, "pos": pos or "center"}
            cases.append((caption(c, shape, bg, pos), expected, s))
    return cases


def score(measured, expected):
    return {
        "colour": measured["colour"] == expected["colour"] and measured["bg"] == expected["bg"],
        "shape": measured["shape"] == expected["shape"],
        "position": measured["pos"] == expected["pos"],
    }


@torch.no_grad()
def probe(pipe):
    """How much the text states of the padding and the UNet's output change when one word of a prompt changes.

    Padding is 65 of the 77 states, and what an untrained cross-attention mostly sees; a word that changes neither
    cannot steer the picture."""
    base = "a red circle on a blue background at the left"
    swaps = {"position": "at the left", "shape": "circle", "shape colour": "red", "background": "blue"}
    other = {"at the left": "at the right", "circle": "square", "red": "green", "blue": "yellow"}
    prompts = [base] + [base.replace(w, other[w], 1) for w in swaps.values()]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    states = pipe.text_encoder(ids).last_hidden_state
    noise = torch.randn(1, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size, generator=torch.Generator().manual_seed(0))
    t = torch.full((len(prompts),), 900)
    out = pipe.unet(noise.expand(len(prompts), -1, -1, -1), t, encoder_hidden_states=states).sample
    for i, what in enumerate(swaps, start=1):
        pad = (states[i, -1] - states[0, -1]).norm().item()
        rel = ((out[i] - out[0]).norm() / out[0].norm()).item()
        print(f"{what:13} {prompts[0]!r} -> {prompts[i]!r}: padding state moves {pad:5.2f}, UNet output {100 * rel:5.1f} %")


def to_uint8(images):
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8, as diffusers' postprocess does."""
    x = ((images.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/tiny-sd")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per held-out triple (10 triples)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.0, help="CFG scale (the CLI's default for the built-in model)")
    ap.add_argument("--save", help="folder for the generated PNGs")
    ap.add_argument(
        "--ablate", action="store_true", help="draw every case from the empty prompt (is the UNet conditioned at all?)"
    )
    ap.add_argument("--write-fixture", help="write prompts.json for tests/trained_model.rs")
    ap.add_argument("--probe", action="store_true", help="print how much each kind of word changes the UNet's output")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cases = held_out_prompts(args.seeds)
    if args.probe:
        probe(pipe)
        return

    if args.write_fixture:
        os.makedirs(args.write_fixture, exist_ok=True)
        meta = {
            "generated_by": "scripts/judge.py --write-fixture",
            "colours": COLOURS,
            "positions": POSITIONS,
            "forms": FORMS,
            "cases": [{"prompt": p, "seed": s, **e} for p, e, s in cases],
        }
        with open(os.path.join(args.write_fixture, "prompts.json"), "w") as f:
            json.dump(meta, f, indent=1)
        print(f"wrote {len(cases)} cases to {args.write_fixture}")
        return

    t0 = time.time()
    images = []
    for i in range(0, len(cases), 25):
        chunk = cases[i : i + 25]
        gens = [torch.Generator().manual_seed(1000 * s + j) for j, (_, _, s) in enumerate(chunk, start=i)]
        out = pipe(
            ["" if args.ablate else p for p, _, _ in chunk],
            height=64,
            width=64,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=gens,
            output_type="pt",
        ).images
        images.append(to_uint8(out * 2 - 1))
    images = np.concatenate(images)
    totals = {"colour": 0, "shape": 0, "position": 0, "all": 0}
    for k, ((prompt, expected, seed), img) in enumerate(zip(cases, images)):
        m = measure(img)
        s = score(m, expected)
        for key in ("colour", "shape", "position"):
            totals[key] += s[key]
        totals["all"] += all(s.values())
        flag = "ok " if all(s.values()) else "BAD"
        print(f"{flag} {prompt!r:55} -> {m['colour']} {m['shape']} ({m['fill']:.2f}) on {m['bg']} at {m['pos']}")
        if args.save:
            from PIL import Image

            os.makedirs(args.save, exist_ok=True)
            Image.fromarray(img).save(os.path.join(args.save, f"{k:03d}.png"))
    n = len(cases)
    print(
        f"{n} generations ({len(HELD_OUT)} held-out triples x {args.seeds} seeds, {args.steps} euler steps, "
        f"CFG {args.guidance}{', EMPTY PROMPTS' if args.ablate else ''}, {time.time() - t0:.0f} s): "
        + ", ".join(f"{k} {100 * v / n:.0f} %" for k, v in totals.items())
    )


if __name__ == "__main__":
    main()
