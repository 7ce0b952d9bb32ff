//! Body wrappers: bodies are never collected on the way through, only
//! wrapped to watch them.
//!
//! - [`IdleTimeout`] ends an upstream answer that goes silent for too long,
//!   or runs past its total. It fails the body instead of ending it, so
//!   hyper aborts the downstream response (no final chunk) and a client can
//!   never take a stalled answer for a complete one; the upstream body is
//!   dropped first, so the upstream sees its connection closed no later
//!   than the client sees the abort.
//! - [`Deadline`] bounds the time a client may take to send its body.
//! - [`Observed`] is the one wrapper that watches a body: hooks for each
//!   frame, the clean end, a failure and a cancel (dropped before either).
//!   The access log, byte counts and held permits are observers.
//! - [`Replay`] puts bytes read ahead (to peek at an error answer) back in
//!   front of the rest of a body.
//!
//! Server-sent-event parsing, when a feature needs to read a stream (usage
//! accounting), belongs here too, as an observer; so does [`decimal`], the
//! number writer of every hand-written wire format (log lines, request
//! heads, translated events).

pub mod lines;
mod observe;
mod replay;
mod timeouts;

/// `n`'s decimal digits, written into the end of `buf` (no `fmt`).
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

pub use observe::{Hold, Observed, Observer};
pub use replay::Replay;
pub use timeouts::{BodyError, BodyTimedOut, Deadline, IdleTimeout};

/// Boxed error type shared by the body wrappers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a response body failed, as a stable low-cardinality name for the
/// access log (and later metrics).
pub fn failure_kind(error: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(body) = error.downcast_ref::<BodyError>() {
            match body {
                BodyError::Idle(_) => return "upstream_idle_timeout",
                BodyError::Total(_) => return "upstream_total_timeout",
                BodyError::Upstream(_) => {}
            }
        }
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            if hyper.is_parse() {
                return "upstream_protocol_error";
            }
            if hyper.is_incomplete_message() || hyper.is_closed() || hyper.is_canceled() {
                return "upstream_reset";
            }
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof => "upstream_reset",
                // The HTTP/1.1 client's framing errors (bad chunk, bad length).
                std::io::ErrorKind::InvalidData => "upstream_protocol_error",
                _ => "upstream_body",
            };
        }
        current = error.source();
    }
    "upstream_body"
}
