//! Server-sent events in OpenAI's chunk format: role chunks, content
//! deltas, finish chunks, an optional usage chunk, then `data: [DONE]`. An
//! error after the stream has started arrives as an error event.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};

use super::convert::{chat_logprobs, completion_logprobs, ponder_info, usage};
use super::error::ApiError;
use super::middleware::{SummaryCell, update};
use crate::backend::{EventStream, GenEvent, Progress, ReasoningReport, TokenOut, TokenPlace};
use crate::engine::FinishReason;
use crate::validation::{Endpoint, UsageChunk, ValidRequest};
use crate::wire::{
    ChatChunkChoice, ChatCompletionChunk, ChatDelta, Completion, CompletionChoice, PonderField,
    PonderProgress, Usage,
};

/// SSE comments at least this often while nothing else is sent, so that
/// clients and proxies keep a long search's connection open.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What every chunk of one response repeats.
pub(crate) struct StreamCtx {
    pub id: String,
    pub created: u64,
    pub valid: ValidRequest,
    pub summary: SummaryCell,
    /// Fires when the drain timeout runs out with this request in flight.
    pub abandon: super::Abandon,
}

struct State {
    ctx: StreamCtx,
    usage: UsageChunk,
    events: EventStream,
    /// Whether each chat choice has had its `role: assistant` delta.
    announced: Vec<bool>,
    phase: Phase,
    reasoning: Option<Box<ReasoningReport>>,
}

/// What the body phase reads next.
enum Next {
    Event(Option<GenEvent>),
    Abandoned,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Body,
    End,
}

fn data(v: &impl serde::Serialize) -> Event {
    Event::default().data(serde_json::to_string(v).expect("wire types serialise"))
}

impl State {
    fn usage_field(&self, usage: Option<Usage>) -> Option<Option<Usage>> {
        match self.usage {
            UsageChunk::Send => Some(usage),
            UsageChunk::Omit => None,
        }
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> Event {
        self.chat_final(choices, usage, None)
    }

    fn chat_final(
        &self,
        choices: Vec<ChatChunkChoice>,
        usage: Option<Usage>,
        ponder: Option<PonderField>,
    ) -> Event {
        let usage = match ponder {
            Some(PonderField::Done(_)) => Some(usage),
            _ => self.usage_field(usage),
        };
        data(&ChatCompletionChunk {
            id: self.ctx.id.clone(),
            object: "chat.completion.chunk",
            created: self.ctx.created,
            model: self.ctx.valid.model.clone(),
            choices,
            usage,
            ponder,
        })
    }

    fn completion_chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> Event {
        self.completion_final(choices, usage, None)
    }

    fn completion_final(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<Usage>,
        ponder: Option<PonderField>,
    ) -> Event {
        let usage = match ponder {
            Some(PonderField::Done(_)) => Some(usage),
            _ => self.usage_field(usage),
        };
        data(&Completion {
            id: self.ctx.id.clone(),
            object: "text_completion",
            created: self.ctx.created,
            model: self.ctx.valid.model.clone(),
            choices,
            usage,
            ponder,
        })
    }

    fn chunk(
        &mut self,
        index: usize,
        text: String,
        tokens: &[TokenOut],
        finish: Option<FinishReason>,
    ) -> Event {
        // A chunk whose tokens all lie in the stop string carries none.
        let want_logprobs = self.ctx.valid.generation.logprobs.is_some()
            && tokens.iter().any(|t| t.place == TokenPlace::Text);
        match self.ctx.valid.endpoint {
            Endpoint::Chat => {
                let role = (!std::mem::replace(&mut self.announced[index], true)).then_some("assistant");
                let delta =
                    ChatDelta { role, content: (!text.is_empty() || finish.is_none()).then_some(text) };
                let choice = ChatChunkChoice {
                    index,
                    delta,
                    logprobs: want_logprobs.then(|| chat_logprobs(tokens)),
                    finish_reason: finish.map(FinishReason::openai),
                };
                self.chat_chunk(vec![choice], None)
            }
            Endpoint::Completion => {
                let logprobs = want_logprobs.then(|| completion_logprobs(tokens));
                let choice = CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason: finish.map(FinishReason::openai),
                    stop_reason: finish
                        .and_then(|f| super::generate::stop_string(&self.ctx.valid.generation.stop, f)),
                    token_ids: (self.ctx.valid.generation.token_ids == crate::validation::TokenIds::Return)
                        .then(|| tokens.iter().map(|t| t.id).collect()),
                };
                self.completion_chunk(vec![choice], None)
            }
        }
    }

    /// An OpenAI-shaped chunk with no choices and the search's progress.
    fn progress_chunk(&self, p: Progress) -> Event {
        let ponder = Some(PonderField::Progress(PonderProgress {
            status: "searching",
            samples: p.samples,
            live: p.live,
            budget: p.budget,
            best_success_probability: p.best,
            tokens_generated: p.tokens,
            steps: p.steps,
        }));
        match self.ctx.valid.endpoint {
            Endpoint::Chat => self.chat_final(Vec::new(), None, ponder),
            Endpoint::Completion => self.completion_final(Vec::new(), None, ponder),
        }
    }

    /// The backend's next event, unless the server gives up on requests in
    /// flight first.
    async fn next_event(&mut self) -> Next {
        tokio::select! {
            e = self.events.next() => Next::Event(e),
            () = self.ctx.abandon.signalled() => Next::Abandoned,
        }
    }

    async fn next_events(&mut self) -> Vec<Event> {
        match self.phase {
            Phase::Start => {
                self.phase = Phase::Body;
                // A search learns how many distinct answers it has only at
                // the end, so its choices announce their role with their text.
                let searching = self.ctx.valid.generation.reasoning.is_some();
                if self.ctx.valid.endpoint == Endpoint::Chat && !searching {
                    self.announced.fill(true);
                    let roles = (0..self.announced.len())
                        .map(|index| ChatChunkChoice {
                            index,
                            delta: ChatDelta { role: Some("assistant"), content: Some(String::new()) },
                            logprobs: None,
                            finish_reason: None,
                        })
                        .collect();
                    return vec![self.chat_chunk(roles, None)];
                }
                Vec::new()
            }
            Phase::Body => match self.next_event().await {
                Next::Abandoned => {
                    self.phase = Phase::End;
                    tracing::warn!(request = %self.ctx.id, "drain timeout: a streaming request ended unfinished");
                    vec![data(&ApiError::DrainTimeout.body()), Event::default().data("[DONE]")]
                }
                Next::Event(event) => self.body_events(event),
            },
            Phase::End => Vec::new(),
        }
    }

    /// The chunks one backend event becomes.
    fn body_events(&mut self, event: Option<GenEvent>) -> Vec<Event> {
        match event {
            Some(GenEvent::Progress(p)) => vec![self.progress_chunk(p)],
            Some(GenEvent::Reasoning(r)) => {
                self.reasoning = Some(r);
                Vec::new()
            }
            Some(GenEvent::Delta { choice, text, tokens }) => {
                vec![self.chunk(choice, text, &tokens, None)]
            }
            Some(GenEvent::Finished { choice, reason }) => {
                vec![self.chunk(choice, String::new(), &[], Some(reason))]
            }
            Some(GenEvent::Done(stats)) => {
                self.phase = Phase::End;
                update(&self.ctx.summary, |s| {
                    s.prompt_tokens = stats.prompt_tokens;
                    s.completion_tokens = stats.completion_tokens;
                    s.queue_secs = Some(stats.queue_secs);
                    s.ttft_secs = stats.ttft_secs;
                });
                let usage = usage(&stats, self.reasoning.as_deref());
                let ponder = self.reasoning.as_deref().map(|r| PonderField::Done(ponder_info(r)));
                let mut out = Vec::new();
                // A reasoning request always ends with its figures and usage.
                if self.usage == UsageChunk::Send || ponder.is_some() {
                    out.push(match self.ctx.valid.endpoint {
                        Endpoint::Chat => self.chat_final(Vec::new(), Some(usage), ponder),
                        Endpoint::Completion => self.completion_final(Vec::new(), Some(usage), ponder),
                    });
                }
                out.push(Event::default().data("[DONE]"));
                out
            }
            Some(GenEvent::Failed) | None => {
                self.phase = Phase::End;
                let err = ApiError::Internal(format!("worker failed request {}", self.ctx.id));
                tracing::error!(request = %self.ctx.id, "worker failed a streaming request");
                vec![data(&err.body()), Event::default().data("[DONE]")]
            }
            Some(GenEvent::Upstream(f)) => {
                self.phase = Phase::End;
                let err = ApiError::from(f);
                vec![data(&err.body()), Event::default().data("[DONE]")]
            }
        }
    }
}

fn events(state: State) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(state, |mut st| async move {
        if st.phase == Phase::End {
            return None;
        }
        let evs = st.next_events().await;
        Some((evs, st))
    })
    .flat_map(|evs| stream::iter(evs.into_iter().map(Ok)))
}

pub(crate) fn sse(ctx: StreamCtx, usage: UsageChunk, events: EventStream) -> Response {
    let choices = ctx.valid.generation.choices();
    let state =
        State { ctx, usage, events, announced: vec![false; choices], phase: Phase::Start, reasoning: None };
    Sse::new(self::events(state)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response()
}
