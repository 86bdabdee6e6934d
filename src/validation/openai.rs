//! OpenAI's range check of the penalties, and the fields ponder does not
//! act on: each is accepted where its value asks nothing ponder cannot do,
//! and refused with the field named where a client relies on it: a forced
//! tool call, structured output, a logit bias, an echo, a suffix, more
//! candidates than answers.

use super::ValidationError;
use crate::wire::{
    ChatCompletionRequest, CompletionRequest, ResponseFormatWire, StreamOptions, ToolChoiceWire,
};

/// OpenAI's range for `presence_penalty` and `frequency_penalty`.
const PENALTY: std::ops::RangeInclusive<f64> = -2.0..=2.0;

/// The fields both endpoints share.
pub(super) fn check_common(
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<&std::collections::BTreeMap<String, f64>>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
) -> Result<(), ValidationError> {
    for (param, v) in [("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)] {
        if let Some(v) = v.filter(|v| !PENALTY.contains(v)) {
            return Err(ValidationError::new(
                param,
                format!("{param} must be between {} and {}, got {v}", PENALTY.start(), PENALTY.end()),
            ));
        }
    }
    if let Some((token, _)) = logit_bias.and_then(|b| b.iter().next()) {
        return Err(ValidationError::new(
            "logit_bias",
            format!(
                "logit_bias is not supported: ponder cannot bias token {token}; send an empty object or leave it out"
            ),
        ));
    }
    if stream_options.is_some() && stream != Some(true) {
        return Err(ValidationError::new(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    Ok(())
}

pub(super) fn check_chat(req: &ChatCompletionRequest) -> Result<(), ValidationError> {
    check_common(
        req.presence_penalty,
        req.frequency_penalty,
        req.logit_bias.as_ref(),
        req.stream,
        req.stream_options,
    )?;
    let forced = match &req.tool_choice {
        None => false,
        Some(ToolChoiceWire::Mode(m)) if m == "none" || m == "auto" => false,
        Some(ToolChoiceWire::Mode(m)) if m == "required" => true,
        Some(ToolChoiceWire::Function(_)) => true,
        Some(ToolChoiceWire::Mode(m)) => {
            return Err(ValidationError::new(
                "tool_choice",
                format!("tool_choice must be \"none\", \"auto\" or \"required\", got {m:?}"),
            ));
        }
    };
    if forced {
        return Err(ValidationError::new(
            "tool_choice",
            "tool calls are not supported: the model answers in text and never calls a tool; \
             tool_choice must be \"none\" or \"auto\"",
        ));
    }
    match &req.response_format {
        None => Ok(()),
        Some(ResponseFormatWire { kind }) if kind == "text" => Ok(()),
        Some(ResponseFormatWire { kind }) if kind == "json_object" || kind == "json_schema" => {
            Err(ValidationError::new(
                "response_format",
                format!(
                    "structured output is not supported: ponder cannot hold the answer to {kind}; use type \"text\""
                ),
            ))
        }
        Some(ResponseFormatWire { kind }) => Err(ValidationError::new(
            "response_format.type",
            format!(
                "response_format.type must be \"text\", \"json_object\" or \"json_schema\", got {kind:?}"
            ),
        )),
    }
}

pub(super) fn check_completion(req: &CompletionRequest) -> Result<(), ValidationError> {
    check_common(
        req.presence_penalty,
        req.frequency_penalty,
        req.logit_bias.as_ref(),
        req.stream,
        req.stream_options,
    )?;
    if req.echo == Some(true) {
        return Err(ValidationError::new(
            "echo",
            "echo is not supported: the choices hold the completion only; prepend the prompt yourself",
        ));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ValidationError::new(
            "suffix",
            "suffix is not supported: ponder completes after the prompt only",
        ));
    }
    let n = req.n.unwrap_or(1);
    match req.best_of {
        Some(b) if b != n => Err(ValidationError::new(
            "best_of",
            format!(
                "best_of other than n is not supported (use the reasoning object to choose among samples); \
                 got best_of {b} with n {n}"
            ),
        )),
        _ => Ok(()),
    }
}
