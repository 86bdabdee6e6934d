//! Admission, in two layers. At the door, a bound counted in requests: a
//! request takes a [`QueuePermit`] or is refused at once (429), and gives it
//! back when it ends, however it ends. The bound is `queue.capacity`
//! waiting requests plus `queue.max_running` (as many requests as can run,
//! since each running request holds at least one sequence), so that a burst
//! is refused only once the queue behind the running batch is full. Inside
//! each worker, the running limit counted in sequences:
//! [`allocate`] decides, before every engine step, how many sequences each
//! running request may step, so that what a request does not use — samples
//! IAS did not draw, beams that were pruned — is someone else's at once.

use std::sync::Arc;

use crate::backend::{BackendStatus, ScheduleError};
use crate::metrics::{Metrics, Rejection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

#[derive(Debug, Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    capacity: usize,
}

/// Held by an admitted request until it ends.
#[derive(Debug)]
pub struct QueuePermit {
    _permit: OwnedSemaphorePermit,
}

/// No room: the request must be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

impl Admission {
    /// Room for `capacity` requests in flight (waiting or running).
    pub fn new(capacity: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(capacity)), capacity }
    }

    pub fn try_admit(&self) -> Result<QueuePermit, QueueFull> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Ok(QueuePermit { _permit: permit }),
            Err(TryAcquireError::NoPermits) | Err(TryAcquireError::Closed) => Err(QueueFull),
        }
    }

    /// Admits a request to a backend in `status`, or says why not; every
    /// refusal is counted in the metrics under its reason.
    pub fn admit(
        &self,
        status: BackendStatus,
        model: &str,
        metrics: &Metrics,
        retry_after_secs: u64,
    ) -> Result<QueuePermit, ScheduleError> {
        if let Some((refusal, why)) = status.refusal(model) {
            metrics.rejected(model, why);
            return Err(refusal);
        }
        self.try_admit().map_err(|QueueFull| {
            metrics.rejected(model, Rejection::QueueFull);
            ScheduleError::QueueFull { retry_after_secs }
        })
    }

    /// Requests admitted and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }
}

/// One running request as the allocator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Sequences it holds now.
    pub held: usize,
    /// Sequences it would step now if it could.
    pub wants: usize,
    /// Of those, the ones part-way through their current step (a reasoning
    /// step begun, a prompt being prefilled): taking their sequence away
    /// would stall work already under way.
    pub started: usize,
    /// Sequences it keeps while it runs whatever it wants (a reasoning
    /// request keeps one, so that it can always make progress; a plain
    /// request keeps all of its unfinished choices).
    pub floor: usize,
}

/// Whether holding sequences back for the oldest waiting request, which
/// needs `head_needs` to start, can let it start: only if what the running
/// requests keep whatever happens (their floors) leaves room for it. When
/// the floors alone block it, it starts only once a running request ends
/// (or a plain one finishes choices), and cutting the others down would
/// only make that later.
pub fn reserve_for(claims: &[Claim], limit: usize, head_needs: usize) -> bool {
    let floors: usize = claims.iter().map(|c| c.held.min(c.floor)).sum();
    floors + head_needs <= limit
}

/// What a request keeps before new requests start: everything it wants,
/// or, while sequences are reserved for a waiting request ([`reserve_for`]),
/// only what is part-way through a step (trajectories that have not begun
/// their step yet can wait one). A reserved-for request thus starts within
/// about one reasoning step however many samples the running requests drew;
/// one that the floors block gets no reservation and waits for a request to
/// end, while the running requests keep what they want.
pub fn keep(c: &Claim, reserving: bool) -> usize {
    let keep = if reserving { c.started.max(c.floor) } else { c.wants.max(c.floor) };
    c.held.min(keep)
}

/// New holdings for `claims` under a running limit of `limit` sequences.
///
/// Each request first gives back what it holds beyond `max(wants, floor)`.
/// If `head_needs` is `Some(k)` — the oldest waiting request needs `k`
/// sequences to start — and [`reserve_for`] says holding sequences back
/// can let it start, free sequences are kept for it and nobody grows, so a
/// plain request never waits behind reasoning requests that keep growing
/// into every sequence that comes free. Otherwise the free sequences are
/// shared max-min fairly among the requests that want more: one at a time,
/// to whoever holds the fewest (the oldest on a tie). That fair share is
/// the point: a request's share of each batched step does not depend on
/// how many samples it asked for, so a best-of-64 cannot starve a
/// best-of-2 or a chat request.
pub fn allocate(claims: &[Claim], limit: usize, head_needs: Option<usize>) -> Vec<usize> {
    let mut held: Vec<usize> = claims.iter().map(|c| c.held.min(c.wants.max(c.floor))).collect();
    let used: usize = held.iter().sum();
    let mut free = limit.saturating_sub(used);
    if head_needs.is_some_and(|k| reserve_for(claims, limit, k)) {
        return held;
    }
    while free > 0 {
        let next = claims
            .iter()
            .enumerate()
            .filter(|(i, c)| held[*i] < c.wants)
            .min_by_key(|(i, _)| (held[*i], *i))
            .map(|(i, _)| i);
        let Some(i) = next else { break };
        held[i] += 1;
        free -= 1;
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_counts_requests_and_frees_a_place_when_the_permit_drops() {
        let a = Admission::new(2);
        let p1 = a.try_admit().unwrap();
        let _p2 = a.try_admit().unwrap();
        assert_eq!(a.try_admit().unwrap_err(), QueueFull);
        assert_eq!(a.in_flight(), 2);
        drop(p1);
        assert_eq!(a.in_flight(), 1);
        assert!(a.try_admit().is_ok());
    }

    #[test]
    fn each_refusal_is_counted_under_its_own_reason_and_a_failed_model_is_not_loading() {
        let a = Admission::new(1);
        let metrics = Metrics::new();
        let err = |status| a.admit(status, "m", &metrics, 1).unwrap_err();
        assert_eq!(
            err(BackendStatus::Failed("bad weights".into())),
            ScheduleError::Failed { model: "m".into(), why: "bad weights".into() }
        );
        assert_eq!(err(BackendStatus::Loading), ScheduleError::Loading("m".into()));
        assert_eq!(err(BackendStatus::Restarting), ScheduleError::Restarting("m".into()));
        assert!(matches!(
            err(BackendStatus::Unreachable("refused".into())),
            ScheduleError::Unreachable { .. }
        ));
        let _held = a.admit(BackendStatus::Ready, "m", &metrics, 1).unwrap();
        assert_eq!(err(BackendStatus::Ready), ScheduleError::QueueFull { retry_after_secs: 1 });
        let text = metrics.render();
        for reason in ["failed", "loading", "restarting", "unreachable", "queue_full"] {
            let series = format!("ponder_rejected_requests_total{{model=\"m\",reason=\"{reason}\"}} 1");
            assert!(text.contains(&series), "{series} in {text}");
        }
    }

    fn claim(held: usize, wants: usize, floor: usize) -> Claim {
        Claim { held, wants, started: 0, floor }
    }

    #[test]
    fn while_a_request_waits_running_ones_keep_only_work_under_way() {
        let c = Claim { held: 32, wants: 32, started: 5, floor: 1 };
        assert_eq!(keep(&c, false), 32);
        assert_eq!(keep(&c, true), 5);
        let idle = Claim { held: 32, wants: 32, started: 0, floor: 1 };
        assert_eq!(keep(&idle, true), 1, "a reasoning request keeps its one sequence");
        let plain = Claim { held: 4, wants: 4, started: 4, floor: 4 };
        assert_eq!(keep(&plain, true), 4, "a plain request keeps every unfinished choice");
    }

    #[test]
    fn what_a_request_no_longer_wants_goes_back_at_once() {
        // IAS settled on 2 samples where 64 were held; a pruned beam wants 8 of 64.
        let got = allocate(&[claim(64, 2, 1), claim(0, 0, 1)], 64, None);
        assert_eq!(got, vec![2, 0]);
        let got = allocate(&[claim(64, 8, 1)], 64, None);
        assert_eq!(got, vec![8]);
        // Between steps a reasoning request wants nothing but keeps its one sequence.
        assert_eq!(allocate(&[claim(5, 0, 1)], 64, None), vec![1]);
    }

    #[test]
    fn free_sequences_are_shared_max_min_fairly() {
        // 60 free among a best-of-64 (holding 4) and a best-of-8 (holding 0): the small one gets all it wants.
        let got = allocate(&[claim(4, 64, 1), claim(0, 8, 1)], 64, None);
        assert_eq!(got, vec![56, 8]);
        // Three requests wanting 40 each out of 64: 22, 21, 21 (the oldest first on ties).
        let got = allocate(&[claim(0, 40, 1), claim(0, 40, 1), claim(0, 40, 1)], 64, None);
        assert_eq!(got, vec![22, 21, 21]);
        assert!(got.iter().sum::<usize>() <= 64);
    }

    #[test]
    fn a_waiting_request_at_the_head_stops_growth_until_it_fits() {
        let got = allocate(&[claim(60, 64, 1)], 64, Some(4));
        assert_eq!(got, vec![60], "the 4 free sequences stay free for the head");
        // Nobody holds more than the limit, even when floors add up.
        let got = allocate(&[claim(3, 1, 3)], 4, None);
        assert_eq!(got, vec![3]);
    }

    #[test]
    fn a_head_that_the_running_floors_block_does_not_stop_growth() {
        // A plain request keeps its 4 choices and a reasoning request its 1:
        // a head needing 4 of 8 cannot start until one ends, so nothing is held for it.
        let running = [claim(4, 4, 4), claim(2, 8, 1)];
        assert!(!reserve_for(&running, 8, 4));
        assert_eq!(allocate(&running, 8, Some(4)), vec![4, 4], "the free 2 go to the reasoning request");
        let c = Claim { held: 8, wants: 8, started: 2, floor: 1 };
        assert_eq!(
            keep(&c, reserve_for(&[c], 8, 8)),
            8,
            "nothing is cut for a head of 8 behind a floor of 1"
        );
        // The promise holds where the head fits beside the floors.
        assert!(reserve_for(&running, 8, 3));
        assert_eq!(allocate(&running, 8, Some(3)), vec![4, 2]);
        assert_eq!(keep(&c, reserve_for(&[c], 8, 7)), 2);
    }
}
