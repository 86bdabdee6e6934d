//! Builds a `tokenizers` tokenizer from GGUF metadata (`tokenizer.ggml.*`),
//! for GGUF files that ship no `tokenizer.json`.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::TokenizerError;

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

// Pre-tokenizer regexes (GPT-2's own is built into ByteLevel), as llama.cpp maps `tokenizer.ggml.pre` names
// (llama-vocab.cpp) and as the models' own tokenizer.json files write them.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special-token facts a GGUF file states.
#[derive(Debug, Clone, Default)]
pub struct GgufSpecials {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub add_bos: bool,
}

fn meta<'a>(ct: &'a Content, key: &str) -> Result<&'a Value, TokenizerError> {
    ct.metadata.get(key).ok_or_else(|| TokenizerError::Gguf(format!("metadata lacks {key}")))
}

fn opt_u32(ct: &Content, key: &str) -> Option<u32> {
    ct.metadata.get(key).and_then(|v| v.to_u32().ok())
}

fn strings(v: &Value, key: &str) -> Result<Vec<String>, TokenizerError> {
    let arr = v.to_vec().map_err(|_| TokenizerError::Gguf(format!("{key} is not an array")))?;
    arr.iter()
        .map(|s| {
            s.to_string().cloned().map_err(|_| TokenizerError::Gguf(format!("{key} holds a non-string")))
        })
        .collect()
}

fn pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool), TokenizerError> {
    let byte_level_only = |use_regex| ByteLevel::new(false, false, use_regex);
    let split = |re: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
        let s = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| TokenizerError::Gguf(format!("pre-tokenizer regex: {e}")))?;
        Ok(PreTokenizerWrapper::Split(s))
    };
    // (pre-tokenizer, ignore_merges)
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "olmo" | "roberta-bpe" => {
            (PreTokenizerWrapper::ByteLevel(byte_level_only(true)), false)
        }
        // Digits one by one, then GPT-2's byte-level split (SmolLM, StarCoder).
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => (
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(byte_level_only(true)),
            ])),
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => (
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                split(LLAMA3_REGEX)?,
                PreTokenizerWrapper::ByteLevel(byte_level_only(false)),
            ])),
            true,
        ),
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "megrez" | "hunyuan" => (
            PreTokenizerWrapper::Sequence(Sequence::new(vec![
                split(QWEN2_REGEX)?,
                PreTokenizerWrapper::ByteLevel(byte_level_only(false)),
            ])),
            false,
        ),
        other => {
            return Err(TokenizerError::Unsupported(format!(
                "GGUF pre-tokenizer {other:?}; known: default, gpt2, smollm, starcoder, llama3, llama-bpe, qwen2"
            )));
        }
    })
}

/// The tokenizer and the special-token metadata of a GGUF file.
pub fn from_gguf(ct: &Content) -> Result<(tokenizers::Tokenizer, GgufSpecials), TokenizerError> {
    let model = meta(ct, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|_| TokenizerError::Gguf("tokenizer.ggml.model is not a string".into()))?;
    if model != "gpt2" {
        return Err(TokenizerError::Unsupported(format!(
            "GGUF tokenizer model {model:?}; ponder builds byte-level BPE (\"gpt2\") tokenizers from GGUF \
             metadata, put a tokenizer.json beside the model for others"
        )));
    }
    let tokens = strings(meta(ct, "tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
    let merges = strings(meta(ct, "tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|_| TokenizerError::Gguf("tokenizer.ggml.token_type is not an array".into()))?
            .iter()
            .map(|t| t.to_i32().unwrap_or(1))
            .collect(),
        None => vec![1; tokens.len()],
    };
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
        .unwrap_or("default");
    let (pre_tokenizer, ignore_merges) = pre_tokenizer(pre)?;

    let vocab: ahash::AHashMap<String, u32> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| TokenizerError::Gguf(format!("merge {m:?} is not two tokens")))
        })
        .collect::<Result<_, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| TokenizerError::Gguf(format!("BPE: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));

    let mut special = Vec::new();
    let mut user = Vec::new();
    for (t, ty) in tokens.iter().zip(&types) {
        match *ty {
            TOKEN_TYPE_CONTROL => special.push(AddedToken::from(t.clone(), true)),
            TOKEN_TYPE_USER_DEFINED => user.push(AddedToken::from(t.clone(), false).normalized(false)),
            _ => {}
        }
    }
    tok.add_special_tokens(special).map_err(|e| TokenizerError::Gguf(format!("special tokens: {e}")))?;
    tok.add_tokens(user).map_err(|e| TokenizerError::Gguf(format!("user tokens: {e}")))?;

    let specials = GgufSpecials {
        bos: opt_u32(ct, "tokenizer.ggml.bos_token_id"),
        eos: opt_u32(ct, "tokenizer.ggml.eos_token_id"),
        eot: opt_u32(ct, "tokenizer.ggml.eot_token_id"),
        eom: opt_u32(ct, "tokenizer.ggml.eom_token_id"),
        add_bos: ct
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false),
    };
    Ok((tok, specials))
}

/// Token ids of the GGUF's control tokens, by text (for tests and checks).
pub fn control_tokens(ct: &Content) -> Result<HashMap<String, u32>, TokenizerError> {
    let tokens = strings(meta(ct, "tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
    let types = meta(ct, "tokenizer.ggml.token_type")?
        .to_vec()
        .map_err(|_| TokenizerError::Gguf("tokenizer.ggml.token_type is not an array".into()))?;
    Ok(tokens
        .into_iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, ty))| ty.to_i32().ok() == Some(TOKEN_TYPE_CONTROL))
        .map(|(i, (t, _))| (t, i as u32))
        .collect())
}
