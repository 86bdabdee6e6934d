//! What travels from the HTTP side to a worker: an admitted request with its
//! reply channel; and the outbox that holds a request's events until its
//! client has room for them.

use std::time::Instant;

use tokio::sync::mpsc;

use super::admission::QueuePermit;
use crate::backend::{GenEvent, TokenMeter};
use crate::validation::GenerationRequest;

/// An admitted request on its way to a worker.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub request: GenerationRequest,
    pub reply: mpsc::Sender<GenEvent>,
    /// Its place in admission, given back when the job is dropped.
    pub permit: QueuePermit,
    /// When the HTTP request arrived.
    pub received: Instant,
    /// When admission accepted it.
    pub admitted: Instant,
    /// Tokens generated for it so far.
    pub meter: TokenMeter,
}

/// Events waiting for room in a reply channel. Consecutive deltas of one
/// choice merge, so a slow reader costs memory bounded by the request's own
/// output, never blocking the worker.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    events: std::collections::VecDeque<GenEvent>,
}

/// Whether the client still listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    Open,
    Closed,
}

impl Outbox {
    pub(crate) fn push(&mut self, event: GenEvent) {
        // Only the latest progress of a request matters to a slow reader.
        if let (Some(GenEvent::Progress(last)), GenEvent::Progress(p)) = (self.events.back_mut(), &event) {
            *last = *p;
            return;
        }
        if let (
            Some(GenEvent::Delta { choice: last, text, tokens }),
            GenEvent::Delta { choice, text: t2, tokens: k2 },
        ) = (self.events.back_mut(), &event)
            && last == choice
        {
            text.push_str(t2);
            tokens.extend(k2.iter().cloned());
            return;
        }
        self.events.push_back(event);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Sends what the channel has room for.
    pub(crate) fn flush(&mut self, tx: &mpsc::Sender<GenEvent>) -> Delivery {
        while let Some(ev) = self.events.pop_front() {
            match tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.events.push_front(ev);
                    return Delivery::Open;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Delivery::Closed,
            }
        }
        if tx.is_closed() { Delivery::Closed } else { Delivery::Open }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(choice: usize, text: &str) -> GenEvent {
        GenEvent::Delta { choice, text: text.into(), tokens: vec![] }
    }

    #[test]
    fn a_full_channel_keeps_events_merged_in_order_until_there_is_room() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut out = Outbox::default();
        out.push(delta(0, "a"));
        out.push(delta(1, "x"));
        out.push(delta(1, "y"));
        assert_eq!(out.flush(&tx), Delivery::Open);
        assert_eq!(rx.try_recv().unwrap(), delta(0, "a"));
        assert_eq!(out.flush(&tx), Delivery::Open);
        assert_eq!(rx.try_recv().unwrap(), delta(1, "xy"));
        assert!(out.is_empty());
        drop(rx);
        out.push(delta(0, "z"));
        assert_eq!(out.flush(&tx), Delivery::Closed);
    }
}
