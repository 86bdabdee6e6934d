//! Wiring: configuration to worker pools to router to socket, and the
//! shutdown sequence (stop accepting, drain with a deadline, stop workers).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::backend::{Backend, BackendStatus};
use crate::config::Config;
use crate::config::{BackendConfig, ServedPrm};
use crate::metrics::Metrics;
use crate::prm::model_prm::{HeadChoice, ModelPrm, ModelPrmOptions};
use crate::remote::RemoteBackend;
use crate::worker::{ModelPool, WorkerOptions};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    ModelLoad(String),
}

/// How long requests abandoned at the drain timeout get to send their 503.
const ANSWER_ABANDONED: Duration = Duration::from_secs(5);

/// Serves `config`'s models on `listener` until `shutdown` resolves, then
/// refuses new requests and lets in-flight ones finish for at most the
/// configured drain timeout.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_with(listener, config, WorkerOptions::default(), shutdown).await
}

/// [`run`] with worker options (tests inject faults through them).
pub async fn run_with(
    listener: TcpListener,
    config: Config,
    options: WorkerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let metrics = Metrics::new();
    let pools: BTreeMap<String, Arc<dyn Backend>> = config
        .models
        .iter()
        .map(|m| {
            let pool: Arc<dyn Backend> = match m.backend {
                BackendConfig::Local => ModelPool::spawn(m, &config.queue, &metrics, options.clone()),
                BackendConfig::Openai(_) => RemoteBackend::spawn(m, &config.queue, &metrics),
            };
            (m.id.clone(), pool)
        })
        .collect();
    let prms = load_prms(&config.prms).await?;
    let drain = Duration::from_secs(config.server.drain_timeout_secs);
    let state = AppState::new(Arc::new(config), metrics, pools).with_prms(prms);
    let app = api::router(state.clone());
    tracing::info!("listening on http://{}", listener.local_addr()?);

    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_state = state.clone();
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: refusing new requests, draining in-flight ones");
        drain_state.start_draining();
        let _ = signalled_tx.send(());
    });
    let deadline = async move {
        if signalled_rx.await.is_ok() {
            tokio::time::sleep(drain).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let serve = serve.into_future();
    tokio::pin!(serve);
    let result = tokio::select! {
        r = &mut serve => r.map_err(ServerError::from),
        _ = deadline => {
            tracing::warn!(secs = drain.as_secs(), "drain timeout reached; answering in-flight requests 503");
            state.abandon_in_flight();
            // Their 503s and error events go out before the process ends.
            if tokio::time::timeout(ANSWER_ABANDONED, &mut serve).await.is_err() {
                tracing::warn!("connections still open after the drain timeout's answers; closing them");
            }
            Ok(())
        }
        failure = watch_loads(state.clone()) => Err(ServerError::ModelLoad(failure)),
    };
    // Workers finish what they hold and exit once every job sender is gone.
    drop(state);
    result
}

/// Loads the PRMs served on `/pooling` (before the server answers).
async fn load_prms(prms: &[ServedPrm]) -> Result<BTreeMap<String, Arc<ModelPrm>>, ServerError> {
    let prms = prms.to_vec();
    tokio::task::spawn_blocking(move || {
        prms.iter()
            .map(|p| {
                let opts = ModelPrmOptions { head: HeadChoice::TwoClass, lora: p.lora.clone() };
                let prm = ModelPrm::load(&p.model, &opts).map_err(|e| {
                    ServerError::ModelLoad(format!("PRM {:?} ({}): {e}", p.id, p.model.display()))
                })?;
                tracing::info!(prm = %p.id, "PRM loaded for /pooling");
                Ok((p.id.clone(), Arc::new(prm)))
            })
            .collect()
    })
    .await
    .map_err(|e| ServerError::ModelLoad(format!("loading PRMs: {e}")))?
}

/// Resolves with the message of the first model that fails to load.
async fn watch_loads(state: AppState) -> String {
    loop {
        for pool in state.models.values() {
            if let BackendStatus::Failed(msg) = pool.status() {
                return msg;
            }
        }
        if state.models.values().all(|p| p.status() == BackendStatus::Ready) {
            return std::future::pending().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
