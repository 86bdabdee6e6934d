//! Text ⇄ token ids: the model's tokenizer (from `tokenizer.json`, or built
//! from GGUF metadata), its special tokens, its chat template, and
//! incremental decoding for streams.

mod bytes;
pub mod chat;
pub mod gguf;

use std::path::Path;

use candle_core::quantized::gguf_file;

pub use chat::{ChatMessage, ChatTemplate};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("GGUF tokenizer metadata: {0}")]
    Gguf(String),
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Template(String),
    #[error("model has no chat template; use the completions endpoint or add one to tokenizer_config.json")]
    NoChatTemplate,
    #[error("tokenizer: {0}")]
    Tokenizers(String),
}

impl TokenizerError {
    fn file(path: &Path, message: impl std::fmt::Display) -> Self {
        TokenizerError::File { path: path.display().to_string(), message: message.to_string() }
    }
}

fn tk_err(e: tokenizers::Error) -> TokenizerError {
    TokenizerError::Tokenizers(e.to_string())
}

/// Whether `encode` adds the model's own leading special tokens (BOS). Chat
/// prompts come from a template that writes them itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddSpecial {
    Yes,
    No,
}

/// Texts that end generation in common chat formats, used beside the ids the
/// metadata names (as llama.cpp does), so that a model trained on one turn
/// marker but configured with another still stops.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "<|eom_id|>",
    "</s>",
];

#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepended by `encode(.., AddSpecial::Yes)` when the tokenizer itself does not add it.
    manual_bos: Option<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    end_of_generation: Vec<u32>,
    chat: Option<ChatTemplate>,
}

impl Tokenizer {
    /// The tokenizer of a GGUF model: `tokenizer.json` beside the file when
    /// there is one, else built from the GGUF metadata.
    pub fn from_gguf_file(path: &Path) -> Result<Self, TokenizerError> {
        let mut file = std::fs::File::open(path).map_err(|e| TokenizerError::file(path, e))?;
        let ct = gguf_file::Content::read(&mut file).map_err(|e| TokenizerError::file(path, e))?;
        let (built, specials) = gguf::from_gguf(&ct)?;
        let sidecar = path.parent().map(|d| d.join("tokenizer.json"));
        let (inner, manual_bos) = match sidecar.filter(|p| p.is_file()) {
            Some(p) => (tokenizers::Tokenizer::from_file(&p).map_err(|e| TokenizerError::file(&p, e))?, None),
            None => (built, specials.bos.filter(|_| specials.add_bos)),
        };
        let text_of = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i)).unwrap_or_default();
        let chat = match ct.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()) {
            Some(src) => Some(ChatTemplate::new(src, &text_of(specials.bos), &text_of(specials.eos))?),
            None => None,
        };
        let ids = [specials.eos, specials.eot, specials.eom].into_iter().flatten().collect();
        Ok(Self::assemble(inner, manual_bos, specials.bos, specials.eos, ids, chat))
    }

    /// The tokenizer of an HF checkpoint directory: `tokenizer.json`, with
    /// `tokenizer_config.json` (chat template, BOS/EOS) and the EOS ids of
    /// `generation_config.json` and `config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| TokenizerError::file(&path, e))?;
        let read_json = |name: &str| -> Result<Option<serde_json::Value>, TokenizerError> {
            let p = dir.join(name);
            if !p.is_file() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p).map_err(|e| TokenizerError::file(&p, e))?;
            serde_json::from_str(&text).map(Some).map_err(|e| TokenizerError::file(&p, e))
        };
        let tcfg = read_json("tokenizer_config.json")?.unwrap_or_default();
        let token_text = |key: &str| -> Option<String> {
            match tcfg.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                obj => obj.get("content")?.as_str().map(str::to_string),
            }
        };
        let bos_text = token_text("bos_token");
        let eos_text = token_text("eos_token");
        let bos = bos_text.as_deref().and_then(|t| inner.token_to_id(t));
        let eos = eos_text.as_deref().and_then(|t| inner.token_to_id(t));
        let mut end_ids: Vec<u32> = eos.into_iter().collect();
        for name in ["generation_config.json", "config.json"] {
            if let Some(v) = read_json(name)?.and_then(|c| c.get("eos_token_id").cloned()) {
                match v {
                    serde_json::Value::Number(n) => end_ids.extend(n.as_u64().map(|x| x as u32)),
                    serde_json::Value::Array(a) => {
                        end_ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                    }
                    _ => {}
                }
            }
        }
        let chat_src = match tcfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let chat = match chat_src {
            Some(src) => Some(ChatTemplate::new(
                &src,
                bos_text.as_deref().unwrap_or(""),
                eos_text.as_deref().unwrap_or(""),
            )?),
            None => None,
        };
        // tokenizer.json's post-processor adds BOS itself when the model wants it.
        Ok(Self::assemble(inner, None, bos, eos, end_ids, chat))
    }

    /// A tokenizer whose token `i` is the word `<i>`, for models with random
    /// weights (benchmarks): every id decodes, nothing ends generation.
    pub fn numbered(vocab: usize) -> Result<Self, TokenizerError> {
        use tokenizers::models::wordlevel::WordLevel;
        let words = (0..vocab as u32).map(|i| (format!("<{i}>"), i)).collect();
        let model = WordLevel::builder()
            .vocab(words)
            .unk_token("<0>".into())
            .build()
            .map_err(|e| TokenizerError::file(Path::new("<numbered>"), e))?;
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::WhitespaceSplit));
        Ok(Self::assemble(inner, None, None, None, Vec::new(), None))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        manual_bos: Option<u32>,
        bos: Option<u32>,
        eos: Option<u32>,
        mut end_of_generation: Vec<u32>,
        chat: Option<ChatTemplate>,
    ) -> Self {
        for text in END_OF_GENERATION_TEXTS {
            if let Some(id) = inner.token_to_id(text) {
                let special = inner.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special);
                if special {
                    end_of_generation.push(id);
                }
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        Self { inner, manual_bos, bos, eos, end_of_generation, chat }
    }

    pub fn encode(&self, text: &str, add_special: AddSpecial) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, add_special == AddSpecial::Yes).map_err(tk_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special == AddSpecial::Yes {
            ids.extend(self.manual_bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids` without special tokens, as returned to clients.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(tk_err)
    }

    /// Text of `ids` with special tokens written out.
    pub fn decode_all(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(tk_err)
    }

    /// The token's own vocabulary string (byte-level symbols, not decoded text).
    pub fn token_str(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Ids that end generation: EOS and the model's end-of-turn tokens.
    pub fn end_of_generation(&self) -> &[u32] {
        &self.end_of_generation
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.inner.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special)
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// Renders a conversation with the model's template, ending at the start
    /// of the assistant's turn.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        self.chat.as_ref().ok_or(TokenizerError::NoChatTemplate)?.render(messages, true)
    }

    /// The user's message, when `prompt` is exactly this model's template
    /// around one user turn (a completions client that applied the template
    /// itself); `None` for any other text, or a model with no template.
    pub fn user_turn(&self, prompt: &str) -> Option<String> {
        // A marker no template rewrites: split the rendered turn around it.
        const MARK: &str = "\u{1}ponder-user-turn\u{1}";
        let chat = self.chat.as_ref()?;
        let turn = [ChatMessage { role: "user".to_string(), content: MARK.to_string() }];
        let rendered = chat.render(&turn, true).ok()?;
        let (before, after) = rendered.split_once(MARK)?;
        let inner = prompt.strip_prefix(before)?.strip_suffix(after)?;
        // A conversation of several turns has the same two ends: its middle
        // holds the template's own markup, which no user's message does.
        let special = self.inner.get_added_tokens_decoder();
        let markup = [before.trim(), after.trim()]
            .into_iter()
            .chain(special.values().filter(|t| t.special).map(|t| t.content.as_str()))
            .any(|m| !m.is_empty() && inner.contains(m));
        (!markup).then(|| inner.trim().to_string()).filter(|q| !q.is_empty())
    }

    /// A decoder that turns generated ids into text pieces as they arrive.
    pub fn stream(&self) -> TextStream {
        TextStream::default()
    }

    /// The token's bytes as text (lossy), for logprob entries.
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// The token's raw bytes (part of a character where the token holds
    /// one), for logprob entries; an added token's are its text's.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if let Some(t) = self.inner.get_added_tokens_decoder().get(&id) {
            return t.content.as_bytes().to_vec();
        }
        let pieces = bytes::Pieces::of(self.inner.get_decoder());
        self.inner
            .id_to_token(id)
            .and_then(|piece| bytes::piece_bytes(pieces, &piece))
            .unwrap_or_else(|| self.token_text(id).into_bytes())
    }
}

/// Incremental decoding state of one sequence: yields text only once the
/// bytes decode to whole characters, and handles tokenizers whose decoding
/// depends on neighbouring tokens.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl TextStream {
    /// Feeds one id; returns the new text it completes, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, TokenizerError> {
        match self.step(tok, id) {
            Ok(text) => Ok(text),
            // Why: with a byte-fallback tokenizer (Llama-2, Mistral, Gemma),
            // a stray byte after a run of bytes already sent as characters
            // makes the run decode to U+FFFD per byte, rewriting text the
            // client has (tokenizers' "invalid prefix"). What was sent
            // stands; decoding starts afresh at this token, as vLLM does,
            // instead of failing the sequence and every other one in its
            // batch.
            Err(_) => {
                *self = Self::default();
                self.step(tok, id)
            }
        }
    }

    fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>, TokenizerError> {
        tokenizers::tokenizer::step_decode_stream(
            &tok.inner,
            vec![id],
            true,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map_err(tk_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Llama-2-style tokenizer: byte fallback, `▁` for spaces.
    fn byte_fallback() -> Tokenizer {
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": true, "ignore_merges": false,
                "vocab": {"<unk>": 0, "<0xE4>": 1, "<0xBD>": 2, "<0xA0>": 3, "\u{2581}next": 4, "\u{2581}ok": 5},
                "merges": []}
        });
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).expect("written");
        Tokenizer::from_hf_dir(dir.path()).expect("a byte-fallback tokenizer loads")
    }

    #[test]
    fn a_stray_byte_after_a_decoded_character_does_not_fail_the_stream() {
        let tok = byte_fallback();
        let mut stream = tok.stream();
        let mut text = String::new();
        // 你 (E4 BD A0), then a lone E4 that can never complete, then words.
        for id in [1, 2, 3, 1, 4, 5] {
            text.extend(stream.push(&tok, id).expect("decoding never fails a sequence"));
        }
        assert!(text.starts_with("你"), "{text:?}");
        assert!(text.ends_with("next ok"), "{text:?}");
    }
}
