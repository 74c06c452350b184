//! Prompt text to token ids: the tokenizers the text encoders of [`crate::models`] read.
//!
//! - [`tokenizer`]: the CLIP BPE tokenizer (SD 1.x/2.x, SDXL's two encoders, FLUX's CLIP), from a model folder's
//!   files or the standard vocabulary compiled into the library.
//! - [`t5`]: the T5 unigram tokenizer (FLUX's `tokenizer_2/`), from a folder's `tokenizer.json`.

pub mod t5;
pub mod tokenizer;

pub use t5::{missing_single_file_tokenizer, T5TokenType, T5TokenizedPrompt, T5Tokenizer, T5Vocab};
pub use tokenizer::{ClipTokenizer, PadToken, TokenizedPrompt};
