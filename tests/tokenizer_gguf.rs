//! The tokenizer built from SmolLM2's GGUF metadata (the package ships no
//! tokenizer.json).

mod common;

use candle_core::quantized::gguf_file;
use ponder::tokenizer::{AddSpecial, ChatMessage, Tokenizer, gguf};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_gguf_file(&common::smollm_path()).unwrap()
}

const TEXTS: &[&str] = &[
    "12345 67.89 and 1000000",
    "a  b\t\tc\n\n\nd   e",
    "   leading and trailing   ",
    "héllo wörld 你好 🙂 ∑ naïve café",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "It's they're we'll I'd you've",
    "Step 1: 3 + 4 = 7.\n\nStep 2: 7 * 2 = 14.\n\nThe answer is 14.",
];

#[test]
fn text_round_trips_through_encode_and_decode() {
    let tok = tokenizer();
    for text in TEXTS {
        let ids = tok.encode(text, AddSpecial::Yes).unwrap();
        assert_eq!(&tok.decode_all(&ids).unwrap(), text, "ids {ids:?}");
    }
}

#[test]
fn special_token_ids_match_the_gguf_metadata() {
    let tok = tokenizer();
    let mut f = std::fs::File::open(common::smollm_path()).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let controls = gguf::control_tokens(&ct).unwrap();
    assert_eq!(controls.len(), 17);
    for (text, id) in &controls {
        assert_eq!(tok.token_id(text), Some(*id), "{text}");
        assert!(tok.is_special(*id), "{text} is special");
        assert_eq!(tok.encode(text, AddSpecial::No).unwrap(), vec![*id], "{text} encodes as one token");
    }
    let meta = |k: &str| ct.metadata.get(k).and_then(|v| v.to_u32().ok());
    assert_eq!(tok.bos_id(), meta("tokenizer.ggml.bos_token_id"));
    assert_eq!(tok.eos_id(), meta("tokenizer.ggml.eos_token_id"));
    assert_eq!(tok.eos_id(), tok.token_id("<|im_end|>"));
    // EOS and <|endoftext|> both end generation.
    assert_eq!(tok.end_of_generation(), &[0, 2]);
    assert_eq!(tok.vocab_size(), 49152);
}

#[test]
fn digits_are_split_one_by_one_as_smollm_pretokenizes_them() {
    let tok = tokenizer();
    let ids = tok.encode("2024", AddSpecial::No).unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.token_text(i)).collect();
    assert_eq!(pieces, ["2", "0", "2", "4"]);
    // No BOS is added: the GGUF says add_bos_token = false.
    assert_eq!(tok.encode("hi", AddSpecial::Yes).unwrap(), tok.encode("hi", AddSpecial::No).unwrap());
}

#[test]
fn the_chat_template_from_the_gguf_renders_chatml_with_a_default_system_prompt() {
    let tok = tokenizer();
    let text = tok.apply_chat_template(&[ChatMessage::new("user", "Hi")]).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&text, AddSpecial::No).unwrap();
    assert_eq!(ids[0], tok.token_id("<|im_start|>").unwrap());
}

#[test]
fn token_ids_equal_llama_cpp_on_the_same_gguf() {
    // Golden ids from llama-cpp-python 0.3.36 tokenizing the same GGUF
    // (add_bos=False, special=True); see the file's "source" field.
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2_llamacpp_tokens.json");
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tok = tokenizer();
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 9);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> =
            case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, AddSpecial::No).unwrap(), want, "{text:?}");
    }
}
