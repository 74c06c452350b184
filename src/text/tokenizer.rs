//! The CLIP tokenizer of SD 1.x/2.x, SDXL and FLUX, with the rules of transformers' `CLIPTokenizer` (the
//! `tokenizers`-backed class, = `CLIPTokenizerFast`): NFC, whitespace runs → one space, lowercase; CLIP's
//! pre-tokenizer regex, then GPT-2 byte-level mapping; byte-level BPE with the `</w>` end-of-word suffix; BOS 49406 +
//! at most 75 tokens + EOS 49407, padded to 77 with the folder's pad token.
//!
//! Pad tokens differ between folders: SD 1.x / CLIP-L pad with EOS (49407); SD 2.x and SDXL's `tokenizer_2` pad with
//! `"!"` (id 0), which transformers registers as a special added token — so a literal `"!"` in a prompt becomes id 0
//! there (`"!!"` → 0 0), unlike open_clip (`"!!"` → 748). [`PadToken`] names the two conventions.
//!
//! Sources, in the order [`ClipTokenizer::from_dir`] tries them: `tokenizer.json` (read by the `tokenizers` crate as
//! written); `vocab.json` + `merges.txt` (the pipeline above is assembled around them, as transformers does). The
//! special tokens come from `tokenizer_config.json` / `special_tokens_map.json` (transformers' defaults when absent).
//! [`ClipTokenizer::embedded`] uses the standard CLIP BPE vocabulary compiled into the library (OpenAI's
//! `bpe_simple_vocab_16e6.txt.gz` as shipped by open-clip-torch 3.3.0, MIT), for single-file checkpoints that carry
//! no tokenizer. A folder without tokenizer files is an error, never a silent fallback to the embedded one.

use std::io::Read;
use std::path::Path;

use once_cell::sync::Lazy;
use serde_json::Value;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::error::{Error, Result};

/// Tokens per prompt window: CLIP's 77 learned positions.
pub const MAX_TOKENS: usize = 77;
/// The standard CLIP start-of-text id.
pub const BOS_ID: u32 = 49406;
/// The standard CLIP end-of-text id (also SD 1.x's pad).
pub const EOS_ID: u32 = 49407;
/// Entries of the standard CLIP vocabulary: 256 byte tokens, the same with `</w>`, 48894 merges, 2 specials.
pub const VOCAB_SIZE: usize = 49408;
/// Prompts longer than this (bytes) are rejected before tokenising: only 75 tokens are kept anyway.
pub const MAX_PROMPT_BYTES: usize = 1 << 20;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// CLIP's pre-tokenizer pattern (transformers `CLIPTokenizer`): specials, contractions, letter runs, single digits,
/// runs of other non-space characters. Whitespace is dropped.
const CLIP_SPLIT: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// OpenAI's merges file, gzip-compressed (1.36 MB), MIT-licensed: line 0 is a header, lines 1..=48894 the merges.
static EMBEDDED_BPE_GZ: &[u8] = include_bytes!("bpe_simple_vocab_16e6.txt.gz");
const MERGES: usize = 49152 - 256 - 2;

/// Which token fills a prompt window after EOS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadToken {
    /// `<|endoftext|>` (49407): SD 1.x, CLIP-L (SDXL's and FLUX's `tokenizer/`).
    Eos,
    /// `"!"` (0), a special added token: SD 2.x, SDXL's `tokenizer_2` (OpenCLIP ViT-H/bigG).
    Exclamation,
}

/// A tokenised prompt window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// [`MAX_TOKENS`] ids: BOS, ≤ 75 prompt tokens, EOS, pads.
    pub ids: Vec<u32>,
    /// 1 for BOS, the prompt's tokens and EOS; 0 for pads.
    pub attention_mask: Vec<u32>,
    /// Index of the EOS token in `ids` (the position CLIP's pooled output reads).
    pub eos_position: usize,
}

/// A CLIP tokenizer with truncation and padding to [`MAX_TOKENS`] configured. Cheap to share (`&self` methods).
pub struct ClipTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    eos_id: u32,
}

/// The special tokens of a folder's `tokenizer_config.json` / `special_tokens_map.json`.
struct Specials {
    bos: AddedToken,
    eos: AddedToken,
    unk: AddedToken,
    pad: AddedToken,
}

impl ClipTokenizer {
    /// Load the tokenizer of a diffusers `tokenizer/` (or `tokenizer_2/`) folder: `tokenizer.json` if present, else
    /// `vocab.json` + `merges.txt`; special tokens from `tokenizer_config.json` / `special_tokens_map.json`.
    /// Errors: `Io` for an unreadable file, `Format` for malformed files or a folder with no tokenizer files.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let specials = Specials::from_dir(dir)?;
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if json.is_file() {
            let bytes = std::fs::read(&json).map_err(|e| Error::io(&json, e))?;
            let inner = Tokenizer::from_bytes(&bytes).map_err(|e| Error::format(format!("{}: {e}", json.display())))?;
            Self::finish(inner, specials, false, &json.display().to_string())
        } else if vocab.is_file() && merges.is_file() {
            let vocab_text = std::fs::read_to_string(&vocab).map_err(|e| Error::io(&vocab, e))?;
            let merges_text = std::fs::read_to_string(&merges).map_err(|e| Error::io(&merges, e))?;
            let vocab_map: Vocab =
                serde_json::from_str(&vocab_text).map_err(|e| Error::format(format!("{}: {e}", vocab.display())))?;
            let merge_list =
                parse_merges(&merges_text).map_err(|e| Error::format(format!("{}: {e}", merges.display())))?;
            let inner = build(vocab_map, merge_list, &specials.unk.content)?;
            Self::finish(inner, specials, true, &dir.display().to_string())
        } else {
            Err(Error::format(format!(
                "{}: no tokenizer (expected tokenizer.json, or vocab.json and merges.txt)",
                dir.display()
            )))
        }
    }

    /// The standard CLIP tokenizer from the vocabulary compiled into the library, padding with `pad`.
    pub fn embedded(pad: PadToken) -> Result<Self> {
        let (vocab, merges) = EMBEDDED.as_ref().map_err(|e| Error::format(e.clone()))?;
        let inner = build(vocab.clone(), merges.clone(), EOS)?;
        let pad = match pad {
            PadToken::Eos => special(EOS, true),
            PadToken::Exclamation => special("!", false),
        };
        let specials = Specials {
            bos: special(BOS, true),
            eos: special(EOS, true),
            unk: special(EOS, true),
            pad,
        };
        Self::finish(inner, specials, true, "embedded CLIP vocabulary")
    }

    /// Register the special tokens, the BOS/EOS post-processor (vocab/merges only: a tokenizer.json has its own),
    /// truncation to 77 and padding to 77.
    fn finish(mut inner: Tokenizer, s: Specials, add_post_processor: bool, what: &str) -> Result<Self> {
        let id = |t: &AddedToken, inner: &Tokenizer| {
            inner.token_to_id(&t.content).ok_or_else(|| {
                Error::format(format!(
                    "{what}: special token {:?} is not in the vocabulary",
                    t.content
                ))
            })
        };
        // transformers adds every special token of the config to the added vocabulary (matched before the BPE);
        // those a tokenizer.json already lists keep their flags from there.
        let known: Vec<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .map(|t| t.content)
            .collect();
        let mut added = vec![s.bos.clone(), s.eos.clone(), s.unk.clone(), s.pad.clone()];
        added.retain(|t| !known.contains(&t.content));
        added.dedup_by(|a, b| a.content == b.content);
        for t in &added {
            id(t, &inner)?; // must exist in the vocabulary: adding would otherwise grow it past the embedding
        }
        let added: Vec<AddedToken> = added;
        inner
            .add_special_tokens(added)
            .map_err(|e| Error::format(format!("{what}: {e}")))?;
        let (bos_id, eos_id, pad_id) = (id(&s.bos, &inner)?, id(&s.eos, &inner)?, id(&s.pad, &inner)?);
        if add_post_processor {
            inner.with_post_processor(Some(
                RobertaProcessing::new((s.eos.content.clone(), eos_id), (s.bos.content.clone(), bos_id))
                    .trim_offsets(false)
                    .add_prefix_space(false),
            ));
        }
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: MAX_TOKENS,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::format(format!("{what}: {e}")))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(MAX_TOKENS),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: s.pad.content.clone(),
        }));
        Ok(Self { inner, pad_id, eos_id })
    }

    /// The [`MAX_TOKENS`] ids of `prompt` (BOS, ≤ 75 tokens, EOS, pads).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        Ok(self.encode_full(prompt)?.ids)
    }

    /// Ids, attention mask and EOS position of `prompt`. An empty prompt gives BOS, EOS and pads. Errors:
    /// `InvalidArgument` for a prompt over [`MAX_PROMPT_BYTES`].
    pub fn encode_full(&self, prompt: &str) -> Result<TokenizedPrompt> {
        if prompt.len() > MAX_PROMPT_BYTES {
            return Err(Error::invalid(format!(
                "prompt of {} bytes is longer than the {MAX_PROMPT_BYTES} bytes accepted",
                prompt.len()
            )));
        }
        let enc = self
            .inner
            .encode(prompt, true)
            .map_err(|e| Error::format(format!("tokenizer: {e}")))?;
        let ids = enc.get_ids().to_vec();
        let attention_mask = enc.get_attention_mask().to_vec();
        let kept = attention_mask.iter().filter(|&&m| m == 1).count();
        if ids.len() != MAX_TOKENS || kept < 2 || ids[kept - 1] != self.eos_id {
            return Err(Error::format(format!(
                "tokenizer: window of {} ids with {kept} unpadded does not end its prompt with EOS {}",
                ids.len(),
                self.eos_id
            )));
        }
        Ok(TokenizedPrompt {
            ids,
            attention_mask,
            eos_position: kept - 1,
        })
    }

    /// The pad id (49407 or 0 for the standard vocabulary).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The EOS id.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Entries of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of `token` (a vocabulary entry such as `"a</w>"`), if any.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// transformers' `CLIPTokenizer` pipeline around a BPE vocabulary.
fn build(vocab: Vocab, merges: Vec<(String, String)>, unk: &str) -> Result<Tokenizer> {
    let err = |e: tokenizers::Error| Error::format(format!("CLIP tokenizer: {e}"));
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .fuse_unk(false)
        .unk_token(unk.into())
        .build()
        .map_err(err)?;
    let mut t = Tokenizer::new(bpe);
    let whitespace = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(err)?;
    t.with_normalizer(Some(NormalizerSequence::new(vec![
        NFC.into(),
        whitespace.into(),
        Lowercase.into(),
    ])))
    .map_err(err)?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(err)?;
    t.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    Ok(t)
}

/// A special token as transformers registers it from a config entry.
fn special(content: &str, normalized: bool) -> AddedToken {
    let mut t = AddedToken::from(content, true);
    t.normalized = normalized;
    t
}

impl Specials {
    /// bos/eos/unk/pad from `tokenizer_config.json`, else `special_tokens_map.json`, else CLIPTokenizer's defaults
    /// (`<|startoftext|>`, `<|endoftext|>` for the rest). A plain string entry is a special, non-normalised token;
    /// an `AddedToken` object keeps its `normalized` flag.
    fn from_dir(dir: &Path) -> Result<Self> {
        let mut maps = Vec::new();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let p = dir.join(name);
            if p.is_file() {
                let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
                match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(m)) => maps.push((p, m)),
                    Ok(_) => return Err(Error::format(format!("{}: not a JSON object", p.display()))),
                    Err(e) => return Err(Error::format(format!("{}: {e}", p.display()))),
                }
            }
        }
        let get = |key: &str, default: &str| -> Result<AddedToken> {
            for (p, m) in &maps {
                match m.get(key) {
                    None | Some(Value::Null) => continue,
                    Some(Value::String(s)) => return Ok(special(s, false)),
                    Some(Value::Object(o)) => match o.get("content") {
                        Some(Value::String(s)) => {
                            let normalized = o.get("normalized").and_then(Value::as_bool).unwrap_or(false);
                            return Ok(special(s, normalized));
                        }
                        _ => {
                            return Err(Error::format(format!(
                                "{}: {key} has no string \"content\"",
                                p.display()
                            )))
                        }
                    },
                    Some(v) => return Err(Error::format(format!("{}: {key} = {v} is not a token", p.display()))),
                }
            }
            Ok(special(default, true))
        };
        Ok(Self {
            bos: get("bos_token", BOS)?,
            eos: get("eos_token", EOS)?,
            unk: get("unk_token", EOS)?,
            pad: get("pad_token", EOS)?,
        })
    }
}

/// `merges.txt`: an optional `#version` header, then one `left right` pair per line.
fn parse_merges(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if (i == 0 && line.starts_with("#version")) || line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => out.push((a.to_string(), b.to_string())),
            _ => return Err(format!("line {} is not a merge pair: {line:?}", i + 1)),
        }
    }
    Ok(out)
}

type VocabAndMerges = (Vocab, Vec<(String, String)>);

/// The standard vocabulary and merges, built once from the embedded gz as OpenAI's `SimpleTokenizer` builds them:
/// the 256 byte characters (GPT-2's byte → unicode table, in its order), the same with `</w>`, each merge's
/// concatenation, then `<|startoftext|>` and `<|endoftext|>`.
static EMBEDDED: Lazy<std::result::Result<VocabAndMerges, String>> = Lazy::new(|| {
    let mut text = String::new();
    flate2::read::GzDecoder::new(EMBEDDED_BPE_GZ)
        .read_to_string(&mut text)
        .map_err(|e| format!("embedded CLIP vocabulary: {e}"))?;
    let merges: Vec<(String, String)> = text
        .lines()
        .skip(1)
        .take(MERGES)
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap_or((l, ""));
            (a.to_string(), b.to_string())
        })
        .collect();
    if merges.len() != MERGES || merges.iter().any(|(a, b)| a.is_empty() || b.is_empty()) {
        return Err("embedded CLIP vocabulary: truncated merges".into());
    }
    let bytes = byte_chars();
    let mut tokens: Vec<String> = bytes.iter().map(|c| c.to_string()).collect();
    tokens.extend(bytes.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(BOS.into());
    tokens.push(EOS.into());
    let vocab: Vocab = tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
    if vocab.len() != VOCAB_SIZE {
        return Err(format!(
            "embedded CLIP vocabulary has {} distinct entries, expected {VOCAB_SIZE}",
            vocab.len()
        ));
    }
    Ok((vocab, merges))
});

/// GPT-2's reversible byte → unicode table in OpenAI's order: printable bytes map to themselves (`!`..`~`,
/// `¡`..`¬`, `®`..`ÿ`), then the other bytes in ascending order to U+0100 onwards.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut out: Vec<char> = (0..256u32)
        .filter(|&b| printable(b))
        .filter_map(char::from_u32)
        .collect();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable(b) {
            out.extend(char::from_u32(256 + n));
            n += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_vocabulary_has_the_standard_layout() {
        let t = ClipTokenizer::embedded(PadToken::Eos).unwrap();
        assert_eq!(t.vocab_size(), VOCAB_SIZE);
        assert_eq!(t.token_to_id("!"), Some(0));
        assert_eq!(t.token_to_id("!</w>"), Some(256));
        assert_eq!(t.token_to_id(BOS), Some(BOS_ID));
        assert_eq!(t.token_to_id(EOS), Some(EOS_ID));
        let ids = t.encode("").unwrap();
        assert_eq!(&ids[..3], &[BOS_ID, EOS_ID, EOS_ID]);
        assert_eq!(ids.len(), MAX_TOKENS);
    }

    #[test]
    fn merges_file_errors_name_the_line() {
        assert!(parse_merges("#version: 0.2\na b\nc d\n").unwrap().len() == 2);
        let e = parse_merges("#version: 0.2\na b\nbroken\n").unwrap_err();
        assert!(e.contains("line 3"), "{e}");
    }
}
