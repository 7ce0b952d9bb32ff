//! `log`: format and a level filter checked as a person means it.

use super::*;

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
