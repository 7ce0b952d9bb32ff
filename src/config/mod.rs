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
use serde::Deserialize;

use crate::headers::DefaultHeaders;

mod accounting;
mod env;
mod flags;
mod limits;
mod log;
mod models;
mod units;
mod upstreams;

pub use crate::upstream::BaseUrl;
use accounting::resolve_accounting;
pub use accounting::{
    Accounting, KeysFile, ModelLimit, OnUnavailable, Price, Redis, RedisFile, StoreFile, matching,
};
pub use env::{Env, Lookup, NoEnv, Secrets, interpolate};
use env::{Recording, check_variables};
pub use flags::from_flags;
pub use limits::{AdminFile, DEFAULT_MAX_CONNECTIONS, Limits, LimitsFile};
pub use log::{LogFile, LogFormat, check_log_filter};
use models::resolve_models;
pub use models::{
    Breaker, BreakerFile, Deployment, DeploymentFile, Model, ModelFile, ModelTimeouts,
    ModelTimeoutsFile, Retry, RetryFile, StatusSet, Strategy,
};
pub use units::{ByteSize, HeaderList, Ordered};
use units::{duration, max};
use upstreams::resolve_upstream;
pub use upstreams::{
    AnthropicSettings, Provider, ProviderName, Timeouts, TimeoutsFile, Upstream, UpstreamFile,
};

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
    /// The database for virtual keys and usage records.
    #[serde(default)]
    pub store: StoreFile,
    /// Virtual keys.
    #[serde(default)]
    pub keys: KeysFile,
    /// What each public model costs, USD per million tokens.
    #[serde(default)]
    pub prices: Ordered<Price>,
    /// Rate limits shared through Redis.
    #[serde(default)]
    pub redis: Option<RedisFile>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
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
    /// Keys, usage and prices, when a store is configured.
    pub accounting: Option<Accounting>,
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
        store,
        keys,
        prices,
        redis,
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
    let accounting = resolve_accounting(store, keys, prices, redis, origin, env)?;
    Ok(Config {
        listen,
        accounting,
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
    fn the_redis_section_is_checked_field_by_field() {
        let base = "upstream:\n  base_url: http://127.0.0.1:9/v1\nkeys:\n  required: true\n";
        let env = |name: &str| {
            (name == "REDIS_URL").then(|| "redis://:pw-9f3k2@10.0.0.5:6379".to_owned())
        };
        let config = load_str(&format!("{base}redis:\n  url: ${{REDIS_URL}}\n"), &env).unwrap();
        let redis = config.accounting.unwrap().redis.unwrap();
        assert_eq!(redis.prefix, "llmproxy");
        assert_eq!(redis.on_unavailable, OnUnavailable::Local);
        for (yaml, field, env_ok) in [
            ("redis:\n  url: redis://h\n  prefx: a\n", "prefx", true),
            ("redis:\n  url: http://h\n", "redis.url", true),
            (
                "redis:\n  url: redis://h\n  prefix: 'a b'\n",
                "redis.prefix",
                true,
            ),
            (
                "redis:\n  url: redis://h\n  on_unavailable: open\n",
                "on_unavailable",
                true,
            ),
            ("redis:\n  url: ${REDIS_URL}\n", "REDIS_URL", false),
        ] {
            let err = if env_ok {
                load_str(&format!("{base}{yaml}"), &env).unwrap_err()
            } else {
                load_str(&format!("{base}{yaml}"), &no_env).unwrap_err()
            };
            assert!(err.contains(field), "{yaml}: {err}");
            assert!(!err.contains("pw-9f3k2"), "{err}");
        }
        let err = load_str(
            "upstream:\n  base_url: http://127.0.0.1:9/v1\nredis:\n  url: redis://h\n",
            &no_env,
        )
        .unwrap_err();
        assert!(err.contains("keys.required"), "{err}");
        let err = load_str(
            &format!("{base}  model_limits:\n    gpt-4o:\n      rpm: 0\n"),
            &no_env,
        )
        .unwrap_err();
        assert!(err.contains("keys.model_limits.gpt-4o.rpm"), "{err}");
        let err = load_str(
            "upstream:\n  base_url: http://127.0.0.1:9/v1\nkeys:\n  model_limits:\n    m:\n      rpm: 5\n",
            &no_env,
        )
        .unwrap_err();
        assert!(err.contains("keys.model_limits"), "{err}");
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
        let base = &config.upstreams[0].base_url;
        let joined = base.join(&"/v1/models".parse().unwrap()).unwrap();
        assert_eq!(joined, "/openai/v1/models");
        assert_eq!(
            base.absolute(joined),
            "http://localhost:9000/openai/v1/models"
        );
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
                "greater than 0",
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
            (
                format!("{ups}models:\n  m:\n    circuit_breaker:\n      window: 0s\n    deployments:\n      - upstream: a\n"),
                "models.m.circuit_breaker.window",
                "greater than zero",
            ),
            (
                format!("{ups}models:\n  m:\n    circuit_breaker:\n      cooldown: 0s\n    deployments:\n      - upstream: a\n"),
                "models.m.circuit_breaker.cooldown",
                "greater than zero",
            ),
            (
                format!("{ups}models:\n  m:\n    retry:\n      on_status: [700]\n    deployments:\n      - upstream: a\n"),
                "models.m.retry.on_status",
                "outside 100",
            ),
            (
                format!("{ups}models:\n  m:\n    deployments:\n      - upstream: a\n        weight: -1\n"),
                "models.m.deployments[0].weight",
                "greater than 0",
            ),
            (
                format!("{ups}models:\n  m:\n    deployments:\n{}", "      - upstream: a\n".repeat(65)),
                "models.m.deployments",
                "at most 64",
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
            assert_eq!(base.absolute(joined).to_string(), expected, "{path}");
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
