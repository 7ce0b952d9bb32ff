//! `limits` and `admin`: what protects a public-facing gateway.

use super::*;

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
