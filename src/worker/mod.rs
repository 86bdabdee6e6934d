//! The worker pool: per model, one thread per configured device, each owning
//! its engine (weights and every KV cache) and decoding the sequences of all
//! its running requests together. The HTTP side talks to it through
//! admission permits and a bounded channel of jobs.

pub mod admission;
pub mod job;
pub mod scheduler;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::{DeviceKind, ModelEntry, QueueConfig};
use crate::engine::{Engine, EngineOptions};
use crate::metrics::{Metrics, ModelMetrics};

pub use admission::{Admission, QueueFull, SeqPermit};
pub use job::{GenEvent, GenerationRequest, Job, JobStats, ReasoningReport, TokenOut};
pub use scheduler::{Scheduler, StepReport};

/// Load state of a model's workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolStatus {
    Loading,
    Ready,
    Failed(String),
}

#[derive(Debug, Default)]
struct Shared {
    /// The first loaded engine: its tokenizer and limits serve validation.
    engine: OnceLock<Arc<Engine>>,
    loaded: AtomicUsize,
    failure: Mutex<Option<String>>,
}

/// A served model: admission, its workers' job channels, and their threads.
#[derive(Debug)]
pub struct ModelPool {
    id: String,
    shared: Arc<Shared>,
    senders: Vec<mpsc::Sender<Job>>,
    /// Worker threads; each exits once every job sender is dropped.
    _threads: Vec<JoinHandle<()>>,
    admission: Admission,
    next: AtomicUsize,
}

/// No worker could take the job (its channel closed: shutting down).
#[derive(Debug)]
pub struct DispatchError(pub Box<Job>);

impl ModelPool {
    /// Starts one worker thread per device; each loads its own engine.
    pub fn spawn(entry: &ModelEntry, queue: &QueueConfig, metrics: &Metrics) -> Arc<Self> {
        let shared = Arc::new(Shared::default());
        let total = queue.capacity + queue.max_running;
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for (i, device) in entry.devices.iter().enumerate() {
            // Admission bounds the jobs in flight, so this never fills.
            let (tx, rx) = mpsc::channel(total.max(1));
            senders.push(tx);
            let (entry, shared, mm) = (entry.clone(), shared.clone(), metrics.for_model(&entry.id));
            let (max_running, device) = (queue.max_running, *device);
            let metrics = metrics.clone();
            let handle = std::thread::Builder::new()
                .name(format!("worker-{}-{i}", entry.id))
                .spawn(move || worker_main(entry, device, shared, mm, metrics, max_running, rx))
                .expect("the OS starts a worker thread");
            threads.push(handle);
        }
        Arc::new(Self {
            id: entry.id.clone(),
            shared,
            senders,
            _threads: threads,
            admission: Admission::new(total),
            next: AtomicUsize::new(0),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn status(&self) -> PoolStatus {
        if let Some(f) = self.shared.failure.lock().expect("no panics while holding the lock").clone() {
            return PoolStatus::Failed(f);
        }
        if self.shared.loaded.load(Ordering::Acquire) == self.senders.len() {
            PoolStatus::Ready
        } else {
            PoolStatus::Loading
        }
    }

    /// The model's engine once a worker has loaded it.
    pub fn engine(&self) -> Option<&Arc<Engine>> {
        self.shared.engine.get()
    }

    pub fn admit(&self, sequences: usize) -> Result<SeqPermit, QueueFull> {
        self.admission.try_admit(sequences)
    }

    /// Hands an admitted job to the next worker.
    pub fn dispatch(&self, job: Job) -> Result<(), DispatchError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.senders.len();
        self.senders[i].try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => {
                DispatchError(Box::new(j))
            }
        })
    }
}

fn worker_main(
    entry: ModelEntry,
    device: DeviceKind,
    shared: Arc<Shared>,
    mm: ModelMetrics,
    metrics: Metrics,
    max_running: usize,
    mut rx: mpsc::Receiver<Job>,
) {
    let candle_device = match device {
        DeviceKind::Cpu => candle_core::Device::Cpu,
    };
    let opts = EngineOptions { prefill_chunk: entry.prefill_chunk };
    let started = std::time::Instant::now();
    let engine = match Engine::load(&entry.path, entry.weights, &candle_device, opts) {
        Ok(e) => Arc::new(e),
        Err(e) => {
            let msg = format!("model {:?} ({}): {e}", entry.id, entry.path.display());
            tracing::error!("{msg}");
            *shared.failure.lock().expect("no panics while holding the lock") = Some(msg);
            return;
        }
    };
    let hidden = engine.model().config().hidden;
    let prm: Option<Arc<dyn crate::prm::Scorer>> = match &entry.prm {
        None => None,
        Some(config) => match crate::prm::load(config, hidden, crate::prm::head::HeadOutput::Calibrated) {
            Ok(prm) => Some(prm),
            Err(e) => {
                let msg = format!("model {:?}: PRM: {e}", entry.id);
                tracing::error!("{msg}");
                *shared.failure.lock().expect("no panics while holding the lock") = Some(msg);
                return;
            }
        },
    };
    tracing::info!(model = %entry.id, secs = started.elapsed().as_secs_f64(), prm = prm.is_some(), "model loaded");
    let _ = shared.engine.set(engine.clone());
    shared.loaded.fetch_add(1, Ordering::AcqRel);
    metrics.model_loaded();
    run_worker(Scheduler::new(engine, mm, max_running, prm), &mut rx);
}

/// The worker loop: block while idle, otherwise take every queued job and
/// step. Ends when the channel is closed and nothing is left.
pub fn run_worker(mut sched: Scheduler, rx: &mut mpsc::Receiver<Job>) {
    let mut open = true;
    loop {
        if sched.is_idle() {
            if !open {
                return;
            }
            match rx.blocking_recv() {
                Some(job) => sched.submit(job),
                None => return,
            }
        }
        while open {
            match rx.try_recv() {
                Ok(job) => sched.submit(job),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let has_compute = sched.has_compute();
        sched.step();
        if !has_compute {
            // Only deliveries to slow readers are left: wait for them to read.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
