#!/usr/bin/env python3
"""Write tiny LDM/SGM single-file checkpoints and check them against diffusers' own single-file loader.

How to run (from the repository root; CPU only; no network access; versions pinned in
scripts/requirements-fixtures.txt):

    .venv/bin/python scripts/make_single_file_fixtures.py

What it writes under tests/fixtures/single-file/ (see README.md there):

    sd1.safetensors   SD 1.x layout: tests/fixtures/tiny-sd-random's UNet and VAE (float32) + a tiny CLIPTextModel under
                      `cond_stage_model.transformer.`, plus the extras real files carry (position_ids, EMA copies,
                      the noise schedule buffers)
    sd1.yaml          its LDM "original config" (num_heads, use_linear_in_transformer, context_dim)
    sd1/text_encoder/ the tiny CLIPTextModel as a diffusers folder (hub layout: `text_model.*` names)
    sd2.safetensors   SD 2.x layout: tests/fixtures/tiny-sd2's UNet and VAE + a tiny OpenCLIP text tower under
                      `cond_stage_model.model.` (fused in_proj, 24 resblocks of which diffusers drops the last,
                      text_projection, logit_scale)
    sd2.yaml, sd2/text_encoder/
    sdxl.safetensors  SGM layout, float16: a tiny SDXL UNet (text_time, label_emb), VAE, CLIP-L under
                      `conditioner.embedders.0.transformer.` and an OpenCLIP bigG-style tower with projection under
                      `conditioner.embedders.1.model.` (text_projection stored transposed)
    sdxl.yaml, sdxl/{unet,vae,text_encoder,text_encoder_2}/  the same components as diffusers folders (float16)
    real-keys/{sd15,sd21,sdxl}.json.gz  names, dtypes and shapes (no data) of real-size single files, from the
                      standard architectures built on the meta device

The single files are written with this script's own diffusers -> LDM mapping (`to_ldm_*` below). The independent
check is diffusers itself: `UNet2DConditionModel.from_single_file` / `AutoencoderKL.from_single_file` with a local
`config=` folder, its `convert_ldm_*` / `convert_open_clip_checkpoint` functions and
`create_diffusers_clip_model_from_ldm` must give back state dicts equal (bit for bit) to the originals, and its
`create_unet_diffusers_config_from_ldm` / `create_vae_diffusers_config_from_ldm` must read the .yaml files back to
the folders' configs. The script stops with an error if any of that fails. Two runs write byte-identical files.
"""

import gzip
import json
import math
import os
import shutil
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

import diffusers  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.loaders import single_file_utils as sfu  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "single-file"
EXPECTED = {"torch": "2.15.0", "diffusers": "0.42.1", "transformers": "5.23.0"}
META = {
    "generated_by": f"scripts/make_single_file_fixtures.py; torch {torch.__version__.split('+')[0]}; "
    f"diffusers {diffusers.__version__}; transformers {transformers.__version__}"
}

# Tiny text encoders. Vocabulary is small on purpose (files stay small); hidden sizes equal the UNets'
# cross_attention_dim (SDXL: 32 + 40 = 72).
SD1_CLIP = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
                bos_token_id=254, eos_token_id=255, pad_token_id=255)
# SD 2.x: OpenCLIP-H has 24 resblocks and diffusers' text_encoder keeps 23 (SD 2 uses the penultimate layer;
# diffusers drops `resblocks.23`, SD_2_TEXT_ENCODER_KEYS_TO_IGNORE). The tiny tower has 24 too, so the rule is
# exercised; the folder's config has 23 layers as stabilityai/stable-diffusion-2-1's has.
SD2_CLIP = dict(SD1_CLIP, hidden_size=40, intermediate_size=16, num_hidden_layers=23, hidden_act="gelu",
                projection_dim=40)
SDXL_CLIP_L = dict(SD1_CLIP, hidden_size=32, intermediate_size=64, num_hidden_layers=2, hidden_act="quick_gelu",
                   projection_dim=32)
SDXL_CLIP_G = dict(SD1_CLIP, hidden_size=40, intermediate_size=80, num_hidden_layers=3, num_attention_heads=5,
                   hidden_act="gelu", projection_dim=24)

SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    # 8/16/16 channels (head dim 4; GroupNorm 8 groups, one channel each in the first block): the UNet is most of
    # the file and of the folder, both kept under 0.6 MB.
    block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=8, cross_attention_dim=72,
    transformer_layers_per_block=[1, 2, 2], attention_head_dim=[2, 4, 4], use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
    latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=0.13025, force_upcast=True,
)


# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json.
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      interpolation_type="linear", prediction_type="epsilon", sample_max_value=1.0,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, timestep_spacing="leading",
                      use_karras_sigmas=False, clip_sample=False, trained_betas=None)


def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def reinit_(model, seed):
    """Every parameter drawn again from a seeded generator (no zero or identity layers: a wrong mapping cannot
    pass by accident); fails if a parameter is missed."""
    g = gen(seed)
    covered = set()
    with torch.no_grad():
        for _, mod in model.named_modules():
            own = list(mod.parameters(recurse=False))
            if not own:
                continue
            if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / math.sqrt(mod.weight[0].numel()))
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            elif isinstance(mod, nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.5)
            else:
                raise SystemExit(f"reinit: unhandled module {type(mod).__name__}")
            covered.update(id(p) for p in own)
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise SystemExit(f"reinit: not re-drawn: {missing}")


# --------------------------------------------------------------------------------------------------------------------
# Our own diffusers -> LDM/SGM mapping (the inverse of what lowvram reads)
# --------------------------------------------------------------------------------------------------------------------

RESNET_TO_LDM = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def resnet_to_ldm(rest):
    head, _, tail = rest.partition(".")
    for d, l in RESNET_TO_LDM:
        if head == d:
            return f"{l}.{tail}"
    raise SystemExit(f"unet resnet: unknown {rest}")


def to_ldm_unet(sd, config):
    L = config["layers_per_block"]
    attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    out = {}
    for name, t in sd.items():
        p = name.split(".")
        mod, leaf = ".".join(p[:-1]), p[-1]
        if mod in fixed:
            ldm = f"{fixed[mod]}.{leaf}"
        elif p[0] == "down_blocks":
            b, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            if kind == "resnets":
                ldm = f"input_blocks.{1 + b * (L + 1) + j}.0.{resnet_to_ldm(rest)}"
            elif kind == "attentions":
                ldm = f"input_blocks.{1 + b * (L + 1) + j}.1.{rest}"
            else:  # downsamplers.0.conv.*
                ldm = f"input_blocks.{1 + b * (L + 1) + L}.0.op.{p[-1]}"
        elif p[0] == "mid_block":
            kind, j, rest = p[1], int(p[2]), ".".join(p[3:])
            ldm = f"middle_block.{2 * j}.{resnet_to_ldm(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif p[0] == "up_blocks":
            b, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            if kind == "resnets":
                ldm = f"output_blocks.{b * (L + 1) + j}.0.{resnet_to_ldm(rest)}"
            elif kind == "attentions":
                ldm = f"output_blocks.{b * (L + 1) + j}.1.{rest}"
            else:  # upsamplers.0.conv.*: after the attention when the block has one
                ldm = f"output_blocks.{b * (L + 1) + L}.{2 if attn[b] else 1}.conv.{p[-1]}"
        else:
            raise SystemExit(f"unet: no LDM name for {name}")
        out["model.diffusion_model." + ldm] = t
    return out


def to_ldm_vae(sd, config, prefix="first_stage_model."):
    n = len(config["up_block_types"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for name, t in sd.items():
        p = name.split(".")
        if len(p) > 3 and p[1] in ("down_blocks", "up_blocks"):
            side, i, kind, rest = p[0], int(p[2]), p[3], p[4:]
            if side == "decoder":
                i = n - 1 - i  # LDM numbers decoder levels from the lowest resolution
            lvl = f"{side}.{'down' if side == 'encoder' else 'up'}.{i}"
            if kind == "resnets":
                ldm = f"{lvl}.block.{rest[0]}.{'.'.join(rest[1:]).replace('conv_shortcut', 'nin_shortcut')}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                ldm = f"{lvl}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{rest[-1]}"
        elif len(p) > 2 and p[1] == "mid_block":
            if p[2] == "resnets":
                ldm = f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:]).replace('conv_shortcut', 'nin_shortcut')}"
            else:  # attentions.0.<module>.<leaf>; the 1x1 convs of LDM are linears in diffusers
                mod = ".".join(p[4:-1])
                ldm = f"{p[0]}.mid.attn_1.{attn[mod]}.{p[-1]}"
                if t.ndim == 2:
                    t = t[:, :, None, None]
        else:
            ldm = name.replace("conv_norm_out", "norm_out")
        out[prefix + ldm] = t
    return out


def to_ldm_clip(sd, prefix):
    """HF CLIPTextModel (hub layout `text_model.*`) -> LDM FrozenCLIPEmbedder: the HF names under a prefix."""
    return {prefix + k: v for k, v in sd.items()}


def to_open_clip(sd, prefix, n_layers, text_projection):
    """HF CLIP names -> OpenCLIP text tower: fused in_proj, resblocks, ln_final, text_projection [hidden, proj]."""
    out = {}
    tm = "text_model."
    out[prefix + "token_embedding.weight"] = sd[tm + "embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = sd[tm + "embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = sd[tm + "final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = sd[tm + "final_layer_norm.bias"]
    for i in range(n_layers):
        h = f"{tm}encoder.layers.{i}."
        r = f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[r + f"attn.in_proj_{leaf}"] = torch.cat(
                [sd[h + f"self_attn.{x}_proj.{leaf}"] for x in ("q", "k", "v")], 0).contiguous()
            out[r + f"attn.out_proj.{leaf}"] = sd[h + f"self_attn.out_proj.{leaf}"]
            out[r + f"ln_1.{leaf}"] = sd[h + f"layer_norm1.{leaf}"]
            out[r + f"ln_2.{leaf}"] = sd[h + f"layer_norm2.{leaf}"]
            out[r + f"mlp.c_fc.{leaf}"] = sd[h + f"mlp.fc1.{leaf}"]
            out[r + f"mlp.c_proj.{leaf}"] = sd[h + f"mlp.fc2.{leaf}"]
    out[prefix + "text_projection"] = text_projection
    out[prefix + "logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=text_projection.dtype)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------

def hub_clip_state_dict(model):
    """transformers >= 5.6 flattens CLIPTextModel (no `text_model.` prefix); the hub's SD folders and lowvram use
    `text_model.*` for both classes."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if not hasattr(model, "text_model"):
        sd = {"text_model." + k: v for k, v in sd.items()}
    return sd


def build_clip(cls, cfg, seed, dtype):
    torch.manual_seed(seed)
    m = cls(CLIPTextConfig(**cfg))
    reinit_(m, seed)
    return m.to(dtype).eval()


def write_clip_folder(folder, model):
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model.config.save_pretrained(str(folder))
    sd = hub_clip_state_dict(model)
    save_file(sd, str(folder / "model.safetensors"), metadata=META)
    return sd


def copy_configs(model, folder):
    """A complete diffusers config folder beside the fixture (configs only: the weights are the single file's), for
    `SingleFile::open_with_config` (diffusers' `config=`)."""
    for sub, name in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model / sub / name, folder / sub / name)


def save_single(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=META)
    print(f"  wrote {path.relative_to(ROOT)}: {len(tensors)} tensors, {path.stat().st_size} bytes")


def write_yaml(path, unet_params, ddconfig, scale_factor, extra=None):
    params = dict(scale_factor=scale_factor, unet_config=dict(params=unet_params),
                  first_stage_config=dict(params=dict(ddconfig=ddconfig)))
    params.update(extra or {})
    path.write_text(yaml.safe_dump(dict(model=dict(params=params)), sort_keys=True))
    print(f"  wrote {path.relative_to(ROOT)}")


def same(name, got, want):
    if set(got) != set(want):
        raise SystemExit(f"{name}: keys differ: missing {sorted(set(want) - set(got))[:5]}, "
                         f"extra {sorted(set(got) - set(want))[:5]}")
    for k, v in want.items():
        g = got[k]
        if g.dtype != v.dtype or g.shape != v.shape or not torch.equal(g, v):
            raise SystemExit(f"{name}: {k} differs ({g.dtype} {tuple(g.shape)} vs {v.dtype} {tuple(v.shape)})")
    print(f"  ok {name}: {len(want)} tensors equal")


def ddconfig_of(vae_cfg):
    ch = vae_cfg["block_out_channels"][0]
    return dict(double_z=True, z_channels=vae_cfg["latent_channels"], resolution=256, in_channels=3, out_ch=3, ch=ch,
                ch_mult=[c // ch for c in vae_cfg["block_out_channels"]], num_res_blocks=vae_cfg["layers_per_block"],
                attn_resolutions=[], dropout=0.0)


def check_configs(name, yaml_path, ckpt, unet_cfg, vae_cfg):
    """diffusers' own readers of an LDM original config must give the folders' configs back."""
    orig = yaml.safe_load(yaml_path.read_text())
    u = sfu.create_unet_diffusers_config_from_ldm(orig, ckpt, image_size=unet_cfg["sample_size"] * 8)
    for k, v in u.items():
        want = unet_cfg.get(k)
        if k == "transformer_layers_per_block" and isinstance(want, int):
            want = [want] * len(unet_cfg["block_out_channels"]) if isinstance(v, list) else want
        if isinstance(want, tuple):
            want = list(want)
        if v != want:
            raise SystemExit(f"{name}: yaml unet config {k} = {v}, folder has {want}")
    v = sfu.create_vae_diffusers_config_from_ldm(orig, ckpt, image_size=vae_cfg["sample_size"])
    for k, x in v.items():
        want = vae_cfg.get(k)
        if isinstance(want, tuple):
            want = list(want)
        if x != want:
            raise SystemExit(f"{name}: yaml vae config {k} = {x}, folder has {want}")
    print(f"  ok {name}: diffusers reads {yaml_path.name} back to the folder configs")


def check_unet_vae(name, path, folder_unet, folder_vae, unet_sd, vae_sd, unet_cfg, vae_cfg):
    ckpt = load_file(str(path))
    same(f"{name} convert_ldm_unet_checkpoint", sfu.convert_ldm_unet_checkpoint(ckpt, unet_cfg), unet_sd)
    same(f"{name} convert_ldm_vae_checkpoint", sfu.convert_ldm_vae_checkpoint(ckpt, vae_cfg), vae_sd)
    dtype = next(iter(unet_sd.values())).dtype
    u = UNet2DConditionModel.from_single_file(str(path), config=str(folder_unet.parent), subfolder=folder_unet.name,
                                              local_files_only=True, torch_dtype=dtype)
    same(f"{name} UNet2DConditionModel.from_single_file", u.state_dict(), unet_sd)
    v = AutoencoderKL.from_single_file(str(path), config=str(folder_vae.parent), subfolder=folder_vae.name,
                                       local_files_only=True, torch_dtype=dtype)
    same(f"{name} AutoencoderKL.from_single_file", v.state_dict(), vae_sd)
    return ckpt


def check_clip(name, ckpt, cls, folder, want):
    m = sfu.create_diffusers_clip_model_from_ldm(cls, ckpt, subfolder=folder.name, config=str(folder.parent),
                                                 local_files_only=True,
                                                 torch_dtype=next(iter(want.values())).dtype)
    same(f"{name} create_diffusers_clip_model_from_ldm({cls.__name__})", hub_clip_state_dict(m), want)


def folder_state(path):
    return load_file(str(path))


def noise_schedule():
    """The LatentDiffusion buffers real SD files carry (skipped by every loader)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    return {"betas": betas.float(), "alphas_cumprod": ac.float(), "sqrt_alphas_cumprod": ac.sqrt().float()}


# --------------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------------

def sd1():
    print("sd1")
    model = ROOT / "tests" / "fixtures" / "tiny-sd-random"
    unet_cfg = json.loads((model / "unet" / "config.json").read_text())
    vae_cfg = json.loads((model / "vae" / "config.json").read_text())
    unet_sd = folder_state(model / "unet" / "diffusion_pytorch_model.safetensors")
    vae_sd = folder_state(model / "vae" / "diffusion_pytorch_model.safetensors")
    te = build_clip(CLIPTextModel, SD1_CLIP, 101, torch.float32)
    te_sd = write_clip_folder(OUT / "sd1" / "text_encoder", te)
    copy_configs(model, OUT / "sd1")
    single = {}
    single.update(to_ldm_unet(unet_sd, unet_cfg))
    single.update(to_ldm_vae(vae_sd, vae_cfg))
    single.update(to_ldm_clip(te_sd, "cond_stage_model.transformer."))
    # Extras real SD 1.x files carry: position_ids (int64), two EMA copies, the noise schedule.
    single["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    single["model_ema.decay"] = torch.tensor(0.9999)
    single["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    single["model_ema.diffusion_modelinput_blocks00weight"] = single["model.diffusion_model.input_blocks.0.0.weight"].clone()
    single.update(noise_schedule())
    path = OUT / "sd1.safetensors"
    save_single(path, single)
    write_yaml(OUT / "sd1.yaml",
               dict(in_channels=4, out_channels=4, model_channels=16, attention_resolutions=[1, 2], num_res_blocks=2,
                    channel_mult=[1, 2, 2], num_heads=8, transformer_depth=1, context_dim=32,
                    use_linear_in_transformer=False),
               ddconfig_of(vae_cfg), 0.18215)
    ckpt = check_unet_vae("sd1", path, model / "unet", model / "vae", unet_sd, vae_sd, unet_cfg, vae_cfg)
    check_clip("sd1", ckpt, CLIPTextModel, OUT / "sd1" / "text_encoder", te_sd)
    check_configs("sd1", OUT / "sd1.yaml", ckpt, unet_cfg, vae_cfg)


def sd2():
    print("sd2")
    model = ROOT / "tests" / "fixtures" / "tiny-sd2" / "model"
    unet_cfg = json.loads((model / "unet" / "config.json").read_text())
    vae_cfg = json.loads((model / "vae" / "config.json").read_text())
    unet_sd = folder_state(model / "unet" / "diffusion_pytorch_model.safetensors")
    vae_sd = folder_state(model / "vae" / "diffusion_pytorch_model.safetensors")
    # The OpenCLIP tower: 24 resblocks. The folder's CLIPTextModel is its first 23 (what diffusers keeps).
    full = build_clip(CLIPTextModel, dict(SD2_CLIP, num_hidden_layers=24), 202, torch.float32)
    full_sd = hub_clip_state_dict(full)
    te = build_clip(CLIPTextModel, SD2_CLIP, 202, torch.float32)
    te.load_state_dict({k.removeprefix("text_model."): v for k, v in full_sd.items()
                        if not k.startswith("text_model.encoder.layers.23.")})
    te_sd = write_clip_folder(OUT / "sd2" / "text_encoder", te)
    copy_configs(model, OUT / "sd2")
    proj = torch.randn((40, 40), generator=gen(203)) / math.sqrt(40)
    single = {}
    single.update(to_ldm_unet(unet_sd, unet_cfg))
    single.update(to_ldm_vae(vae_sd, vae_cfg))
    single.update(to_open_clip(full_sd, "cond_stage_model.model.", 24, proj))
    single.update(noise_schedule())
    path = OUT / "sd2.safetensors"
    save_single(path, single)
    write_yaml(OUT / "sd2.yaml",
               dict(in_channels=4, out_channels=4, model_channels=16, attention_resolutions=[1, 2], num_res_blocks=1,
                    channel_mult=[1, 1, 1], num_heads=[2, 4, 8], transformer_depth=1, context_dim=40,
                    use_linear_in_transformer=True),
               ddconfig_of(vae_cfg), 0.18215, extra=dict(parameterization="v"))
    ckpt = check_unet_vae("sd2", path, model / "unet", model / "vae", unet_sd, vae_sd, unet_cfg, vae_cfg)
    check_clip("sd2", ckpt, CLIPTextModel, OUT / "sd2" / "text_encoder", te_sd)
    check_configs("sd2", OUT / "sd2.yaml", ckpt, unet_cfg, vae_cfg)


def sdxl():
    print("sdxl")
    folder = OUT / "sdxl"
    dtype = torch.float16
    torch.manual_seed(301)
    unet = UNet2DConditionModel(**SDXL_UNET)
    reinit_(unet, 301)
    unet = unet.to(dtype).eval()
    torch.manual_seed(302)
    vae = AutoencoderKL(**SDXL_VAE)
    reinit_(vae, 302)
    vae = vae.to(dtype).eval()
    for sub, m in (("unet", unet), ("vae", vae)):
        if (folder / sub).exists():
            shutil.rmtree(folder / sub)
        m.save_pretrained(str(folder / sub), safe_serialization=True)
    EulerDiscreteScheduler.from_config(SDXL_SCHEDULER).save_config(str(folder / "scheduler"))
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    unet_sd = folder_state(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae_sd = folder_state(folder / "vae" / "diffusion_pytorch_model.safetensors")
    te1 = build_clip(CLIPTextModel, SDXL_CLIP_L, 303, dtype)
    te1_sd = write_clip_folder(folder / "text_encoder", te1)
    te2 = build_clip(CLIPTextModelWithProjection, SDXL_CLIP_G, 304, dtype)
    te2_sd = write_clip_folder(folder / "text_encoder_2", te2)
    single = {}
    single.update(to_ldm_unet(unet_sd, unet_cfg))
    single.update(to_ldm_vae(vae_sd, vae_cfg))
    single.update(to_ldm_clip(te1_sd, "conditioner.embedders.0.transformer."))
    single.update(to_open_clip(te2_sd, "conditioner.embedders.1.model.", SDXL_CLIP_G["num_hidden_layers"],
                               te2_sd["text_projection.weight"].t().contiguous()))
    path = OUT / "sdxl.safetensors"
    save_single(path, single)
    write_yaml(OUT / "sdxl.yaml",
               dict(in_channels=4, out_channels=4, model_channels=8, attention_resolutions=[2, 4], num_res_blocks=2,
                    channel_mult=[1, 2, 2], num_head_channels=4, transformer_depth=[1, 2, 2], context_dim=72,
                    use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=72),
               ddconfig_of(vae_cfg), 0.13025)
    ckpt = check_unet_vae("sdxl", path, folder / "unet", folder / "vae", unet_sd, vae_sd, unet_cfg, vae_cfg)
    check_clip("sdxl", ckpt, CLIPTextModel, folder / "text_encoder", te1_sd)
    check_clip("sdxl", ckpt, CLIPTextModelWithProjection, folder / "text_encoder_2", te2_sd)
    # diffusers derives addition_time_embed_dim 256 from a 1280/2048 context only; our tiny context is 72.
    check_configs("sdxl", OUT / "sdxl.yaml", ckpt, dict(unet_cfg, addition_embed_type=None,
                                                         addition_time_embed_dim=None, class_embed_type="projection"),
                  vae_cfg)


# --------------------------------------------------------------------------------------------------------------------
# Real-size key lists (no weights): the standard SD 1.5 / SD 2.1 / SDXL-base architectures built on the meta device
# --------------------------------------------------------------------------------------------------------------------

# The standard diffusers configs (stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
# stabilityai/stable-diffusion-xl-base-1.0), the keys that shape the weights.
STD_UNET = {
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, sample_size=64),
    "sd21": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                 attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, upcast_attention=True,
                 sample_size=96),
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], use_linear_projection=True, transformer_layers_per_block=[1, 2, 10],
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, sample_size=128),
}
STD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              hidden_act="quick_gelu", projection_dim=768, max_position_embeddings=77)
OPEN_CLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                   hidden_act="gelu", projection_dim=512)
OPEN_CLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                      hidden_act="gelu", projection_dim=1280)


def meta_state(model):
    return {k: v for k, v in model.state_dict().items()}


def shapes(sd):
    return {k: list(v.shape) for k, v in sd.items()}


def real_size_key_lists():
    """Key lists (name, dtype, shape) of real-size LDM/SGM files, made from the standard architectures with our
    mapping, each checked against diffusers' convert functions (which run on meta tensors too)."""
    out_dir = OUT / "real-keys"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("sd15", "sd21", "sdxl"):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**STD_UNET[name])
            vae = AutoencoderKL(**STD_VAE)
            if name == "sd15":
                encoders = [("text_encoder", CLIPTextModel(CLIPTextConfig(**CLIP_L)))]
            elif name == "sd21":
                encoders = [("text_encoder", CLIPTextModel(CLIPTextConfig(**OPEN_CLIP_H)))]
            else:
                encoders = [("text_encoder", CLIPTextModel(CLIPTextConfig(**CLIP_L))),
                            ("text_encoder_2", CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP_BIGG)))]
        ucfg, vcfg = dict(unet.config), dict(vae.config)
        usd, vsd = meta_state(unet), meta_state(vae)
        ckpt = {}
        ckpt.update(to_ldm_unet(usd, ucfg))
        ckpt.update(to_ldm_vae(vsd, vcfg))
        expected = {"unet": shapes(usd), "vae": shapes(vsd)}
        for comp, te in encoders:
            tsd = hub_clip_state_dict(te)
            if name == "sd15":
                ckpt.update(to_ldm_clip(tsd, "cond_stage_model.transformer."))
                ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.empty(1, 77, device="meta")
                want = tsd
            elif name == "sd21":
                ckpt.update(to_open_clip(tsd, "cond_stage_model.model.", 24, torch.empty(1024, 1024, device="meta")))
                got = sfu.convert_open_clip_checkpoint(te, ckpt, prefix="cond_stage_model.model.")
                # diffusers' SD 2 text encoder: the first 23 layers.
                want = {k: v for k, v in tsd.items() if not k.startswith("text_model.encoder.layers.23.")}
            elif comp == "text_encoder":
                ckpt.update(to_ldm_clip(tsd, "conditioner.embedders.0.transformer."))
                want = tsd
            else:
                ckpt.update(to_open_clip(tsd, "conditioner.embedders.1.model.", 32,
                                         tsd["text_projection.weight"].t()))
                want = tsd
            expected[comp] = shapes(want)
        ckpt.update(noise_schedule())
        # diffusers' converters give back the models' names and shapes.
        checks = [("unet", sfu.convert_ldm_unet_checkpoint(ckpt, ucfg)), ("vae", sfu.convert_ldm_vae_checkpoint(ckpt, vcfg))]
        if name == "sd15":
            checks.append(("text_encoder", sfu.convert_ldm_clip_checkpoint(
                {k: v for k, v in ckpt.items() if not k.endswith("position_ids")})))
        elif name == "sd21":
            checks.append(("text_encoder", sfu.convert_open_clip_checkpoint(
                encoders[0][1], ckpt, prefix="cond_stage_model.model.")))
        else:
            checks.append(("text_encoder", sfu.convert_ldm_clip_checkpoint(
                {k: v for k, v in ckpt.items() if k.startswith("conditioner.embedders.0.")})))
            checks.append(("text_encoder_2", sfu.convert_open_clip_checkpoint(
                encoders[1][1], ckpt, prefix="conditioner.embedders.1.model.")))
        for comp, got in checks:
            if shapes(got) != expected[comp]:
                missing = sorted(set(expected[comp]) - set(got))[:5]
                extra = sorted(set(got) - set(expected[comp]))[:5]
                raise SystemExit(f"{name} {comp}: diffusers' conversion differs: missing {missing}, extra {extra}")
            print(f"  ok {name} {comp}: diffusers converts {len(got)} real-size names back")
        doc = {
            "generated_by": META["generated_by"],
            "tensors": [[k, "F16" if v.dtype.is_floating_point else "I64", list(v.shape)] for k, v in sorted(ckpt.items())],
            "expected": {comp: {"tensors": len(sd), "elements": sum(math.prod(s) for s in sd.values())}
                         for comp, sd in expected.items()},
        }
        # Gzip-compressed (0.42 MB -> 0.02 MB for the three), deterministic: no name, mtime 0, level 9.
        path = out_dir / f"{name}.json.gz"
        (out_dir / f"{name}.json").unlink(missing_ok=True)
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
            gz.write((json.dumps(doc, separators=(",", ":")) + "\n").encode())
        print(f"  wrote {path.relative_to(ROOT)}: {len(ckpt)} keys, {path.stat().st_size} bytes")


def main():
    for mod, want in (("torch", torch), ("diffusers", diffusers), ("transformers", transformers)):
        got = want.__version__.split("+")[0]
        if got != EXPECTED[mod]:
            raise SystemExit(f"{mod} {got}, expected {EXPECTED[mod]} (scripts/requirements-fixtures.txt)")
    OUT.mkdir(parents=True, exist_ok=True)
    sd1()
    sd2()
    sdxl()
    real_size_key_lists()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"done: {total} bytes under {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
