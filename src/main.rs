//! The `llmproxy` command: parse arguments, load config, start logging, serve.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use llmproxy::config::{self, Config, Env, LogFormat};
use llmproxy::telemetry::log_writer::{BatchedStderr, FlushGuard};
use tracing_subscriber::EnvFilter;

/// An OpenAI-compatible LLM gateway: point any OpenAI SDK's base_url here.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// YAML config file.
    #[arg(long, short, conflicts_with = "upstream")]
    config: Option<PathBuf>,
    /// Quick start without a file: the upstream base URL, e.g. https://api.openai.com/v1.
    #[arg(long)]
    upstream: Option<String>,
    /// With --upstream: a default header `Name: value` (repeatable); `${VAR}` reads the environment.
    #[arg(long = "header", short = 'H', requires = "upstream")]
    headers: Vec<String>,
    /// Listen address; overrides the config file's `listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Log format; overrides the config file's `log.format`.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Runtime worker threads (default: the cores this process may use; 1
    /// runs tokio's single-threaded scheduler).
    #[arg(long, env = "LLMPROXY_WORKERS", value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
}

#[derive(Subcommand)]
enum Command {
    /// Manage virtual keys in the configured store (needs --config with `store` or `keys`).
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
    /// Usage totals from the configured store, or the last request records.
    Usage {
        /// First UTC day, YYYY-MM-DD (default: 30 days ago).
        #[arg(long)]
        from: Option<String>,
        /// Last UTC day (default: today).
        #[arg(long)]
        to: Option<String>,
        /// Group by `key`, `model` or `day`.
        #[arg(long, value_parser = ["key", "model", "day"])]
        group_by: Option<String>,
        /// Only this key's usage.
        #[arg(long)]
        key_id: Option<String>,
        /// Show the last N request records instead of totals.
        #[arg(long)]
        records: Option<u32>,
    },
    /// Validate a config file and exit (0 when valid, 2 with the problem otherwise).
    CheckConfig {
        /// The YAML file.
        file: PathBuf,
        /// Check the structure only: every `${VAR}` counts as set (for CI
        /// without the real keys); values built from variables are not checked.
        #[arg(long)]
        no_env: bool,
    },
    /// Run the built-in OpenAI-compatible fake upstream.
    MockUpstream {
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Port (0 picks a free one and logs it).
        #[arg(long, default_value_t = 9000)]
        port: u16,
        /// Words per answer (one SSE chunk each when streamed).
        #[arg(long, default_value_t = 20)]
        chunks: usize,
        /// Milliseconds between streamed chunks.
        #[arg(long, default_value_t = 50)]
        delay_ms: u64,
        /// Answer every request with this error status (e.g. 503, 429), to
        /// try retries, fallbacks and circuit breakers offline.
        #[arg(long, value_parser = clap::value_parser!(u16).range(400..600))]
        fail_status: Option<u16>,
        /// The wire format to speak: an upstream of that provider.
        #[arg(long, value_enum, default_value = "all")]
        dialect: llmproxy::mock::MockDialect,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; prints it once (it is stored only as a hash).
    Create {
        /// A name for people.
        #[arg(long)]
        name: String,
        /// Who holds it.
        #[arg(long)]
        owner: Option<String>,
        /// Their team.
        #[arg(long)]
        team: Option<String>,
        /// Allowed public model names, comma-separated (`*` suffix for a prefix); default all.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<u64>,
        /// Tokens per minute.
        #[arg(long)]
        tpm: Option<u64>,
        /// Requests in flight at once.
        #[arg(long)]
        max_concurrent: Option<u64>,
        /// Budget in USD per period.
        #[arg(long)]
        budget_usd: Option<f64>,
        /// The budget's period: 1d, 7d, 30d (default: lifetime).
        #[arg(long)]
        budget_period: Option<String>,
        /// RFC 3339 expiry, e.g. 2027-01-01T00:00:00Z.
        #[arg(long)]
        expires_at: Option<String>,
        /// Streams carry their cost in the final usage chunk.
        #[arg(long)]
        stream_cost: bool,
    },
    /// List every key (never the keys themselves).
    List,
    /// Show one key.
    Show {
        /// The key's id (`key_…`).
        id: String,
    },
    /// Revoke a key: it never works again (within `keys.refresh` on every instance).
    Revoke {
        /// The key's id (`key_…`).
        id: String,
    },
}

#[expect(
    clippy::print_stderr,
    reason = "configuration errors are reported before logging exists"
)]
fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("llmproxy: {message}");
    ExitCode::from(2)
}

#[expect(
    clippy::print_stderr,
    reason = "warnings about the config are shown before logging exists"
)]
fn warn(message: impl std::fmt::Display) {
    eprintln!("llmproxy: warning: {message}");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file, no_env }) => {
            let env: &dyn config::Lookup = if no_env { &config::NoEnv } else { &Env };
            match config::load(&file, env) {
                Ok(config) => {
                    for warning in &config.warnings {
                        warn(warning);
                    }
                    #[expect(clippy::print_stdout, reason = "check-config reports to the terminal")]
                    {
                        let count = |n: usize, one: &str, many: &str| {
                            format!("{n} {}", if n == 1 { one } else { many })
                        };
                        println!(
                            "{}: ok: {}, {}, listen {}{}",
                            file.display(),
                            count(config.upstreams.len(), "upstream", "upstreams"),
                            count(config.models.len(), "model", "models"),
                            config.listen,
                            if no_env {
                                " (structure only: ${VAR} values not checked)"
                            } else {
                                ""
                            },
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(err) => fail(err),
            }
        }
        Some(command @ (Command::Keys { .. } | Command::Usage { .. })) => {
            let Some(path) = &cli.config else {
                return fail("give --config FILE: the store is the one its `store` section names");
            };
            let config = match config::load(path, &Env) {
                Ok(config) => config,
                Err(err) => return fail(err),
            };
            let Some(accounting) = config.accounting else {
                return fail(format_args!(
                    "{}: no store configured: set `store.url` (or `keys.required: true`)",
                    path.display()
                ));
            };
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => return fail(format_args!("cannot start the runtime: {err}")),
            };
            match runtime.block_on(admin_command(command, accounting.store_url.expose())) {
                Ok(value) => {
                    #[expect(clippy::print_stdout, reason = "the command's answer")]
                    {
                        println!("{value:#}");
                    }
                    ExitCode::SUCCESS
                }
                Err(message) => fail(message),
            }
        }
        Some(Command::MockUpstream {
            host,
            port,
            chunks,
            delay_ms,
            fail_status,
            dialect,
        }) => {
            let (_log, _) = init_logging(LogFormat::Text, "info");
            let mock = llmproxy::mock::MockConfig {
                chunks,
                delay: Duration::from_millis(delay_ms),
                fail_status,
                dialect,
            };
            serve_blocking(cli.workers, async move {
                let listener =
                    llmproxy::bind(std::net::SocketAddr::new(host, port), "the mock upstream")?;
                let listen = listener.local_addr()?;
                let provider = match dialect {
                    llmproxy::mock::MockDialect::Anthropic => {
                        "provider: anthropic, base_url: http://{listen}/v1"
                    }
                    llmproxy::mock::MockDialect::Gemini => {
                        "provider: gemini, base_url: http://{listen}/v1beta"
                    }
                    _ => "provider: openai, base_url: http://{listen}/v1",
                }
                .replace("{listen}", &listen.to_string());
                tracing::info!(%listen, chunks, delay_ms, ?dialect, upstream = %provider, "mock upstream serving");
                llmproxy::mock::serve(listener, mock).await
            })
        }
        None => {
            let loaded = match (&cli.config, &cli.upstream) {
                (Some(path), _) => config::load(path, &Env),
                (None, Some(upstream)) => config::from_flags(upstream, &cli.headers, &Env),
                (None, None) => {
                    return fail("give --config FILE or --upstream URL (see --help)");
                }
            };
            let mut config: Config = match loaded {
                Ok(config) => config,
                Err(err) => return fail(err),
            };
            if let Some(listen) = cli.listen {
                config.listen = listen;
            }
            if let Some(format) = cli.log_format {
                config.log_format = format;
            }
            // RUST_LOG overrides log.level; a typo in it must not turn logging off either.
            if let Some(filter) = config::Lookup::get(&Env, "RUST_LOG")
                && let Err(message) = config::check_log_filter(&filter)
            {
                return fail(format_args!("RUST_LOG: {message}"));
            }
            let (_log, writer) = init_logging(config.log_format, &config.log_level);
            let access = tracing::enabled!(target: "llmproxy::access", tracing::Level::INFO);
            if !access {
                warn(
                    "the log filter turns the access log off (it logs at info under llmproxy::access)",
                );
            }
            // Access lines skip tracing's formatter (a fifth of the request
            // path's instructions); the filter's verdict is taken once, here.
            llmproxy::telemetry::access_line::install(
                config.log_format == LogFormat::Json,
                ansi(),
                access,
                writer.clone(),
            );
            for warning in &config.warnings {
                tracing::warn!("{warning}");
            }
            fit_open_file_limit(&mut config.limits);
            serve_blocking(cli.workers, async move {
                let listener = llmproxy::bind(config.listen, "llmproxy")?;
                llmproxy::run(listener, config, signals(writer)).await
            })
        }
    }
}

/// Runs a `keys` or `usage` command against the store at `url`.
async fn admin_command(command: Command, url: &str) -> Result<serde_json::Value, String> {
    use llmproxy::admin::keys;
    let store = llmproxy::store::Store::open(url)
        .await
        .map_err(|err| format!("store: {err}"))?;
    fn text(err: impl std::fmt::Display) -> String {
        err.to_string()
    }
    fn json(value: &impl serde::Serialize) -> Result<serde_json::Value, String> {
        serde_json::to_value(value).map_err(text)
    }
    let value = match command {
        Command::Keys { action } => match action {
            KeysCommand::Create {
                name,
                owner,
                team,
                models,
                rpm,
                tpm,
                max_concurrent,
                budget_usd,
                budget_period,
                expires_at,
                stream_cost,
            } => {
                let spec = keys::KeySpec {
                    name: Some(name),
                    owner: owner.map(Some),
                    team: team.map(Some),
                    metadata: None,
                    models: Some(models),
                    rpm: rpm.map(Some),
                    tpm: tpm.map(Some),
                    max_concurrent: max_concurrent.map(Some),
                    budget_usd: budget_usd.map(Some),
                    budget_period: budget_period.map(Some),
                    expires_at: expires_at.map(Some),
                    stream_cost: Some(stream_cost),
                };
                let (secret, view) = keys::create(&store, spec).await.map_err(text)?;
                serde_json::json!({"key": secret, "info": json(&view)?})
            }
            KeysCommand::List => {
                serde_json::json!({"data": json(&keys::list(&store, None).await.map_err(text)?)?})
            }
            KeysCommand::Show { id } => json(&keys::show(&store, None, &id).await.map_err(text)?)?,
            KeysCommand::Revoke { id } => {
                json(&keys::revoke(&store, None, &id).await.map_err(text)?)?
            }
        },
        Command::Usage {
            from,
            to,
            group_by,
            key_id,
            records,
        } => match records {
            Some(limit) => serde_json::json!({
                "data": json(&keys::records(&store, Some(limit), key_id.as_deref()).await.map_err(text)?)?
            }),
            None => {
                let group_by = group_by
                    .map(|g| serde_json::from_value(serde_json::Value::from(g)))
                    .transpose()
                    .map_err(|e| e.to_string())?;
                let query = keys::UsageQuery {
                    from,
                    to,
                    group_by,
                    key_id,
                };
                keys::totals(&store, query).await.map_err(text)?
            }
        },
        _ => serde_json::Value::Null,
    };
    store.close().await;
    Ok(value)
}

/// Resolves on the first SIGTERM or SIGINT (the graceful drain starts); a
/// second one ends the process at once, as people expect of a server.
fn signals(writer: BatchedStderr) -> impl std::future::Future<Output = ()> {
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    #[expect(
        clippy::disallowed_methods,
        reason = "the signal watcher must outlive the drain it can cut short, so it is not on the tracker the drain waits for"
    )]
    tokio::spawn(async move {
        let mut signals = Signals::new();
        let name = signals.next().await;
        tracing::info!("{name} received");
        let _ = first_tx.send(());
        let name = signals.next().await;
        tracing::warn!("second {name} received: exiting now without finishing the drain");
        writer.flush_now();
        std::process::exit(130);
    });
    async {
        let _ = first_rx.await;
    }
}

/// SIGINT and SIGTERM as one stream of signal names.
struct Signals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        let terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => Some(signal),
                Err(err) => {
                    tracing::error!(%err, "cannot listen for SIGTERM");
                    None
                }
            };
        Self {
            #[cfg(unix)]
            terminate,
        }
    }

    async fn next(&mut self) -> &'static str {
        let ctrl_c = async {
            if let Err(err) = tokio::signal::ctrl_c().await {
                tracing::error!(%err, "cannot listen for SIGINT");
                std::future::pending::<()>().await;
            }
        };
        #[cfg(unix)]
        let terminate = async {
            match self.terminate.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            () = ctrl_c => "SIGINT",
            () = terminate => "SIGTERM",
        }
    }
}

fn serve_blocking(
    workers: Option<u16>,
    server: impl std::future::Future<Output = std::io::Result<()>>,
) -> ExitCode {
    // On one core (a container limit, or `taskset`), the work-stealing
    // scheduler only adds cross-thread wake-ups: run everything on one thread.
    let cores = workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    let mut builder = if cores == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(cores);
        builder
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(format_args!("cannot start the runtime: {err}")),
    };
    match runtime.block_on(server) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// Whether log lines get colours: on a terminal, unless `NO_COLOR` is set.
fn ansi() -> bool {
    std::io::stderr().is_terminal() && config::Lookup::get(&Env, "NO_COLOR").is_none()
}

/// Starts logging to stderr, batched (see `log_writer`); the guard flushes
/// at exit, the writer handle before a forced exit.
fn init_logging(format: LogFormat, level: &str) -> (FlushGuard, BatchedStderr) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let ansi = ansi();
    let (writer, guard) = BatchedStderr::new(Duration::from_millis(100));
    let handle = writer.clone();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    (guard, handle)
}

/// Each client connection holds a socket, and each request in flight may
/// hold an upstream socket (HTTP/2 multiplexes many requests over one client
/// connection), and the default soft limit is often 1024: raise it to the
/// hard limit. When even that cannot carry `max_connections + max_in_flight`,
/// lower both to what it can, so excess clients wait in the listen backlog
/// (or get a 503 for excess streams) instead of failing with 502 when the
/// upstream socket cannot be opened.
fn fit_open_file_limit(limits: &mut llmproxy::config::Limits) {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(err) => {
            tracing::warn!(%err, "cannot raise the open-file limit");
            return;
        }
    };
    // Listener, epoll, stdio and a margin for DNS and logs.
    const RESERVED: u64 = 64;
    let available = usize::try_from(limit.saturating_sub(RESERVED)).unwrap_or(usize::MAX);
    let wanted = limits.max_connections.saturating_add(limits.max_in_flight);
    if wanted > available {
        let half = (available / 2).max(1);
        if limits.defaults_fitted_quietly {
            // The shipped defaults adapt to the machine; only a setting the
            // user chose and cannot have is worth a warning.
            tracing::debug!(
                open_file_limit = limit,
                effective = half,
                "default connection limits fitted to the open-file limit"
            );
            limits.max_connections = limits.max_connections.min(half);
            limits.max_in_flight = limits.max_in_flight.min(half);
            return;
        }
        tracing::warn!(
            open_file_limit = limit,
            max_connections = limits.max_connections,
            max_in_flight = limits.max_in_flight,
            effective = half,
            "limits.max_connections and limits.max_in_flight lowered to what the open-file limit can carry (a socket each)"
        );
        limits.max_connections = limits.max_connections.min(half);
        limits.max_in_flight = limits.max_in_flight.min(half);
    }
}
