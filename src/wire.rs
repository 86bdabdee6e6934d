//! OpenAI wire types: what clients send and receive, exactly as JSON has
//! them. Validation turns requests into internal types; nothing else reads
//! these. Fields OpenAI defines that ponder does not act on are declared
//! where a value of them asks for something ponder cannot do (validation
//! refuses it) or has a range to check; other unknown fields are skipped.
//! ponder's own `reasoning` object refuses unknown fields, since a misspelt
//! knob would silently run the defaults.

use serde::{Deserialize, Serialize};

/// An optional integer as JSON Schema defines one: `416` and `416.0` alike
/// (some clients serialise every number as a float); `2.5` is a type error.
fn integral<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    struct Visit;
    impl<'de> serde::de::Visitor<'de> for Visit {
        type Value = Option<i64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an integer between -2^63 and 2^63 - 1")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            i64::try_from(v)
                .map(Some)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
            // Exactly representable integers only; 2^63 itself is out of range.
            if v.is_finite() && v.fract() == 0.0 && v.abs() < 9.223_372_036_854_776e18 {
                Ok(Some(v as i64))
            } else {
                Err(E::invalid_type(serde::de::Unexpected::Float(v), &self))
            }
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: serde::Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_any(self)
        }
    }
    d.deserialize_option(Visit)
}

/// An integer inside an array (a token id), read as [`integral`] reads a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Integral(pub i64);

impl<'de> Deserialize<'de> for Integral {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        integral(d)?
            .map(Integral)
            .ok_or_else(|| serde::de::Error::invalid_type(serde::de::Unexpected::Unit, &"an integer"))
    }
}

/// A struct read from a JSON object only: serde's derived structs also read
/// an array of their fields in order, so `"reasoning": ["beam"]` would run a
/// beam search and `"stream_options": [true]` would turn usage on.
struct ObjectOnly<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData)).map(ObjectOnly)
    }
}

/// An optional object (null or absent: `None`).
fn object<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<ObjectOnly<T>>::deserialize(d).map(|o| o.map(|x| x.0))
}

/// An array of objects.
fn objects<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Vec::<ObjectOnly<T>>::deserialize(d).map(|v| v.into_iter().map(|x| x.0).collect())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum StopWire {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Copy, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or an array of content parts")]
pub enum ContentWire {
    Text(String),
    #[serde(deserialize_with = "objects")]
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct MessageWire {
    pub role: String,
    #[serde(default)]
    pub content: Option<ContentWire>,
}

/// Declares a request type with the fields both endpoints share. (Not
/// `#[serde(flatten)]`: flattening loses the field path in type errors,
/// which the error's `param` reports.) Integers are signed so that a
/// negative value gets a range error naming the field, not a type error.
macro_rules! request_with_sampling {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Deserialize)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            #[serde(default, deserialize_with = "integral")]
            pub max_tokens: Option<i64>,
            #[serde(default)]
            pub temperature: Option<f64>,
            #[serde(default)]
            pub top_p: Option<f64>,
            /// Not OpenAI's, but vLLM's and TGI's; 0 or -1 disables it.
            #[serde(default, deserialize_with = "integral")]
            pub top_k: Option<i64>,
            #[serde(default, deserialize_with = "integral")]
            pub n: Option<i64>,
            #[serde(default, deserialize_with = "integral")]
            pub seed: Option<i64>,
            #[serde(default)]
            pub stop: Option<StopWire>,
            #[serde(default)]
            pub stream: Option<bool>,
            #[serde(default, deserialize_with = "object")]
            pub stream_options: Option<StreamOptions>,
            #[serde(default)]
            pub user: Option<String>,
            /// Range-checked as OpenAI does, not applied (README says so).
            #[serde(default)]
            pub presence_penalty: Option<f64>,
            #[serde(default)]
            pub frequency_penalty: Option<f64>,
            /// Token id (as a string) to a bias in -100..=100; ponder applies
            /// none, so a non-empty map is refused rather than ignored.
            #[serde(default)]
            pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
            /// ponder's adaptive reasoning (OpenAI clients send it through `extra_body`).
            #[serde(default, deserialize_with = "object")]
            pub reasoning: Option<ReasoningWire>,
        }
    };
}

/// The `reasoning` request object; absent fields take the model's defaults.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReasoningWire {
    #[serde(default)]
    pub strategy: Option<crate::reasoning::Strategy>,
    #[serde(default)]
    pub adaptive: Option<bool>,
    #[serde(default, deserialize_with = "integral")]
    pub max_samples: Option<i64>,
    #[serde(default)]
    pub confidence: Option<f64>,
    #[serde(default)]
    pub budget_quantile: Option<f64>,
    #[serde(default)]
    pub budget_rule: Option<crate::reasoning::BudgetRule>,
    #[serde(default, deserialize_with = "integral")]
    pub round_size: Option<i64>,
    #[serde(default)]
    pub give_up_gain: Option<f64>,
    #[serde(default)]
    pub give_up_plausible: Option<f64>,
    #[serde(default, deserialize_with = "integral")]
    pub beam_width: Option<i64>,
    #[serde(default, deserialize_with = "integral")]
    pub beams: Option<i64>,
    #[serde(default, deserialize_with = "integral")]
    pub prune_every: Option<i64>,
    #[serde(default, deserialize_with = "integral")]
    pub max_step_tokens: Option<i64>,
    #[serde(default, deserialize_with = "integral")]
    pub max_steps: Option<i64>,
    #[serde(default)]
    pub select: Option<crate::reasoning::Select>,
    #[serde(default)]
    pub return_candidates: Option<bool>,
}

request_with_sampling! {
    pub struct ChatCompletionRequest {
        pub model: String,
        #[serde(deserialize_with = "objects")]
        pub messages: Vec<MessageWire>,
        #[serde(default, deserialize_with = "integral")]
        pub max_completion_tokens: Option<i64>,
        #[serde(default)]
        pub logprobs: Option<bool>,
        #[serde(default, deserialize_with = "integral")]
        pub top_logprobs: Option<i64>,
        /// Accepted: the model answers in text and never calls a tool,
        /// which `tool_choice` `auto` allows.
        #[serde(default)]
        pub tools: Option<Vec<serde_json::Value>>,
        #[serde(default)]
        pub tool_choice: Option<ToolChoiceWire>,
        #[serde(default, deserialize_with = "object")]
        pub response_format: Option<ResponseFormatWire>,
    }
}

/// `tool_choice`: a mode, or the one function the model must call.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string (none, auto, required) or an object naming a function")]
pub enum ToolChoiceWire {
    Mode(String),
    Function(serde_json::Map<String, serde_json::Value>),
}

/// `response_format`; only its type matters to ponder.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseFormatWire {
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, an array of strings, an array of token ids or an array of arrays of token ids"
)]
pub enum PromptWire {
    One(String),
    Many(Vec<String>),
    /// One prompt as token ids (as OpenAI and vLLM accept).
    Tokens(Vec<Integral>),
    /// Several prompts as token ids.
    ManyTokens(Vec<Vec<Integral>>),
}

request_with_sampling! {
    pub struct CompletionRequest {
        pub model: String,
        pub prompt: PromptWire,
        /// Alternatives per token (0..=limit); absent means no logprobs.
        #[serde(default, deserialize_with = "integral")]
        pub logprobs: Option<i64>,
        /// vLLM's extension: each choice carries its token ids.
        #[serde(default)]
        pub return_token_ids: Option<bool>,
        /// OpenAI's legacy fields ponder does not implement: refused when
        /// they ask for something (`echo: true`, a `suffix`, `best_of` > n).
        #[serde(default)]
        pub echo: Option<bool>,
        #[serde(default)]
        pub suffix: Option<String>,
        #[serde(default, deserialize_with = "integral")]
        pub best_of: Option<i64>,
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct CompletionTokensDetails {
    /// Generated tokens not in the returned answers.
    pub reasoning_tokens: usize,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Every generated token: what the request cost.
    pub completion_tokens: usize,
    pub total_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            completion_tokens_details: None,
        }
    }

    pub fn with_reasoning(mut self, reasoning_tokens: usize) -> Self {
        self.completion_tokens_details = Some(CompletionTokensDetails { reasoning_tokens });
        self
    }
}

/// A candidate answer with its PRM estimate (`return_candidates`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CandidateOut {
    pub text: String,
    pub answer: String,
    pub score: Option<crate::prm::Quantiles>,
    pub tokens: usize,
    pub steps: usize,
}

/// What adaptive reasoning spent and saved on one request.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PonderInfo {
    pub strategy: crate::reasoning::Strategy,
    pub adaptive: bool,
    /// The rule that set the budget (null for a fixed budget).
    pub budget_rule: Option<crate::reasoning::BudgetRule>,
    /// Why it stopped drawing: `budget`, `confident`, `gave_up` or `exhausted`.
    pub stop_reason: crate::reasoning::Stop,
    /// It stopped because the question looked hopeless (`give_up`).
    pub gave_up: bool,
    /// Rounds of samples (best-of-N) or narrow searches (beam).
    pub rounds: usize,
    pub select: crate::reasoning::Select,
    pub samples: usize,
    pub fixed_samples: usize,
    pub tokens_generated: usize,
    pub fixed_tokens_estimate: usize,
    pub tokens_saved: usize,
    pub prm_evaluations: usize,
    pub success_probability_start: Option<crate::prm::Quantiles>,
    pub success_probability_selected: Option<crate::prm::Quantiles>,
    pub steps: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidates: Option<Vec<CandidateOut>>,
}

/// Where a streamed reasoning request stands, sent after each reasoning step.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PonderProgress {
    /// Always `"searching"` (the final chunk's object has `strategy` instead).
    pub status: &'static str,
    pub samples: usize,
    pub live: usize,
    pub budget: usize,
    pub best_success_probability: Option<crate::prm::Quantiles>,
    pub tokens_generated: usize,
    pub steps: usize,
}

/// The `ponder` field of a response or chunk: the final figures, or progress.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum PonderField {
    Done(PonderInfo),
    Progress(PonderProgress),
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ponder: Option<PonderInfo>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ponder: Option<PonderField>,
}

/// The legacy completions logprobs layout.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// As vLLM: the stop string that ended the choice (absent otherwise),
    /// so a client can tell a stop string from the end of generation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// With `return_token_ids`: the ids of the choice's tokens (in a
    /// stream, of this chunk's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ponder: Option<PonderField>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Prompt plus generated tokens fit in this many positions (as vLLM
    /// reports it); absent while the model loads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(extra: &str) -> Result<ChatCompletionRequest, serde_json::Error> {
        serde_json::from_str(&format!(r#"{{"model": "m", "messages": [] {extra}}}"#))
    }

    #[test]
    fn integral_json_numbers_are_integers_and_fractions_are_not() {
        let r = chat(r#", "max_tokens": 416.0, "n": 2.0, "reasoning": {"max_samples": 8.0}"#).unwrap();
        assert_eq!((r.max_tokens, r.n), (Some(416), Some(2)));
        assert_eq!(r.reasoning.unwrap().max_samples, Some(8));
        assert_eq!(chat(r#", "n": null"#).unwrap().n, None);
        assert_eq!(chat(r#", "seed": -3"#).unwrap().seed, Some(-3));
        let err = chat(r#", "n": 2.5"#).unwrap_err().to_string();
        assert!(err.contains("2.5") && err.contains("integer"), "{err}");
        assert!(chat(r#", "max_tokens": 1e300"#).is_err());
        assert!(chat(r#", "n": "2""#).is_err());
        let prompt = |p: &str| {
            serde_json::from_str::<CompletionRequest>(&format!(r#"{{"model": "m", "prompt": {p}}}"#))
        };
        assert!(
            matches!(prompt("[1.0, 2]").unwrap().prompt, PromptWire::Tokens(t) if t == [Integral(1), Integral(2)])
        );
        assert!(
            matches!(prompt("[[3.0]]").unwrap().prompt, PromptWire::ManyTokens(t) if t == [[Integral(3)]])
        );
        assert!(prompt("[1.5]").is_err());
        assert!(prompt("[null]").is_err());
    }

    #[test]
    fn fractions_parse_to_the_nearest_double_so_a_value_just_below_a_limit_stays_below_it() {
        // serde_json's default float parser may land one ulp off; with
        // `float_roundtrip` the largest double below 1 is not read as 1 and
        // then refused as "confidence must be greater than 0 and less than 1,
        // got 1".
        let r = chat(r#", "reasoning": {"confidence": 0.9999999999999999}"#).unwrap();
        let c = r.reasoning.unwrap().confidence.unwrap();
        assert_eq!(c, 0.999_999_999_999_999_9_f64);
        assert!(c < 1.0);
        let r = chat(r#", "temperature": 0.30000000000000004, "top_p": 2.2250738585072014e-308"#).unwrap();
        assert_eq!(
            (r.temperature, r.top_p),
            (Some(0.300_000_000_000_000_04), Some(2.225_073_858_507_201_4e-308))
        );
    }
}

/// vLLM's `POST /pooling` request, as ponder answers it for its PRMs.
#[derive(Debug, Clone, Deserialize)]
pub struct PoolingRequest {
    pub model: String,
    /// Formatted text (with `<extra_0>` step tags) or token ids, one or many.
    pub input: PromptWire,
    /// `token_classify` (vLLM's current name) or `reward` (its older one).
    #[serde(default)]
    pub task: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolingItem {
    pub index: usize,
    pub object: &'static str,
    /// `[p_bad, p_good]` at each step tag.
    pub data: Vec<[f32; 2]>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolingResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub data: Vec<PoolingItem>,
    pub usage: PoolingUsage,
}
