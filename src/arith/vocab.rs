//! ponder-arith's tokenizer: a small byte-level BPE trained with the
//! `tokenizers` crate on train-split text, digits kept one per token (as
//! SmolLM does) so that arithmetic stays digit by digit. Written as
//! `tokenizer.json` and `tokenizer_config.json` beside the weights, so the
//! engine loads it like any HF checkpoint.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use super::task::{self, Split};

pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub const PAD: u32 = 0;
pub const EOS: u32 = 2;
pub const VOCAB_SIZE: usize = 384;

/// ChatML without a default system prompt.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub fn vocab_size() -> usize {
    VOCAB_SIZE
}

/// Trains the BPE on a fixed stream of train-split questions and solutions
/// (deterministic: the same corpus gives the same merges).
pub fn build() -> Result<tokenizers::Tokenizer, tokenizers::Error> {
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true)),
    ]))));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(VOCAB_SIZE)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let corpus: Vec<String> = task::generate_seeded(Split::Train, 300, u64::MAX)?
        .iter()
        .flat_map(|p| [p.question.clone(), p.solution()])
        .collect();
    tok.train(&mut trainer, corpus.iter())?;
    Ok(tok)
}

/// Writes `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`.
pub fn write_files(dir: &Path, tok: &tokenizers::Tokenizer) -> anyhow::Result<()> {
    tok.save(dir.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = serde_json::json!({
        "chat_template": CHAT_TEMPLATE,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "add_bos_token": false,
        "model_max_length": 1024,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let generation = serde_json::json!({"eos_token_id": [EOS, PAD], "pad_token_id": PAD});
    std::fs::write(dir.join("generation_config.json"), serde_json::to_string_pretty(&generation)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_with_digits_one_per_token_and_specials_whole() {
        let tok = build().unwrap();
        assert_eq!(tok.get_vocab_size(true), VOCAB_SIZE);
        let text = "<|im_start|>user\nWhat is (12 + 7) * 3?<|im_end|>\n<|im_start|>assistant\n12 + 7 = 19\n\nThe answer is 57.<|im_end|>";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        assert_eq!(enc.get_ids()[0], 1);
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(EOS));
        let digits = tok.encode("2024", false).unwrap();
        assert_eq!(digits.get_ids().len(), 4);
        // Words of the task are whole tokens: sequences stay short.
        let q = "Ava has 99 stamps. Then 83 stamps arrive. How many stamps are there now?";
        assert!(tok.encode(q, false).unwrap().len() < 30, "{:?}", tok.encode(q, false).unwrap().get_tokens());
        // Text outside the corpus still round-trips (byte-level).
        let odd = "héllo ∑ 🙂";
        assert_eq!(tok.decode(tok.encode(odd, false).unwrap().get_ids(), false).unwrap(), odd);
    }
}
