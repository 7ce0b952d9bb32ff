//! Configuration: the YAML file (or the quick-start flags), `${VAR}`
//! interpolation, and validation into the runtime [`Config`].
//!
//! Parsing happens in two steps. The `*File` structs mirror the YAML exactly
//! (unknown keys rejected, every error names the field path). [`resolve`]
//! then interpolates secrets, parses URLs and header names, and produces the
//! types the proxy runs on, so nothing on the request path re-validates.
//! Environment lookups go through [`Lookup`], so tests never touch the
//! process environment.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use serde::Deserialize;

use crate::headers::DefaultHeaders;

/// Where configuration values that name `${VAR}` are looked up.
pub trait Lookup {
    /// The variable's value, or `None` when it is not set.
    fn get(&self, name: &str) -> Option<String>;

    /// Whether values are stand-ins (`check-config --no-env`): then a value
    /// built from `${VAR}` is not checked beyond its structure.
    fn placeholder(&self) -> bool {
        false
    }
}

/// `check-config --no-env`: every variable is "set" to a stand-in, so a
/// config's structure can be checked in CI without its real keys.
pub struct NoEnv;

impl Lookup for NoEnv {
    fn get(&self, _name: &str) -> Option<String> {
        Some("no-env-placeholder-value".to_owned())
    }

    fn placeholder(&self) -> bool {
        true
    }
}

/// The process environment.
pub struct Env;

impl Lookup for Env {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Lookup for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// A configuration problem, always naming where it is (file or flag) and which field.
///
/// Messages never show a value: they name the field and say what is wrong.
/// As a second line of defence, every error leaving [`resolve`] or
/// [`from_flags`] is scrubbed of every value read from the environment and
/// every header value ([`Secrets`]), so even a message written carelessly
/// cannot print a key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The I/O failure.
        source: std::io::Error,
    },
    /// A field is missing, unknown, or has a bad value.
    #[error("{origin}: {field}: {message}")]
    Invalid {
        /// The file path, or `command line`.
        origin: String,
        /// The field path, e.g. `upstream.default_headers.Authorization`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    /// This error with every known secret replaced by `*****`.
    fn scrubbed(self, secrets: &Secrets) -> Self {
        match self {
            Self::Invalid {
                origin,
                field,
                message,
            } => Self::Invalid {
                origin,
                field: secrets.scrub(field),
                message: secrets.scrub(message),
            },
            read @ Self::Read { .. } => read,
        }
    }
}

/// Values that must never appear in an error: what `${VAR}` resolved to,
/// and header values as written. Values shorter than four characters are
/// not scrubbed (they would garble messages, and are no keys).
#[derive(Default)]
pub struct Secrets(std::cell::RefCell<Vec<String>>);

impl Secrets {
    fn add(&self, value: &str) {
        let value = value.trim();
        if value.len() >= 4 {
            self.0.borrow_mut().push(value.to_owned());
        }
    }

    fn scrub(&self, mut text: String) -> String {
        // Longest first, so a secret containing another is replaced whole.
        let mut secrets = self.0.borrow().clone();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for secret in &secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "*****");
            }
        }
        text
    }
}

/// A [`Lookup`] that remembers every value it hands out, for scrubbing.
struct Recording<'a> {
    env: &'a dyn Lookup,
    secrets: &'a Secrets,
}

impl Lookup for Recording<'_> {
    fn get(&self, name: &str) -> Option<String> {
        let value = self.env.get(name)?;
        self.secrets.add(&value);
        Some(value)
    }

    fn placeholder(&self) -> bool {
        self.env.placeholder()
    }
}

// ---------------------------------------------------------------------------
// The file format
// ---------------------------------------------------------------------------

/// The YAML file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The one provider requests are forwarded to (the single-upstream
    /// shape). Absent means empty: `resolve` then requires `upstreams`.
    #[serde(default)]
    pub upstream: UpstreamFile,
    /// Several named providers; `models` says which serves what.
    #[serde(default)]
    pub upstreams: Ordered<UpstreamFile>,
    /// Public model names and the deployments that serve them.
    #[serde(default)]
    pub models: Ordered<ModelFile>,
    /// The admin status endpoint.
    #[serde(default)]
    pub admin: AdminFile,
    /// Protection limits.
    #[serde(default)]
    pub limits: LimitsFile,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Log output.
    #[serde(default)]
    pub log: LogFile,
}

/// One upstream provider.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// Base URL in the OpenAI SDK convention, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Headers set on every upstream request, replacing the client's.
    #[serde(default)]
    pub default_headers: HeaderList,
    /// Upstream timeouts.
    #[serde(default)]
    pub timeouts: TimeoutsFile,
    /// Most requests in flight to it at once, over every model routed to it.
    #[serde(default)]
    pub max_concurrent: Option<usize>,
}

/// Upstream timeouts. LLM answers can take minutes, so the defaults are long.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsFile {
    /// TCP + TLS connect.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// From sending the request to receiving response headers (a non-streamed
    /// completion only answers when it is finished).
    #[serde(with = "humantime_serde")]
    pub response_headers: Duration,
    /// Longest silence between two body chunks.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// The whole exchange, from sending to the last byte (none by default:
    /// long generations are legitimate).
    #[serde(with = "humantime_serde")]
    pub total: Option<Duration>,
}

impl Default for TimeoutsFile {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            response_headers: Duration::from_secs(600),
            idle: Duration::from_secs(300),
            total: None,
        }
    }
}

/// A model's own timeouts, overriding its upstreams' (connect stays the
/// upstream's: connections are shared by every model on it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelTimeoutsFile {
    /// Until response headers arrive.
    #[serde(with = "humantime_serde")]
    pub response_headers: Option<Duration>,
    /// Longest gap between two body chunks.
    #[serde(with = "humantime_serde")]
    pub idle: Option<Duration>,
    /// The whole exchange.
    #[serde(with = "humantime_serde")]
    pub total: Option<Duration>,
}

/// `GET /admin/status`, guarded by a bearer token; off when no token is set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// The token (`${VAR}` reads the environment); at least 16 characters.
    #[serde(default)]
    pub token: Option<String>,
}

/// Limits that protect a public-facing gateway.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsFile {
    /// Largest request body accepted; base64 images need tens of MiB.
    pub max_body_size: ByteSize,
    /// Connections served at once; further ones wait in the listen backlog
    /// (10,000 unless set).
    pub max_connections: Option<usize>,
    /// Requests in flight at once over all connections (each may hold an
    /// upstream socket); over it, 503. Defaults to `max_connections`.
    pub max_in_flight: Option<usize>,
    /// Concurrent streams one HTTP/2 connection may open.
    pub max_streams_per_connection: u32,
    /// Request body bytes held in memory at once over every request (routing
    /// reads JSON bodies whole to find `model`); over it, 503.
    pub max_buffered_bytes: ByteSize,
    /// Time a client has to send its request headers (slowloris guard), and
    /// to start its first request after connecting.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time a client has to send its whole request body; over it, 408.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
}

impl Default for LimitsFile {
    fn default() -> Self {
        Self {
            max_body_size: ByteSize(32 * 1024 * 1024),
            max_connections: None,
            max_in_flight: None,
            max_streams_per_connection: 100,
            max_buffered_bytes: ByteSize(512 * 1024 * 1024),
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(120),
        }
    }
}

/// `limits.max_connections` when not set.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Log settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogFile {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `llmproxy=debug`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogFile {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable `key=value` lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}

/// A size in bytes, written as a number or with a unit: `32MiB`, `512 KB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `1024`, `64KiB`, `32 MiB`, `1GB` (KB = 1000, KiB = 1024).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let number: u64 = digits
            .parse()
            .map_err(|_| "is not a size (e.g. 1048576, 512KiB, 32MiB)".to_owned())?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1000,
            "KiB" => 1 << 10,
            "MB" => 1000 * 1000,
            "MiB" => 1 << 20,
            "GB" => 1000 * 1000 * 1000,
            "GiB" => 1 << 30,
            _ => {
                return Err("unknown size unit (use B, KB, KiB, MB, MiB, GB or GiB)".to_owned());
            }
        };
        number
            .checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| "is too large".to_owned())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(text) => ByteSize::parse(&text).map_err(serde::de::Error::custom),
        }
    }
}

/// A YAML mapping of header name to value, kept in the order written.
pub type HeaderList = Ordered<String>;

/// A YAML mapping of names to values, kept in the order written (the order
/// of upstreams and models is meaningful: the first upstream is the default).
#[derive(Debug)]
pub struct Ordered<T>(pub Vec<(String, T)>);

impl<T> Default for Ordered<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a mapping of names to values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Ordered<T>, A::Error> {
                let mut list: Vec<(String, T)> = Vec::new();
                // A set beside the list: a linear check, even for 50,000 models.
                let mut seen = std::collections::HashSet::new();
                while let Some((key, value)) = map.next_entry::<String, T>()? {
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!("`{key}` is given twice")));
                    }
                    list.push((key, value));
                }
                Ok(Ordered(list))
            }
        }
        deserializer.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

/// A public model name and the deployments that serve it. A name ending in
/// `*` (`gpt-*`) matches every model with that prefix.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// Where the model is served.
    pub deployments: Vec<DeploymentFile>,
    /// How a deployment is chosen for each request.
    #[serde(default)]
    pub strategy: Strategy,
    /// When and how a failed attempt is tried again.
    #[serde(default)]
    pub retry: RetryFile,
    /// Other models tried in order when this one's attempts are exhausted.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Bigger-context models tried in order when the upstream answers that
    /// the request exceeds the context window (`context_length_exceeded`).
    #[serde(default)]
    pub context_window_fallbacks: Vec<String>,
    /// When a failing deployment is taken out of rotation.
    #[serde(default)]
    pub circuit_breaker: BreakerFile,
    /// Timeouts for this model, overriding the upstream's.
    #[serde(default)]
    pub timeouts: ModelTimeoutsFile,
}

/// A deployment failing `failures` times within `window` gets no traffic
/// for `cooldown`, then one probe request decides whether it is back.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerFile {
    /// Failures (connect errors, timeouts, 429 and 5xx answers) that open the breaker.
    pub failures: u32,
    /// The window they are counted in.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long an open breaker keeps traffic away.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
}

impl Default for BreakerFile {
    fn default() -> Self {
        Self {
            failures: 5,
            window: Duration::from_secs(30),
            cooldown: Duration::from_secs(30),
        }
    }
}

/// Retry policy of a model route. An attempt is retried only before any
/// byte reached the client: on connect errors, timeouts before response
/// headers, and 429/500/502/503/504 answers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryFile {
    /// Attempts in all, the first included (1 turns retries off).
    pub attempts: u32,
    /// First backoff; doubled each retry, with full jitter.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// Longest backoff.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Longest wait an upstream's `retry-after` / `retry-after-ms` may ask for.
    #[serde(with = "humantime_serde")]
    pub retry_after_cap: Duration,
    /// No new attempt starts this long after the first.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

impl Default for RetryFile {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            retry_after_cap: Duration::from_secs(10),
            deadline: Duration::from_secs(60),
        }
    }
}

/// One place a model is served.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentFile {
    /// The name of an entry in `upstreams`.
    pub upstream: String,
    /// The upstream's name for the model, when it differs from the public one.
    #[serde(default)]
    pub model: Option<String>,
    /// Share of traffic for the `weighted` and `round_robin` strategies.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Most requests in flight on this deployment at once.
    #[serde(default)]
    pub max_concurrent: Option<usize>,
}

fn default_weight() -> u32 {
    1
}

/// How a model's deployment is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Random, in proportion to `weight`.
    #[default]
    Weighted,
    /// In turn, `weight` requests each.
    RoundRobin,
    /// The deployment with the fewest requests in flight.
    LeastInFlight,
    /// Power of two random choices over a peak-EWMA of time to response
    /// headers, weighted by requests in flight.
    Latency,
}

// ---------------------------------------------------------------------------
// The runtime configuration
// ---------------------------------------------------------------------------

/// Validated configuration the proxy runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Where requests go; the first is the default for requests no model routes.
    pub upstreams: Vec<Upstream>,
    /// Model routing; empty means every request goes to the first upstream.
    pub models: Vec<Model>,
    /// The admin token; `None` turns the admin endpoint off.
    pub admin_token: Option<crate::headers::Secret>,
    /// Protection limits.
    pub limits: Limits,
    /// Drain deadline on shutdown.
    pub shutdown_timeout: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// Things that are allowed but probably not meant (`field: what`), shown
    /// by `check-config` and logged at start-up.
    pub warnings: Vec<String>,
}

impl Config {
    /// Where requests go, in one line: the URL of a single upstream, or the
    /// names of several and the models routed.
    pub fn describe(&self) -> String {
        match self.upstreams.as_slice() {
            [one] if self.models.is_empty() => one.base_url.display(),
            all => format!(
                "{} upstreams ({}), {} model routes",
                all.len(),
                all.iter()
                    .map(|u| u.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.models.len()
            ),
        }
    }
}

/// A validated upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Its name: `default` for the single-upstream shape.
    pub name: String,
    /// Where requests are sent.
    pub base_url: BaseUrl,
    /// The `Host` header for it, made once.
    pub host: HeaderValue,
    /// Headers set on every request, values marked sensitive.
    pub default_headers: DefaultHeaders,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Most routed requests in flight at once.
    pub max_concurrent: Option<usize>,
}

/// A validated model route.
#[derive(Debug, Clone)]
pub struct Model {
    /// The public name (`gpt-*` for a prefix).
    pub name: String,
    /// For a wildcard, the prefix it matches.
    pub prefix: Option<String>,
    /// How a deployment is chosen.
    pub strategy: Strategy,
    /// Where it is served (never empty).
    pub deployments: Vec<Deployment>,
    /// Retry policy.
    pub retry: Retry,
    /// Indices into `Config::models` tried when attempts are exhausted.
    pub fallbacks: Vec<usize>,
    /// Indices into `Config::models` tried on a context-length error.
    pub context_window_fallbacks: Vec<usize>,
    /// Circuit breaker of each deployment.
    pub breaker: Breaker,
    /// Timeout overrides.
    pub timeouts: ModelTimeouts,
}

/// A validated circuit-breaker policy.
#[derive(Debug, Clone, Copy)]
pub struct Breaker {
    /// Failures within `window` that open it (at least 1).
    pub failures: u32,
    /// Counting window.
    pub window: Duration,
    /// Time without traffic before a probe.
    pub cooldown: Duration,
}

/// A validated retry policy.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in all (at least 1).
    pub attempts: u32,
    /// First backoff.
    pub backoff: Duration,
    /// Longest backoff.
    pub max_backoff: Duration,
    /// Longest `retry-after` honoured.
    pub retry_after_cap: Duration,
    /// No attempt starts later than this after the first.
    pub deadline: Duration,
}

/// A validated deployment.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    /// The upstream's model name, when it differs from the requested one.
    pub model: Option<String>,
    /// Share of traffic (at least 1).
    pub weight: u32,
    /// Most requests in flight at once.
    pub max_concurrent: Option<usize>,
}

/// Validated upstream timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP + TLS connect.
    pub connect: Duration,
    /// Until response headers arrive.
    pub response_headers: Duration,
    /// Longest gap between two body chunks.
    pub idle: Duration,
    /// The whole exchange, if bounded.
    pub total: Option<Duration>,
}

/// A model's validated timeout overrides.
#[derive(Debug, Clone, Copy, Default)]
pub struct ModelTimeouts {
    /// Until response headers arrive.
    pub response_headers: Option<Duration>,
    /// Longest gap between two body chunks.
    pub idle: Option<Duration>,
    /// The whole exchange.
    pub total: Option<Duration>,
}

impl Timeouts {
    /// These timeouts with a model's overrides applied.
    pub fn with(self, model: ModelTimeouts) -> Self {
        Self {
            connect: self.connect,
            response_headers: model.response_headers.unwrap_or(self.response_headers),
            idle: model.idle.unwrap_or(self.idle),
            total: model.total.or(self.total),
        }
    }
}

/// Validated limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body, in bytes.
    pub max_body_size: u64,
    /// Connections served at once.
    pub max_connections: usize,
    /// Requests in flight at once.
    pub max_in_flight: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub max_streams_per_connection: u32,
    /// Request body bytes buffered at once, over every request.
    pub max_buffered_bytes: u64,
    /// Time to receive request headers (and the first request).
    pub header_read_timeout: Duration,
    /// Time to receive a whole request body.
    pub body_read_timeout: Duration,
    /// Whether `max_connections` and `max_in_flight` are the shipped
    /// defaults: those are fitted to the open-file limit without a warning.
    pub defaults_fitted_quietly: bool,
}

/// An upstream base URL, split once so joining a request path is one allocation.
#[derive(Debug, Clone)]
pub struct BaseUrl {
    scheme: Scheme,
    authority: Authority,
    /// The path prefix without a trailing slash (`""` for a bare host).
    path: String,
}

impl BaseUrl {
    /// Parses and checks a base URL: http(s), a host, no credentials, no query.
    ///
    /// Messages never repeat the URL: it may have come from a `${VAR}` that
    /// holds a key, or carry one in its query.
    pub fn parse(text: &str) -> Result<Self, String> {
        const EXAMPLE: &str =
            "write it as http(s)://HOST[:PORT]/PATH, e.g. https://api.openai.com/v1";
        let uri: Uri = text.trim().parse().map_err(|_| {
            if text.trim().contains("://") {
                format!("is not a valid URL; {EXAMPLE}")
            } else {
                format!("is not a URL with a scheme; {EXAMPLE}")
            }
        })?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("has no scheme (http:// or https://); {EXAMPLE}"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!("has a scheme other than http or https; {EXAMPLE}"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("has no host; {EXAMPLE}"))?;
        if authority.as_str().contains('@') {
            return Err(
                "has credentials in it, which are not supported; put them in default_headers"
                    .into(),
            );
        }
        if authority.host().is_empty() {
            return Err(format!("has no host; {EXAMPLE}"));
        }
        if uri.query().is_some() {
            return Err(
                "has a query string, which is not supported; put keys in default_headers".into(),
            );
        }
        Ok(Self {
            scheme,
            authority,
            path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The upstream URI for a client request, in the OpenAI SDK convention:
    /// the client's `/v1` prefix is replaced by the base URL's path, the rest
    /// of the path and the query are kept as sent (still percent-encoded).
    ///
    /// `https://api.openai.com/v1` + `/v1/chat/completions?x=1`
    /// → `https://api.openai.com/v1/chat/completions?x=1`.
    pub fn join(&self, request: &Uri) -> Result<Uri, http::Error> {
        let path = request.path();
        let rest = path.strip_prefix("/v1").unwrap_or(path);
        let query = request.query();
        let mut joined = String::with_capacity(
            self.path.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 1,
        );
        joined.push_str(&self.path);
        joined.push_str(rest);
        if joined.is_empty() {
            joined.push('/');
        }
        if let Some(query) = query {
            joined.push('?');
            joined.push_str(query);
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(PathAndQuery::try_from(joined)?)
            .build()
    }

    /// Whether the path has a segment like `v1`, `v1beta` or `v2` (OpenAI-style
    /// APIs are versioned; a bare host is usually a forgotten `/v1`).
    pub fn has_version_segment(&self) -> bool {
        self.path.split('/').any(|segment| {
            segment
                .strip_prefix('v')
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
    }

    /// `host:port` as configured.
    pub fn authority(&self) -> &str {
        self.authority.as_str()
    }

    /// The URL as configured (it holds no credentials: `parse` refuses them).
    pub fn display(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.path)
    }
}

/// Largest config file read: far above any real one (50,000 models fit in
/// a few MiB), small enough that a wrong path cannot exhaust memory.
const MAX_FILE_SIZE: u64 = 16 * 1024 * 1024;

/// Deepest `[`/`{` nesting accepted. No llmproxy field nests more than a few
/// levels; a pathological file must fail fast rather than keep the YAML
/// parser busy for minutes.
const MAX_FLOW_DEPTH: usize = 32;

/// Reads, parses and validates a config file.
pub fn load(path: &Path, env: &dyn Lookup) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let read_error = |source| ConfigError::Read {
        path: origin.clone(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read_error)?.len();
    if size > MAX_FILE_SIZE {
        return Err(invalid(
            &origin,
            "(file)",
            format!("is {size} bytes; config files are limited to {MAX_FILE_SIZE} bytes"),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    let file = parse(&text, &origin)?;
    resolve(file, &origin, env)
}

/// Parses YAML text into the file structs, naming the field path on error.
pub fn parse(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
    check_nesting(text, origin)?;
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." {
            "(top level)".to_owned()
        } else if path.contains(char::is_whitespace) {
            // A key with a space is likely a header line written as a key.
            path.split('.')
                .map(|key| {
                    if key.contains(char::is_whitespace) {
                        "<key>"
                    } else {
                        key
                    }
                })
                .collect::<Vec<_>>()
                .join(".")
        } else {
            path
        };
        let mut message = err.into_inner().to_string();
        // The YAML parser prefixes the enclosing path itself; ours is more precise.
        if let Some((prefix, rest)) = message.split_once(": ")
            && field.starts_with(prefix)
        {
            message = rest.to_owned();
        }
        let mut message = without_values(&message);
        if message.contains("expected a duration") || message.contains("time unit needed") {
            message.push_str(" (write a number with its unit: 500ms, 10s, 5m, 1h)");
        }
        invalid(origin, &field, message)
    })
}

/// Refuses flow collections (`[`, `{`) nested deeper than [`MAX_FLOW_DEPTH`],
/// in one linear pass that skips quoted strings and comments.
fn check_nesting(text: &str, origin: &str) -> Result<(), ConfigError> {
    let mut depth = 0usize;
    let mut line = 1usize;
    let mut quote: Option<u8> = None;
    let mut comment = false;
    let mut previous = b'\n';
    for &byte in text.as_bytes() {
        if byte == b'\n' {
            line += 1;
            comment = false;
            // A plain scalar's quote cannot span lines; a quoted one can, but
            // resetting here only makes the count stricter, never laxer.
            quote = None;
        } else if comment {
        } else if let Some(open) = quote {
            if byte == open {
                quote = None;
            }
        } else {
            match byte {
                b'"' | b'\''
                    if matches!(previous, b' ' | b'\t' | b'[' | b'{' | b',' | b':' | b'\n') =>
                {
                    quote = Some(byte);
                }
                b'#' if matches!(previous, b' ' | b'\t' | b'\n') => comment = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Err(invalid(
                            origin,
                            "(file)",
                            format!(
                                "`[`/`{{` nested deeper than {MAX_FLOW_DEPTH} levels at line {line}"
                            ),
                        ));
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        previous = byte;
    }
    Ok(())
}

/// A YAML/serde message with the values it quotes taken out.
///
/// serde writes the offending value into its messages (`invalid type: string
/// "Authorization Bearer sk-…", expected a mapping`), and a value in a config
/// file may be a key. Field names (`unknown field `x``) and what was expected
/// (`expected one of `text`, `json``) are kept: they come from llmproxy.
pub fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(['"', '`']) {
        let (before, from) = rest.split_at(at);
        let mark = from.as_bytes()[0] as char;
        let Some(end) = from[1..].find(mark) else {
            break;
        };
        let quoted = &from[..end + 2];
        // A key with a space in it is a header line written as a key
        // (`Authorization Bearer sk-…: x`): not shown either.
        let plain_key = !quoted.contains(char::is_whitespace) && quoted.len() <= 66;
        let keep = mark == '`'
            && ((before.ends_with("field ") && plain_key)
                || out.contains("expected")
                || before.contains("expected"));
        if keep {
            out.push_str(before);
            out.push_str(quoted);
        } else {
            out.push_str(before.strip_suffix(' ').unwrap_or(before));
        }
        rest = &from[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The quick-start configuration: `--upstream URL` and `--header 'Name: value'` flags.
pub fn from_flags(
    upstream: &str,
    headers: &[String],
    env: &dyn Lookup,
) -> Result<Config, ConfigError> {
    let origin = "command line";
    let mut default_headers = Vec::with_capacity(headers.len());
    for (i, flag) in headers.iter().enumerate() {
        // Never shown: a malformed flag is most likely a key typed without its name.
        let Some((name, value)) = flag.split_once(':') else {
            return Err(invalid(
                origin,
                "--header",
                format!(
                    "header flag #{} is not `Name: value` (e.g. -H 'Authorization: Bearer ${{OPENAI_API_KEY}}')",
                    i + 1
                ),
            ));
        };
        default_headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let file = FileConfig {
        listen: default_listen(),
        upstream: UpstreamFile {
            base_url: upstream.to_owned(),
            default_headers: Ordered(default_headers),
            timeouts: TimeoutsFile::default(),
            max_concurrent: None,
        },
        upstreams: Ordered::default(),
        models: Ordered::default(),
        admin: AdminFile::default(),
        limits: LimitsFile::default(),
        shutdown_timeout: default_shutdown_timeout(),
        log: LogFile::default(),
    };
    resolve(file, origin, env).map_err(|err| {
        // The URL typed on the command line may carry a key in its query.
        let secrets = Secrets::default();
        secrets.add(upstream);
        if let Some((_, query)) = upstream.split_once('?') {
            secrets.add(query);
        }
        err.scrubbed(&secrets)
    })
}

fn invalid(origin: &str, field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.to_owned(),
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Validates the file structs and builds the runtime configuration.
pub fn resolve(file: FileConfig, origin: &str, env: &dyn Lookup) -> Result<Config, ConfigError> {
    let secrets = Secrets::default();
    for upstream in std::iter::once(&file.upstream).chain(file.upstreams.0.iter().map(|(_, u)| u)) {
        for (_, value) in &upstream.default_headers.0 {
            secrets.add(value);
        }
    }
    let env = Recording {
        env,
        secrets: &secrets,
    };
    resolve_recorded(file, origin, &env).map_err(|err| err.scrubbed(&secrets))
}

/// Checks a log filter as a person means it: comma-separated directives,
/// each a level (`info`) or `target=level` (`llmproxy=debug`).
///
/// `tracing`'s own parser takes a bare word it does not know (`loud`,
/// `warning`) as a *target* name, which silently turns every other log line
/// off — the access log included. Here that is an error that says so.
pub fn check_log_filter(text: &str) -> Result<(), String> {
    const LEVELS: &str = "trace, debug, info, warn, error or off";
    if text.trim().is_empty() {
        return Err(format!("is empty; use a level: {LEVELS}"));
    }
    // Values are not repeated (a config error never shows one); the
    // directive's position says which.
    for (i, directive) in text.split(',').enumerate() {
        let n = i + 1;
        let directive = directive.trim();
        if directive.is_empty() {
            return Err(format!(
                "directive #{n} is empty (a stray comma); use a level ({LEVELS}) or target=level, comma-separated"
            ));
        }
        let (target, level) = match directive.rsplit_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, directive),
        };
        if target.is_some_and(str::is_empty) {
            return Err(format!("directive #{n} has no target before `=`"));
        }
        if level
            .parse::<tracing::level_filters::LevelFilter>()
            .is_err()
            || level.chars().any(|c| c.is_ascii_digit())
        {
            return Err(format!(
                "directive #{n} is not a level; use {LEVELS} (or target=level, e.g. llmproxy=debug)"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(text)
        .map(|_| ())
        .map_err(|_| "is not a log filter (use a level, or target=level)".to_owned())
}

/// Every `${NAME}` a value refers to (`$$` is an escaped `$`, not a reference).
fn variables(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            match tail.find('}') {
                Some(end) => {
                    found.push(&tail[..end]);
                    rest = &tail[end + 1..];
                }
                None => break,
            }
        } else {
            rest = after;
        }
    }
    found
}

/// All the variables the config needs that are not set, in one error, so a
/// user fixes them in one go rather than one `check-config` run each.
fn check_variables(file: &FileConfig, origin: &str, env: &dyn Lookup) -> Result<(), ConfigError> {
    let mut fields: Vec<(String, &str)> = Vec::new();
    let upstreams = std::iter::once(("upstream".to_owned(), &file.upstream)).chain(
        file.upstreams
            .0
            .iter()
            .map(|(name, u)| (format!("upstreams.{name}"), u)),
    );
    for (field, upstream) in upstreams {
        fields.push((format!("{field}.base_url"), &upstream.base_url));
        for (name, value) in &upstream.default_headers.0 {
            fields.push((format!("{field}.default_headers.{name}"), value));
        }
    }
    if let Some(token) = &file.admin.token {
        fields.push(("admin.token".to_owned(), token));
    }
    let mut missing: Vec<(String, &str)> = Vec::new();
    for (field, text) in &fields {
        for name in variables(text) {
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if valid && env.get(name).is_none() {
                missing.push((field.clone(), name));
            }
        }
    }
    match missing.as_slice() {
        [] => Ok(()),
        [(field, name)] => Err(invalid(
            origin,
            field,
            format!("environment variable {name} is not set"),
        )),
        several => Err(invalid(
            origin,
            "(environment)",
            format!(
                "{} environment variables are not set: {}",
                several.len(),
                several
                    .iter()
                    .map(|(field, name)| format!("{name} (for {field})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The longest each duration may be: generous for any real deployment, and
/// far from where adding it to a clock could overflow.
mod max {
    use std::time::Duration;
    pub const HOUR: Duration = Duration::from_secs(60 * 60);
    pub const DAY: Duration = Duration::from_secs(24 * 60 * 60);
    pub const WEEK: Duration = Duration::from_secs(7 * 24 * 60 * 60);
}

/// Checks that a duration is within `(0, max]`, naming the field.
fn duration(
    origin: &str,
    field: &str,
    value: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        return Err(invalid(origin, field, "must be greater than zero"));
    }
    if value > max {
        return Err(invalid(
            origin,
            field,
            format!(
                "is longer than the maximum of {}",
                humantime_serde::re::humantime::format_duration(max)
            ),
        ));
    }
    Ok(value)
}

fn resolve_recorded(
    file: FileConfig,
    origin: &str,
    env: &dyn Lookup,
) -> Result<Config, ConfigError> {
    check_variables(&file, origin, env)?;
    let mut warnings = Vec::new();
    let FileConfig {
        listen,
        upstream,
        upstreams,
        models,
        admin,
        limits,
        shutdown_timeout,
        log,
    } = file;

    let single = !upstream.base_url.is_empty();
    let resolved: Vec<Upstream> = match (single, upstreams.0.is_empty()) {
        (true, true) => vec![resolve_upstream(
            "default",
            "upstream",
            upstream,
            origin,
            env,
            &mut warnings,
        )?],
        (false, false) => upstreams
            .0
            .into_iter()
            .map(|(name, file)| {
                let field = format!("upstreams.{name}");
                resolve_upstream(&name, &field, file, origin, env, &mut warnings)
            })
            .collect::<Result<_, _>>()?,
        (true, false) => {
            return Err(invalid(
                origin,
                "upstream",
                "give either `upstream` (one provider) or `upstreams` (several), not both",
            ));
        }
        (false, true) => {
            return Err(invalid(
                origin,
                "(top level)",
                "missing field `upstream` (one provider) or `upstreams` (several)",
            ));
        }
    };
    let models = resolve_models(models, &resolved, origin)?;
    if models.is_empty() && resolved.len() > 1 {
        return Err(invalid(
            origin,
            "models",
            "with several upstreams, `models` must say which upstream serves each model",
        ));
    }

    duration(
        origin,
        "limits.header_read_timeout",
        limits.header_read_timeout,
        max::HOUR,
    )?;
    duration(
        origin,
        "limits.body_read_timeout",
        limits.body_read_timeout,
        max::DAY,
    )?;
    duration(origin, "shutdown_timeout", shutdown_timeout, max::DAY)?;
    if limits.max_streams_per_connection == 0 {
        return Err(invalid(
            origin,
            "limits.max_streams_per_connection",
            "must be greater than zero",
        ));
    }
    if limits.max_in_flight == Some(0) {
        return Err(invalid(
            origin,
            "limits.max_in_flight",
            "must be greater than zero",
        ));
    }
    if limits.max_buffered_bytes.0 < limits.max_body_size.0 {
        return Err(invalid(
            origin,
            "limits.max_buffered_bytes",
            "must be at least limits.max_body_size (one largest body must fit)",
        ));
    }
    if limits.max_body_size.0 == 0 {
        return Err(invalid(
            origin,
            "limits.max_body_size",
            "must be greater than zero",
        ));
    }
    if limits.max_connections == Some(0) {
        return Err(invalid(
            origin,
            "limits.max_connections",
            "must be greater than zero",
        ));
    }
    let max_connections = limits.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    check_log_filter(&log.level).map_err(|m| invalid(origin, "log.level", m))?;

    let admin_token = match admin.token {
        None => None,
        Some(token) => {
            let token = interpolate(&token, env).map_err(|m| invalid(origin, "admin.token", m))?;
            if token.len() < 16 {
                return Err(invalid(
                    origin,
                    "admin.token",
                    "must be at least 16 characters (it guards the gateway's state)",
                ));
            }
            Some(crate::headers::Secret::new(token))
        }
    };
    Ok(Config {
        listen,
        upstreams: resolved,
        models,
        admin_token,
        limits: Limits {
            max_body_size: limits.max_body_size.0,
            max_connections,
            max_in_flight: limits.max_in_flight.unwrap_or(max_connections),
            defaults_fitted_quietly: limits.max_connections.is_none()
                && limits.max_in_flight.is_none(),
            max_streams_per_connection: limits.max_streams_per_connection,
            max_buffered_bytes: limits.max_buffered_bytes.0,
            header_read_timeout: limits.header_read_timeout,
            body_read_timeout: limits.body_read_timeout,
        },
        shutdown_timeout,
        log_format: log.format,
        log_level: log.level,
        warnings,
    })
}

/// Validates one upstream; `field` is its path in the file (`upstream`, `upstreams.NAME`).
fn resolve_upstream(
    name: &str,
    field: &str,
    upstream: UpstreamFile,
    origin: &str,
    env: &dyn Lookup,
    warnings: &mut Vec<String>,
) -> Result<Upstream, ConfigError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(invalid(
            origin,
            field,
            "upstream names use letters, digits, `-`, `_` and `.` (they are sent in x-llmproxy-upstream)",
        ));
    }
    let url_field = format!("{field}.base_url");
    let base_url = if env.placeholder() && upstream.base_url.contains("${") {
        // --no-env: the URL comes from a variable; only its shape is known.
        BaseUrl::parse("http://no-env.invalid/v1")
    } else {
        interpolate(&upstream.base_url, env).and_then(|url| BaseUrl::parse(&url))
    }
    .map_err(|m| invalid(origin, &url_field, m))?;
    if !base_url.has_version_segment() {
        warnings.push(format!(
            "{url_field}: has no version segment such as /v1, so /v1/chat/completions is sent to \
             its path + /chat/completions; OpenAI-compatible servers usually want a base URL ending in /v1"
        ));
    }

    let mut headers: Vec<(HeaderName, HeaderValue)> =
        Vec::with_capacity(upstream.default_headers.0.len());
    for (header, value) in &upstream.default_headers.0 {
        let header_field = format!("{field}.default_headers.{header}");
        let header_name = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
            invalid(
                origin,
                &format!("{field}.default_headers"),
                format!(
                    "entry #{} does not have a valid header name (letters, digits, `-`)",
                    headers.len() + 1
                ),
            )
        })?;
        if !crate::headers::may_be_default(&header_name) {
            return Err(invalid(
                origin,
                &header_field,
                "describes the connection or the message framing (hop-by-hop, Host, \
                 Content-Length, Expect) and cannot be set for the upstream",
            ));
        }
        if headers.iter().any(|(n, _)| *n == header_name) {
            return Err(invalid(
                origin,
                &header_field,
                "is given twice (header names are case-insensitive)",
            ));
        }
        let value = interpolate(value, env).map_err(|m| invalid(origin, &header_field, m))?;
        let bare = value.trim();
        if bare.is_empty()
            || ["bearer", "basic", "token"].contains(&bare.to_ascii_lowercase().as_str())
        {
            warnings.push(format!(
                "{header_field}: the value is empty or only an auth scheme; if it names a variable, \
                 check it is set (a flag in double quotes is expanded by the shell: use single quotes)"
            ));
        }
        // Never echo the value: it is usually a key.
        let header_value = HeaderValue::from_str(&value).map_err(|_| {
            invalid(
                origin,
                &header_field,
                "the value contains characters not allowed in a header (control characters or newlines)",
            )
        })?;
        headers.push((header_name, header_value));
    }

    let timeouts = upstream.timeouts;
    for (name, value, longest) in [
        ("connect", Some(timeouts.connect), max::HOUR),
        (
            "response_headers",
            Some(timeouts.response_headers),
            max::DAY,
        ),
        ("idle", Some(timeouts.idle), max::DAY),
        ("total", timeouts.total, max::WEEK),
    ] {
        if let Some(value) = value {
            duration(origin, &format!("{field}.timeouts.{name}"), value, longest)?;
        }
    }
    if upstream.max_concurrent == Some(0) {
        return Err(invalid(
            origin,
            &format!("{field}.max_concurrent"),
            "must be at least 1",
        ));
    }
    let host = HeaderValue::from_str(base_url.authority.as_str())
        .map_err(|_| invalid(origin, &url_field, "the host is not a valid Host header"))?;
    Ok(Upstream {
        max_concurrent: upstream.max_concurrent,
        name: name.to_owned(),
        host,
        base_url,
        default_headers: DefaultHeaders::new(headers),
        timeouts: Timeouts {
            connect: timeouts.connect,
            response_headers: timeouts.response_headers,
            idle: timeouts.idle,
            total: timeouts.total,
        },
    })
}

/// Validates the model routes against the upstreams they name.
fn resolve_models(
    models: Ordered<ModelFile>,
    upstreams: &[Upstream],
    origin: &str,
) -> Result<Vec<Model>, ConfigError> {
    let names: std::collections::HashMap<String, usize> = models
        .0
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.clone(), i))
        .collect();
    let upstream_index: std::collections::HashMap<&str, usize> = upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| (u.name.as_str(), i))
        .collect();
    let fallback_index =
        |field: &str, list: &[String], own: &str| -> Result<Vec<usize>, ConfigError> {
            list.iter()
                .enumerate()
                .map(|(i, target)| {
                    let at = format!("{field}[{i}]");
                    if target == own {
                        return Err(invalid(origin, &at, "a model cannot fall back to itself"));
                    }
                    if target.contains('*') {
                        return Err(invalid(
                            origin,
                            &at,
                            "fallbacks name exact models, not wildcards",
                        ));
                    }
                    names.get(target).copied().ok_or_else(|| {
                        invalid(
                            origin,
                            &at,
                            format!("no model is named `{target}` under `models`"),
                        )
                    })
                })
                .collect()
        };
    let mut resolved = Vec::with_capacity(models.0.len());
    for (name, model) in models.0 {
        let field = format!("models.{name}");
        let fallbacks = fallback_index(&format!("{field}.fallbacks"), &model.fallbacks, &name)?;
        let context_window_fallbacks = fallback_index(
            &format!("{field}.context_window_fallbacks"),
            &model.context_window_fallbacks,
            &name,
        )?;
        let prefix = match name.find('*') {
            None => None,
            Some(at) if at + 1 == name.len() => Some(name[..at].to_owned()),
            Some(_) => {
                return Err(invalid(
                    origin,
                    &field,
                    "`*` may only end a model name (`gpt-*`)",
                ));
            }
        };
        if model.deployments.is_empty() {
            return Err(invalid(
                origin,
                &format!("{field}.deployments"),
                "needs at least one deployment",
            ));
        }
        let mut deployments = Vec::with_capacity(model.deployments.len());
        for (i, deployment) in model.deployments.into_iter().enumerate() {
            let at = format!("{field}.deployments[{i}]");
            let upstream = upstream_index
                .get(deployment.upstream.as_str())
                .copied()
                .ok_or_else(|| {
                    let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                    invalid(
                        origin,
                        &format!("{at}.upstream"),
                        format!(
                            "no upstream is named `{}` (known: {})",
                            deployment.upstream,
                            known.join(", ")
                        ),
                    )
                })?;
            if deployment.weight == 0 {
                return Err(invalid(
                    origin,
                    &format!("{at}.weight"),
                    "must be at least 1",
                ));
            }
            if prefix.is_some() && deployment.model.is_some() {
                return Err(invalid(
                    origin,
                    &format!("{at}.model"),
                    "a wildcard route passes the requested name through; it cannot rename it",
                ));
            }
            if deployment.max_concurrent == Some(0) {
                return Err(invalid(
                    origin,
                    &format!("{at}.max_concurrent"),
                    "must be at least 1",
                ));
            }
            deployments.push(Deployment {
                upstream,
                model: deployment.model,
                weight: deployment.weight,
                max_concurrent: deployment.max_concurrent,
            });
        }
        let retry = model.retry;
        if retry.attempts == 0 {
            return Err(invalid(
                origin,
                &format!("{field}.retry.attempts"),
                "must be at least 1 (1 means no retries)",
            ));
        }
        let breaker = model.circuit_breaker;
        if breaker.failures == 0 {
            return Err(invalid(
                origin,
                &format!("{field}.circuit_breaker.failures"),
                "must be at least 1",
            ));
        }
        let overrides = model.timeouts;
        for (name, value, longest) in [
            ("response_headers", overrides.response_headers, max::DAY),
            ("idle", overrides.idle, max::DAY),
            ("total", overrides.total, max::WEEK),
        ] {
            if let Some(value) = value {
                duration(origin, &format!("{field}.timeouts.{name}"), value, longest)?;
            }
        }
        for (name, value, longest) in [
            ("retry.backoff", retry.backoff, max::HOUR),
            ("retry.max_backoff", retry.max_backoff, max::HOUR),
            ("retry.retry_after_cap", retry.retry_after_cap, max::DAY),
            ("retry.deadline", retry.deadline, max::DAY),
            ("circuit_breaker.window", breaker.window, max::DAY),
            ("circuit_breaker.cooldown", breaker.cooldown, max::DAY),
        ] {
            // Zero is meaningful here (no backoff, never honour retry-after).
            if value > longest {
                duration(origin, &format!("{field}.{name}"), value, longest)?;
            }
        }
        resolved.push(Model {
            timeouts: ModelTimeouts {
                response_headers: overrides.response_headers,
                idle: overrides.idle,
                total: overrides.total,
            },
            breaker: Breaker {
                failures: breaker.failures,
                window: breaker.window,
                cooldown: breaker.cooldown,
            },
            name,
            prefix,
            strategy: model.strategy,
            deployments,
            fallbacks,
            context_window_fallbacks,
            retry: Retry {
                attempts: retry.attempts,
                backoff: retry.backoff,
                max_backoff: retry.max_backoff.max(retry.backoff),
                retry_after_cap: retry.retry_after_cap,
                deadline: retry.deadline,
            },
        });
    }
    Ok(resolved)
}

/// Replaces `${NAME}` with the variable's value; `$$` is a literal `$`.
///
/// Errors name the variable, never its value.
pub fn interpolate(text: &str, env: &dyn Lookup) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail
                .find('}')
                .ok_or_else(|| "`${` is not closed by `}`".to_owned())?;
            let name = &tail[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`${{{name}}}` is not a valid variable name (letters, digits and _)"
                ));
            }
            let value = env
                .get(name)
                .ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn env_with_key(name: &str) -> Option<String> {
        (name == "OPENAI_API_KEY").then(|| "sk-test-123".to_owned())
    }

    fn load_str(text: &str, env: &dyn Lookup) -> Result<Config, String> {
        parse(text, "test.yaml")
            .and_then(|file| resolve(file, "test.yaml", env))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_config_gets_production_defaults() {
        let config = load_str(
            "upstream:\n  base_url: https://api.openai.com/v1\n",
            &no_env,
        )
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.limits.max_body_size, 32 * 1024 * 1024);
        assert_eq!(config.limits.max_connections, 10_000);
        assert_eq!(
            config.upstreams[0].timeouts.response_headers,
            Duration::from_secs(600)
        );
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(config.log_format, LogFormat::Text);
    }

    #[test]
    fn full_config_parses_every_field() {
        let text = r#"
listen: 0.0.0.0:9999
upstream:
  base_url: http://localhost:9000/openai/v1
  default_headers:
    Authorization: "Bearer ${OPENAI_API_KEY}"
    OpenAI-Organization: org-1
  timeouts:
    connect: 2s
    response_headers: 5m
    idle: 90s
limits:
  max_body_size: 64MiB
  max_connections: 50
  header_read_timeout: 5s
shutdown_timeout: 10s
log:
  format: json
  level: debug
"#;
        let config = load_str(text, &env_with_key).unwrap();
        assert_eq!(config.listen.port(), 9999);
        assert_eq!(config.upstreams[0].timeouts.connect, Duration::from_secs(2));
        assert_eq!(config.upstreams[0].timeouts.idle, Duration::from_secs(90));
        assert_eq!(config.limits.max_body_size, 64 << 20);
        assert_eq!(config.limits.max_connections, 50);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(config.log_format, LogFormat::Json);
        let names: Vec<&str> = config.upstreams[0]
            .default_headers
            .names()
            .map(|n| n.as_str())
            .collect();
        assert_eq!(names, ["authorization", "openai-organization"]);
        let joined = config.upstreams[0]
            .base_url
            .join(&"/v1/models".parse().unwrap())
            .unwrap();
        assert_eq!(joined, "http://localhost:9000/openai/v1/models");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_path() {
        let err = load_str(
            "upstream:\n  base_url: http://x/v1\n  timeouts:\n    conect: 1s\n",
            &no_env,
        )
        .unwrap_err();
        assert!(
            err.starts_with("test.yaml: upstream.timeouts.conect: unknown field `conect`"),
            "{err}"
        );
        assert!(err.contains("line 4"), "{err}");
        let err = load_str(
            "upstream:\n  base_url: http://x/v1\nlisten_addr: x\n",
            &no_env,
        )
        .unwrap_err();
        assert!(err.contains("unknown field `listen_addr`"), "{err}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (
                "upstream:\n  base_url: ftp://x/v1\n",
                "upstream.base_url",
                "scheme other than http or https",
            ),
            (
                "upstream:\n  base_url: not a url\n",
                "upstream.base_url",
                "not a URL with a scheme",
            ),
            (
                "upstream:\n  base_url: /v1\n",
                "upstream.base_url",
                "no scheme",
            ),
            (
                "upstream:\n  base_url: http://user:pw@x/v1\n",
                "upstream.base_url",
                "credentials",
            ),
            (
                "upstream:\n  base_url: http://x/v1?a=1\n",
                "upstream.base_url",
                "query string",
            ),
            (
                "upstream:\n  base_url: http://x/v1\n  default_headers:\n    \"bad header\": x\n",
                "upstream.default_headers",
                "entry #1 does not have a valid header name",
            ),
            (
                "upstream:\n  base_url: http://x/v1\n  default_headers:\n    Connection: close\n",
                "upstream.default_headers.Connection",
                "describes the connection or the message framing",
            ),
            (
                "upstream:\n  base_url: http://x/v1\n  default_headers:\n    Authorization: a\n    authorization: b\n",
                "upstream.default_headers.authorization",
                "given twice",
            ),
            (
                "upstream:\n  base_url: http://x/v1\n  default_headers:\n    Authorization: \"Bearer ${MISSING_KEY}\"\n",
                "upstream.default_headers.Authorization",
                "environment variable MISSING_KEY is not set",
            ),
            (
                "upstream:\n  base_url: http://x/v1\n  timeouts:\n    idle: 0s\n",
                "upstream.timeouts.idle",
                "greater than zero",
            ),
            (
                "upstream:\n  base_url: http://x/v1\n  timeouts:\n    idle: soon\n",
                "upstream.timeouts.idle",
                "",
            ),
            (
                "upstream:\n  base_url: http://x/v1\nlimits:\n  max_body_size: 12 parsecs\n",
                "limits.max_body_size",
                "unknown size unit",
            ),
            (
                "upstream:\n  base_url: http://x/v1\nlisten: nowhere\n",
                "listen",
                "",
            ),
            (
                "upstream:\n  base_url: http://x/v1\nlog:\n  format: xml\n",
                "log.format",
                "unknown variant, expected `text` or `json`",
            ),
            (
                "upstream:\n  base_url: http://x/v1\nlimits:\n  max_connections: 0\n",
                "limits.max_connections",
                "greater than zero",
            ),
        ];
        for (text, field, message) in cases {
            let err = load_str(text, &no_env).unwrap_err();
            assert!(
                err.starts_with(&format!("test.yaml: {field}: ")),
                "{field}: {err}"
            );
            assert!(err.contains(message), "{field}: {err}");
        }
    }

    #[test]
    fn routing_configs_are_checked_against_their_upstreams() {
        let ups = "upstreams:\n  a:\n    base_url: http://a/v1\n  b:\n    base_url: http://b/v1\n";
        let cases = [
            (
                format!("{ups}models:\n  m:\n    deployments:\n      - upstream: c\n"),
                "models.m.deployments[0].upstream",
                "no upstream is named `c` (known: a, b)",
            ),
            (ups.to_owned(), "models", "must say which upstream serves each model"),
            (
                format!("upstream:\n  base_url: http://x/v1\n{ups}"),
                "upstream",
                "not both",
            ),
            (
                format!("{ups}models:\n  m:\n    deployments:\n      - upstream: a\n        weight: 0\n"),
                "models.m.deployments[0].weight",
                "at least 1",
            ),
            (
                format!("{ups}models:\n  g*t:\n    deployments:\n      - upstream: a\n"),
                "models.g*t",
                "may only end",
            ),
            (
                format!("{ups}models:\n  g*:\n    deployments:\n      - upstream: a\n        model: x\n"),
                "models.g*.deployments[0].model",
                "cannot rename",
            ),
            (
                format!("{ups}models:\n  m:\n    deployments: []\n"),
                "models.m.deployments",
                "at least one deployment",
            ),
            (
                format!("{ups}models:\n  m:\n    strategy: fastest\n    deployments:\n      - upstream: a\n"),
                "models.m.strategy",
                "unknown variant, expected one of",
            ),
            (
                "upstreams:\n  \"a b\":\n    base_url: http://a/v1\nmodels:\n  m:\n    deployments:\n      - upstream: a b\n".to_owned(),
                "upstreams.a b",
                "letters, digits",
            ),
            (
                "upstreams:\n  a:\n    base_url: http://a/v1\n    timeouts:\n      idle: 0s\nmodels:\n  m:\n    deployments:\n      - upstream: a\n".to_owned(),
                "upstreams.a.timeouts.idle",
                "greater than zero",
            ),
            ("listen: 127.0.0.1:1\n".to_owned(), "(top level)", "missing field `upstream`"),
            (
                format!("{ups}models:\n  m:\n    fallbacks: [nope]\n    deployments:\n      - upstream: a\n"),
                "models.m.fallbacks[0]",
                "no model is named `nope`",
            ),
            (
                format!("{ups}models:\n  m:\n    context_window_fallbacks: [m]\n    deployments:\n      - upstream: a\n"),
                "models.m.context_window_fallbacks[0]",
                "itself",
            ),
            (
                "upstream:\n  base_url: http://x/v1\nadmin:\n  token: short\n".to_owned(),
                "admin.token",
                "at least 16",
            ),
            (
                format!("{ups}models:\n  m:\n    circuit_breaker:\n      failures: 0\n    deployments:\n      - upstream: a\n"),
                "models.m.circuit_breaker.failures",
                "at least 1",
            ),
            (
                format!("{ups}models:\n  m:\n    retry:\n      attempts: 0\n    deployments:\n      - upstream: a\n"),
                "models.m.retry.attempts",
                "at least 1",
            ),
            (
                format!("{ups}models:\n  m:\n    retry:\n      tries: 2\n    deployments:\n      - upstream: a\n"),
                "models.m.retry.tries",
                "unknown field `tries`",
            ),
        ];
        for (text, field, message) in cases {
            let err = load_str(&text, &no_env).unwrap_err();
            assert!(
                err.starts_with(&format!("test.yaml: {field}: ")),
                "{field}: {err}"
            );
            assert!(err.contains(message), "{field}: {err}");
        }
        let ok = load_str(
            &format!("{ups}models:\n  m:\n    strategy: latency\n    deployments:\n      - upstream: b\n        model: m-2024\n      - upstream: a\n  gpt-*:\n    deployments:\n      - upstream: a\n"),
            &no_env,
        )
        .unwrap();
        assert_eq!(ok.upstreams.len(), 2);
        assert_eq!(ok.models[0].deployments[0].upstream, 1);
        assert_eq!(ok.models[1].prefix.as_deref(), Some("gpt-"));
        assert_eq!(ok.describe(), "2 upstreams (a, b), 2 model routes");
    }

    #[test]
    fn example_configs_in_the_repo_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let env = |_: &str| Some("sk-example".to_owned());
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                load(&path, &env).unwrap_or_else(|e| panic!("{e}"));
                checked += 1;
            }
        }
        assert!(checked >= 3, "only {checked} example configs");
    }

    #[test]
    fn header_value_with_newline_is_rejected_without_echoing_it() {
        let env = |name: &str| (name == "KEY").then(|| "sk-secret\nInjected: 1".to_owned());
        let err = load_str(
            "upstream:\n  base_url: http://x/v1\n  default_headers:\n    Authorization: \"${KEY}\"\n",
            &env,
        )
        .unwrap_err();
        assert!(
            err.contains("upstream.default_headers.Authorization"),
            "{err}"
        );
        assert!(!err.contains("sk-secret"), "{err}");
    }

    #[test]
    fn interpolation_substitutes_escapes_and_names_missing_variables() {
        assert_eq!(
            interpolate("Bearer ${OPENAI_API_KEY}", &env_with_key).unwrap(),
            "Bearer sk-test-123"
        );
        assert_eq!(
            interpolate("cost $$5 and $x", &no_env).unwrap(),
            "cost $5 and $x"
        );
        assert_eq!(interpolate("plain", &no_env).unwrap(), "plain");
        assert_eq!(
            interpolate("${NOPE}", &no_env).unwrap_err(),
            "environment variable NOPE is not set"
        );
        assert!(
            interpolate("${OPEN", &no_env)
                .unwrap_err()
                .contains("not closed")
        );
        assert!(
            interpolate("${A-B}", &no_env)
                .unwrap_err()
                .contains("not a valid variable name")
        );
    }

    #[test]
    fn byte_sizes_parse_with_units() {
        assert_eq!(ByteSize::parse("1024").unwrap().0, 1024);
        assert_eq!(ByteSize::parse("64KiB").unwrap().0, 65536);
        assert_eq!(ByteSize::parse("32 MiB").unwrap().0, 32 << 20);
        assert_eq!(ByteSize::parse("1GB").unwrap().0, 1_000_000_000);
        assert!(ByteSize::parse("MiB").is_err());
        assert!(ByteSize::parse("99999999999999999GiB").is_err());
    }

    #[test]
    fn base_url_join_follows_the_openai_sdk_convention() {
        let cases = [
            (
                "https://api.openai.com/v1",
                "/v1/chat/completions",
                "https://api.openai.com/v1/chat/completions",
            ),
            (
                "https://api.openai.com/v1/",
                "/v1/chat/completions",
                "https://api.openai.com/v1/chat/completions",
            ),
            (
                "http://host:8000/openai/v1",
                "/v1/models",
                "http://host:8000/openai/v1/models",
            ),
            (
                "http://host:8000",
                "/v1/chat/completions",
                "http://host:8000/chat/completions",
            ),
            (
                "http://host/v1",
                "/v1/files?purpose=batch&limit=2",
                "http://host/v1/files?purpose=batch&limit=2",
            ),
            (
                "http://host/v1",
                "/v1/models/ft%3Agpt-4o%3Aorg",
                "http://host/v1/models/ft%3Agpt-4o%3Aorg",
            ),
            ("http://host", "/v1", "http://host/"),
        ];
        for (base, path, expected) in cases {
            let base = BaseUrl::parse(base).unwrap();
            let joined = base.join(&path.parse().unwrap()).unwrap();
            assert_eq!(joined.to_string(), expected, "{path}");
        }
    }

    #[test]
    fn quick_start_flags_build_a_config() {
        let config = from_flags(
            "https://api.openai.com/v1",
            &["Authorization: Bearer ${OPENAI_API_KEY}".into()],
            &env_with_key,
        )
        .unwrap();
        assert_eq!(
            config.upstreams[0].base_url.display(),
            "https://api.openai.com/v1"
        );
        let err = from_flags(
            "http://x/v1",
            &["Authorization Bearer sk-live".into()],
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("command line: --header:"), "{err}");
        assert!(!err.contains("sk-live"), "{err}");
    }

    const SECRET: &str = "sk-prop-5ecret-value-0123456789";

    fn secret_env(name: &str) -> Option<String> {
        (name == "KEY").then(|| SECRET.to_owned())
    }

    /// A value in any of the shapes a careless or hostile config may hold.
    fn any_value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("${KEY}".to_owned()),
            Just(format!("\"Bearer {SECRET}\"")),
            Just(format!("\"https://h/v1?key={SECRET}\"")),
            Just("\"https://h/v1?key=${KEY}\"".to_owned()),
            Just(format!("[\"{SECRET}\"]")),
            Just(format!("{{a: \"{SECRET}\"}}")),
            Just("\"${KEY}\\n\"".to_owned()),
            Just("18446744073709551615s".to_owned()),
            Just("500000000000y".to_owned()),
            Just("0s".to_owned()),
            Just("-1".to_owned()),
            Just("1e30".to_owned()),
            Just("[[[[[[".to_owned()),
            "[a-zA-Z0-9 :/._${}\\[\\]-]{0,24}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn no_config_panics_or_prints_a_secret(
            template in 0usize..8,
            a in any_value(),
            b in any_value(),
        ) {
            let text = match template {
                0 => format!("upstream:\n  base_url: {a}\n"),
                1 => format!("upstream:\n  base_url: http://x/v1\n  default_headers:\n    Authorization: {a}\n    {b}: x\n"),
                2 => format!("upstream:\n  base_url: http://x/v1\n  default_headers: {a}\n"),
                3 => format!("upstream:\n  base_url: http://x/v1\n  timeouts:\n    idle: {a}\n    total: {b}\n"),
                4 => format!("upstream:\n  base_url: http://x/v1\nlimits:\n  header_read_timeout: {a}\n  max_body_size: {b}\n"),
                5 => format!("upstreams:\n  a:\n    base_url: {a}\nmodels:\n  m:\n    retry:\n      deadline: {b}\n    deployments:\n      - upstream: a\n"),
                6 => format!("upstream:\n  base_url: http://x/v1\nadmin:\n  token: {a}\nlog:\n  level: {b}\n"),
                _ => format!("upstream:\n  base_url: http://x/v1\nlog:\n  format: {a}\n  level: {b}\n"),
            };
            match load_str(&text, &secret_env) {
                Ok(config) => {
                    // A config that loads never carries an absurd duration.
                    for upstream in &config.upstreams {
                        proptest::prop_assert!(upstream.timeouts.idle <= max::DAY);
                        proptest::prop_assert!(upstream.timeouts.total.is_none_or(|t| t <= max::WEEK));
                    }
                    proptest::prop_assert!(config.limits.header_read_timeout <= max::HOUR);
                }
                Err(err) => {
                    proptest::prop_assert!(!err.contains("5ecret"), "{text}\n→ {err}");
                }
            }
            let flags = from_flags(&a.replace("${KEY}", SECRET), &[b.replace("${KEY}", SECRET)], &secret_env);
            if let Err(err) = flags {
                proptest::prop_assert!(!err.to_string().contains("5ecret"), "{a} {b}\n→ {err}");
            }
        }
    }

    #[test]
    fn serde_messages_lose_their_values_but_keep_field_names() {
        assert_eq!(
            without_values(r#"invalid type: string "Bearer sk-x", expected a mapping"#),
            "invalid type: string, expected a mapping"
        );
        assert_eq!(
            without_values("unknown field `conect`, expected one of `connect`, `idle`"),
            "unknown field `conect`, expected one of `connect`, `idle`"
        );
        assert_eq!(
            without_values("invalid type: integer `5`, expected a string"),
            "invalid type: integer, expected a string"
        );
        let err = load_str(
            "upstream:\n  base_url: http://x/v1\n  timeouts:\n    Authorization Bearer sk-key-in-a-key: 1s\n",
            &no_env,
        )
        .unwrap_err();
        assert!(!err.contains("sk-key-in-a-key"), "{err}");
        assert!(
            err.contains("upstream.timeouts.<key>: unknown field"),
            "{err}"
        );
    }
}
