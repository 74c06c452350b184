//! Prompt text to token ids: the tokenizers the text encoders of [`crate::models`] read.
//!
//! - [`tokenizer`]: the CLIP BPE tokenizer (SD 1.x/2.x, SDXL's two encoders, FLUX's CLIP), from a model folder's
//!   files or the standard vocabulary compiled into the library.

pub mod tokenizer;

pub use tokenizer::{ClipTokenizer, PadToken, TokenizedPrompt};
