//! Admission: a bounded count of sequences per model. A request takes one
//! permit per sequence (`n` counts n) or is refused at once; the permits go
//! back when the request's [`SeqPermit`] is dropped, however it ends.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

#[derive(Debug, Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    capacity: usize,
}

/// Held by an admitted request until it completes or is cancelled.
#[derive(Debug)]
pub struct SeqPermit {
    _permit: OwnedSemaphorePermit,
    sequences: usize,
}

impl SeqPermit {
    pub fn sequences(&self) -> usize {
        self.sequences
    }
}

/// No room: the request must be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

impl Admission {
    /// Room for `capacity` sequences (waiting and running together).
    pub fn new(capacity: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(capacity)), capacity }
    }

    pub fn try_admit(&self, sequences: usize) -> Result<SeqPermit, QueueFull> {
        let n = u32::try_from(sequences).map_err(|_| QueueFull)?;
        if sequences > self.capacity {
            return Err(QueueFull);
        }
        match self.permits.clone().try_acquire_many_owned(n) {
            Ok(permit) => Ok(SeqPermit { _permit: permit, sequences }),
            Err(TryAcquireError::NoPermits) | Err(TryAcquireError::Closed) => Err(QueueFull),
        }
    }

    /// Sequences admitted and not yet released.
    pub fn in_use(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_counts_sequences_and_releases_them_when_the_permit_drops() {
        let a = Admission::new(5);
        let p3 = a.try_admit(3).unwrap();
        assert_eq!(a.try_admit(3).unwrap_err(), QueueFull);
        let p2 = a.try_admit(2).unwrap();
        assert_eq!(a.in_use(), 5);
        drop(p3);
        assert_eq!(a.in_use(), 2);
        assert!(a.try_admit(3).is_ok());
        drop(p2);
        assert_eq!(a.try_admit(6).unwrap_err(), QueueFull, "more than the capacity never fits");
    }
}
