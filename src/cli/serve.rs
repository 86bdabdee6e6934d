//! `ponder serve`: load the configuration, bind, serve until SIGTERM/SIGINT.

use std::path::PathBuf;

use clap::Args;

use crate::config::{Config, LogFormat, Overrides};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file (defaults are built in; see config/ponder.toml).
    #[arg(long, env = "PONDER_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on; 0 picks a free one (logged at start-up).
    #[arg(long)]
    port: Option<u16>,
    /// Accepted API key (repeatable); replaces the configured keys.
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// Serve a model as ID=PATH (repeatable); replaces the configured models.
    #[arg(long = "model", value_parser = parse_model)]
    models: Vec<(String, PathBuf)>,
    #[arg(long, value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    /// Print the effective configuration (keys redacted) and exit.
    #[arg(long)]
    print_config: bool,
}

fn parse_model(s: &str) -> Result<(String, PathBuf), String> {
    let (id, path) = s.split_once('=').ok_or_else(|| format!("expected ID=PATH, got {s:?}"))?;
    if id.is_empty() || path.is_empty() {
        return Err(format!("expected ID=PATH, got {s:?}"));
    }
    Ok((id.to_string(), PathBuf::from(path)))
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("expected text or json, got {other:?}")),
    }
}

fn init_logging(cfg: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.logging.level)
        .map_err(|e| anyhow::anyhow!("logging.level {:?}: {e}", cfg.logging.level))?;
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cfg.logging.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

pub fn run(args: ServeArgs, threads_flag: Option<usize>) -> anyhow::Result<()> {
    let overrides = Overrides {
        host: args.host,
        port: args.port,
        api_keys: args.api_keys,
        models: args.models,
        log_format: args.log_format,
        threads: threads_flag,
    };
    let config = Config::load(args.config.as_deref(), std::env::vars(), &overrides)?;
    if args.print_config {
        print!("{}", config.to_redacted_toml());
        return Ok(());
    }
    config.check_model_files()?;
    if config.server.threads > 0 {
        super::set_threads(config.server.threads);
    }
    init_logging(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", config.server.host, config.server.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        crate::server::run(listener, config, shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}
