//! A T5 encoder stored alone in a file, for `--text-encoder-2 FILE` (what Forge and ComfyUI users pass beside a
//! FLUX transformer): a llama.cpp-style GGUF (City96's `t5-v1_1-xxl-encoder-Q8_0.gguf`: `enc.blk.N.*` names, its
//! SentencePiece vocabulary in `tokenizer.ggml.*`) or a safetensors file in transformers' names
//! (`t5xxl_fp16.safetensors`, `t5xxl_fp8_e4m3fn.safetensors`). The config comes from a `NAME/config.json` beside
//! the file when there is one, else from the tensor shapes (with T5's relative distance 128, eps 1e-6); quantised
//! and fp8 tensors stay in their stored form (the store's rule). A safetensors file carries no tokenizer: it is
//! read from a `NAME/` folder beside the file (`t5xxl_fp16/tokenizer.json`) or a `tokenizer_2/` folder beside it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::models::t5::{gguf_names, T5Encoder, T5EncoderConfig};
use crate::models::text_encoder::PromptTokenizer;
use crate::text::{missing_single_file_tokenizer, T5TokenType, T5Tokenizer, T5Vocab};
use crate::weights::gguf::{GgufHeader, GgufValue};
use crate::weights::{TensorSpan, WeightLayout};

use super::model::T5_DEFAULT_MAX_LENGTH;

/// What a T5 file gives: the encoder (config from shapes), its tokenizer, and how the store reads it.
pub(crate) struct T5File {
    pub encoder: T5Encoder,
    pub tokenizer: Box<dyn PromptTokenizer>,
    pub layout: WeightLayout,
}

/// Read a T5 encoder file's header (no tensor data).
pub(crate) fn open(path: &Path) -> Result<T5File> {
    let (shapes, spans, tokenizer) = if crate::weights::gguf::is_gguf_file(path) {
        let header = GgufHeader::read_file(path)?;
        match header.architecture() {
            Some("t5" | "t5encoder") | None => {}
            Some(other) => {
                return Err(Error::unsupported(format!(
                    "{}: GGUF general.architecture \"{other}\" as a T5 encoder (supported: t5encoder, t5)",
                    path.display()
                )))
            }
        }
        let gated = gguf_names::gguf_is_gated(header.tensors.iter().map(|t| t.name.as_str()));
        let mut spans: Vec<TensorSpan> = Vec::with_capacity(header.tensors.len());
        for t in &header.tensors {
            // A full T5 file's decoder and LM head are known extras the encoder never reads.
            if t.name.starts_with("dec.") || t.name.starts_with("output.") {
                continue;
            }
            let name = gguf_names::gguf_to_transformers(&t.name, gated).ok_or_else(|| {
                Error::format(format!("{}: GGUF tensor {} is not a T5 encoder tensor", path.display(), t.name))
            })?;
            spans.push(t.span(name));
        }
        let shapes = spans.iter().map(|s| (s.name.clone(), s.shape.clone())).collect();
        let tokenizer: Box<dyn PromptTokenizer> = match vocab_of(&header, path)? {
            Some(v) => Box::new(T5Tokenizer::from_vocab(&v, stated_max_length(path).unwrap_or(T5_DEFAULT_MAX_LENGTH))?),
            None => tokenizer_beside(path)?,
        };
        (shapes, Some(spans), tokenizer)
    } else {
        (crate::weights::tensor_shapes(path)?.into_iter().collect(), None, tokenizer_beside(path)?)
    };
    // A `NAME/config.json` beside the file (the project's config-folder convention for single files) states what
    // shapes cannot: the relative-attention distance and the norm epsilon (T5's 128 and 1e-6 otherwise).
    let config_json = path.with_extension("").join("config.json");
    let config = if config_json.is_file() {
        T5EncoderConfig::from_json(&std::fs::read_to_string(&config_json).map_err(|e| Error::io(&config_json, e))?)?
    } else {
        T5EncoderConfig::from_shapes(&shapes).map_err(|e| match e {
            Error::Format(m) => Error::format(format!("{}: {m}", path.display())),
            e => e,
        })?
    };
    let embedding = T5Encoder::embedding_block(shapes.keys().map(String::as_str))?;
    let layout = WeightLayout {
        view: if spans.is_some() { "t5".into() } else { String::new() },
        rule: crate::models::t5::block_of,
        spans: spans.map(Arc::new),
    };
    Ok(T5File { encoder: T5Encoder::new(config, embedding), tokenizer, layout })
}

/// The sequence length a `NAME/tokenizer_config.json` beside the file states (`model_max_length` in 1..=4096).
fn stated_max_length(path: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(path.with_extension("").join("tokenizer_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("model_max_length")?.as_u64().map(|n| n as usize).filter(|n| (1..=4096).contains(n))
}


/// The tokenizer folder for a T5 safetensors file: `NAME/` beside it (the file name without its extension), else
/// `tokenizer_2/` beside it; the error names what to pass otherwise.
fn tokenizer_beside(path: &Path) -> Result<Box<dyn PromptTokenizer>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let candidates: [PathBuf; 2] = [path.with_extension(""), dir.join("tokenizer_2")];
    match candidates.iter().find(|d| d.join("tokenizer.json").is_file()) {
        Some(d) => Ok(Box::new(T5Tokenizer::from_dir(d, T5_DEFAULT_MAX_LENGTH)?)),
        None => Err(missing_single_file_tokenizer(path)),
    }
}

/// The SentencePiece vocabulary a T5 GGUF carries (`tokenizer.ggml.*`, llama.cpp's `t5` tokenizer model), or None
/// when the file has none.
fn vocab_of(h: &GgufHeader, path: &Path) -> Result<Option<T5Vocab>> {
    let Some(GgufValue::Array(tokens)) = h.metadata.get("tokenizer.ggml.tokens") else {
        return Ok(None);
    };
    let bad = |what: &str| Error::format(format!("{}: tokenizer.ggml.{what} is malformed", path.display()));
    let tokens: Vec<String> =
        tokens.iter().map(|t| t.as_str().map(str::to_string)).collect::<Option<_>>().ok_or_else(|| bad("tokens"))?;
    let number = |v: &GgufValue| match *v {
        GgufValue::Float(f) => Some(f),
        GgufValue::Int(i) => Some(i as f64),
        GgufValue::Uint(u) => Some(u as f64),
        _ => None,
    };
    let array = |key: &str| match h.metadata.get(&format!("tokenizer.ggml.{key}")) {
        Some(GgufValue::Array(a)) => Some(a),
        _ => None,
    };
    let scores: Vec<f32> = match array("scores") {
        Some(a) => a.iter().map(|v| number(v).map(|f| f as f32)).collect::<Option<_>>().ok_or_else(|| bad("scores"))?,
        None => vec![0.0; tokens.len()],
    };
    let types: Vec<T5TokenType> = match array("token_type") {
        Some(a) => a
            .iter()
            .map(|v| number(v).and_then(|f| T5TokenType::from_ggml(f as i32)))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("token_type"))?,
        None => vec![T5TokenType::Normal; tokens.len()],
    };
    let precompiled_charsmap = match array("precompiled_charsmap") {
        Some(a) => Some(
            a.iter()
                .map(|v| number(v).map(|f| f as i64 as u8))
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(|| bad("precompiled_charsmap"))?,
        ),
        None => None,
    };
    let id = |key: &str, default: u32| -> Result<u32> {
        match h.metadata.get(&format!("tokenizer.ggml.{key}")) {
            Some(v) => v.as_usize().and_then(|u| u32::try_from(u).ok()).ok_or_else(|| bad(key)),
            None => Ok(default),
        }
    };
    Ok(Some(T5Vocab {
        tokens,
        scores,
        types,
        precompiled_charsmap,
        unk_id: id("unknown_token_id", 2)?,
        pad_id: id("padding_token_id", 0)?,
        eos_id: id("eos_token_id", 1)?,
    }))
}
