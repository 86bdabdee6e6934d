//! The local worker pool, one [`Backend`] per served model: per configured
//! device a supervised thread owning its engine (weights and every KV cache)
//! and a [`Scheduler`] that decodes the sequences of all its running
//! requests together. The HTTP side reaches it only through the
//! [`Backend`] seam: a bounded request queue in front, a bounded channel of
//! jobs to the workers, a bounded channel of events back.
//!
//! A worker that panics or whose model fails is restarted: its in-flight
//! requests fail with a generic 500 (their reply channels close), the pool
//! reports [`BackendStatus::Restarting`] while it reloads the model, and
//! requests after the restart are served as before. A reload that fails
//! (or panics) leaves the model [`BackendStatus::Failed`].

pub mod admission;
pub mod job;
mod plain;
pub mod scheduler;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::backend::{Backend, BackendStatus, EventStream, ModelInfo, ScheduleError, Scheduled};
use crate::config::{DeviceKind, ModelEntry, QueueConfig};
use crate::engine::{Engine, EngineOptions};
use crate::metrics::{Metrics, ModelMetrics};

pub use admission::{Admission, QueueFull, QueuePermit};
pub use job::Job;
pub use scheduler::{FailureGuard, Fault, FaultHook, Scheduler, StepError, StepReport};

/// Events buffered between a worker and one response.
const EVENT_CHANNEL: usize = 64;

/// How a pool's workers run.
#[derive(Clone, Default)]
pub struct WorkerOptions {
    /// Test-only: called before every step with work; a returned fault
    /// makes the worker panic or fail as a model error would.
    pub fault: Option<FaultHook>,
    /// Test-only: called on the worker thread after a failure, before the
    /// model is reloaded, while the pool reports restarting; a test blocks
    /// in it to observe that state without racing the reload.
    pub before_reload: Option<ReloadHook>,
}

/// See [`WorkerOptions::before_reload`].
pub type ReloadHook = Arc<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for WorkerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerOptions")
            .field("fault", &self.fault.is_some())
            .field("before_reload", &self.before_reload.is_some())
            .finish()
    }
}

#[derive(Debug, Default)]
struct Shared {
    /// The first loaded engine's tokenizer and limits serve validation.
    info: OnceLock<ModelInfo>,
    /// Workers serving now.
    ready: AtomicUsize,
    /// Workers reloading after a failure.
    restarting: AtomicUsize,
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
    retry_after_secs: u64,
    metrics: Metrics,
    next: AtomicUsize,
}

/// What one worker thread needs.
struct WorkerCtx {
    entry: ModelEntry,
    device: DeviceKind,
    shared: Arc<Shared>,
    mm: ModelMetrics,
    max_running: usize,
    options: WorkerOptions,
}

impl ModelPool {
    /// Starts one supervised worker thread per device; each loads its own engine.
    pub fn spawn(
        entry: &ModelEntry,
        queue: &QueueConfig,
        metrics: &Metrics,
        options: WorkerOptions,
    ) -> Arc<Self> {
        let shared = Arc::new(Shared::default());
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for (i, device) in entry.devices.iter().enumerate() {
            // Admission bounds the jobs in flight, so this never fills.
            let (tx, rx) = mpsc::channel((queue.capacity + queue.max_running).max(1));
            senders.push(tx);
            let ctx = WorkerCtx {
                entry: entry.clone(),
                device: *device,
                shared: shared.clone(),
                mm: metrics.for_model(&entry.id, &device.to_string()),
                max_running: queue.max_running,
                options: options.clone(),
            };
            let name = format!("worker-{}-{i}", entry.id);
            let handle = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || in_own_pool(&name, || supervise(ctx, rx)))
                .expect("the OS starts a worker thread");
            threads.push(handle);
        }
        Arc::new(Self {
            id: entry.id.clone(),
            shared,
            senders,
            _threads: threads,
            admission: Admission::new(queue.capacity + queue.max_running),
            retry_after_secs: queue.retry_after_secs,
            metrics: metrics.clone(),
            next: AtomicUsize::new(0),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Requests admitted and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.admission.in_flight()
    }
}

impl Backend for ModelPool {
    fn status(&self) -> BackendStatus {
        if let Some(f) = self.shared.failure.lock().expect("no panics while holding the lock").clone() {
            return BackendStatus::Failed(f);
        }
        if self.shared.restarting.load(Ordering::Acquire) > 0 {
            return BackendStatus::Restarting;
        }
        if self.shared.ready.load(Ordering::Acquire) == self.senders.len() {
            BackendStatus::Ready
        } else {
            BackendStatus::Loading
        }
    }

    fn model_info(&self) -> Option<ModelInfo> {
        self.shared.info.get().cloned()
    }

    fn schedule(&self, req: Scheduled) -> Result<EventStream, ScheduleError> {
        let permit = self.admission.admit(self.status(), &self.id, &self.metrics, self.retry_after_secs)?;
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL);
        let job = Job {
            id: req.id,
            request: req.generation,
            reply: tx,
            permit,
            received: req.received,
            admitted: Instant::now(),
            meter: req.meter,
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.senders.len();
        self.senders[i].try_send(job).map_err(|_| ScheduleError::Closed)?;
        Ok(EventStream::new(rx))
    }
}

fn load(ctx: &WorkerCtx) -> Result<Scheduler, String> {
    let candle_device = ctx.device.open().map_err(|e| format!("model {:?}: {e}", ctx.entry.id))?;
    let entry = &ctx.entry;
    let opts = EngineOptions { prefill_chunk: entry.prefill_chunk, ..EngineOptions::default() };
    let started = Instant::now();
    let engine = Engine::load(&entry.path, entry.weights, &candle_device, opts)
        .map_err(|e| format!("model {:?} ({}): {e}", entry.id, entry.path.display()))?;
    let engine = Arc::new(engine);
    let hidden = engine.model().config().hidden;
    let prm = match &entry.prm {
        None => None,
        Some(config) => Some(
            crate::prm::load_on(
                config,
                hidden,
                crate::prm::head::HeadOutput::Calibrated,
                &candle_device,
                entry.weights,
            )
            .map_err(|e| format!("model {:?}: PRM: {e}", entry.id))?,
        ),
    };
    tracing::info!(model = %entry.id, secs = started.elapsed().as_secs_f64(), prm = prm.is_some(), "model loaded");
    let _ = ctx.shared.info.set(ModelInfo {
        tokenizer: engine.shared_tokenizer(),
        context_length: engine.model().max_position(),
        detail: crate::backend::TokenDetail::Full,
    });
    let shared = ctx.shared.clone();
    let guard = FailureGuard::new(move || {
        shared.restarting.fetch_add(1, Ordering::AcqRel);
    });
    Ok(Scheduler::new(engine, ctx.mm.clone(), ctx.max_running, prm)
        .with_fault_hook(ctx.options.fault.clone())
        .with_failure_guard(guard))
}

/// Runs `work` on a compute pool of the worker's own. candle's kernels
/// split their loops over the rayon pool of the thread that calls them;
/// called from a thread outside any pool, every kernel of every layer is
/// handed to the global pool and the caller sleeps until it is done — two
/// context switches per kernel, which on a machine with one or two cores
/// cost as much as a layer's attention. Inside its own pool, a worker's
/// kernels run on its threads (on the calling thread alone when the pool
/// has one), and two models' workers no longer queue behind each other in
/// one global pool. The pool's size is the configured `server.threads`
/// (through `RAYON_NUM_THREADS`), or one thread per CPU.
fn in_own_pool(name: &str, work: impl FnOnce() + Send) {
    let label = name.to_string();
    match rayon::ThreadPoolBuilder::new().thread_name(move |i| format!("{label}-compute-{i}")).build() {
        Ok(pool) => pool.install(work),
        Err(e) => {
            tracing::warn!(worker = name, error = %e, "no compute pool of its own; using the global one");
            work();
        }
    }
}

/// Loads the model and runs the worker; when a step panics or fails, fails
/// what the worker held and starts again with a freshly loaded model. Jobs
/// still in the channel wait for the new worker. A load that fails or
/// panics marks the model failed for good and ends the thread.
fn supervise(ctx: WorkerCtx, mut rx: mpsc::Receiver<Job>) {
    let mut restarts = 0u64;
    loop {
        // A panic here would end the thread and leave the model restarting
        // (or loading) for good: it fails the model as a load error does.
        let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| {
            if restarts > 0
                && let Some(hook) = &ctx.options.before_reload
            {
                hook();
            }
            load(&ctx)
        }))
        .unwrap_or_else(|panic| {
            Err(format!("model {:?}: loading panicked: {}", ctx.entry.id, panic_text(&*panic)))
        });
        let sched = match loaded {
            Ok(s) => s,
            Err(msg) => {
                tracing::error!("{msg}");
                *ctx.shared.failure.lock().expect("no panics while holding the lock") = Some(msg);
                return;
            }
        };
        if restarts > 0 {
            ctx.shared.restarting.fetch_sub(1, Ordering::AcqRel);
        }
        ctx.shared.ready.fetch_add(1, Ordering::AcqRel);
        // The scheduler (and every request it holds) is dropped inside the
        // closure, also when it unwinds: each reply channel closes, and its
        // handler answers 500.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run_worker(sched, &mut rx)));
        ctx.shared.ready.fetch_sub(1, Ordering::AcqRel);
        let why = match outcome {
            Ok(Ok(())) => return,
            Ok(Err(e)) => format!("model error: {e}"),
            Err(panic) => format!("panic: {}", panic_text(&*panic)),
        };
        // The scheduler's failure guard has marked the worker restarting.
        restarts += 1;
        ctx.mm.worker_restarts.inc();
        ctx.mm.running.set(0);
        tracing::error!(model = %ctx.entry.id, device = ?ctx.device, %why, restarts, "worker failed; failing its requests and reloading the model");
    }
}

/// A panic's message, where it has one.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-text panic".into())
}

/// The worker loop: block while idle, otherwise take every queued job and
/// step. Ends when the channel is closed and nothing is left.
pub fn run_worker(mut sched: Scheduler, rx: &mut mpsc::Receiver<Job>) -> Result<(), StepError> {
    let mut open = true;
    loop {
        if sched.is_idle() {
            if !open {
                return Ok(());
            }
            match rx.blocking_recv() {
                Some(job) => sched.submit(job),
                None => return Ok(()),
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
        if let Err(e) = sched.step() {
            sched.fail();
            return Err(e);
        }
        if !has_compute {
            // Only deliveries to slow readers are left: wait for them to read.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
