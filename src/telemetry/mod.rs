//! What llmproxy tells about the requests it serves: request ids, the one
//! access-log line per request, the batched log writer, and the response
//! headers that name what happened (`x-llmproxy-*`, `Server-Timing`).

pub mod access_line;
mod access_log;
pub mod log_writer;
mod request_id;

use http::HeaderName;

pub use access_log::{
    AccessLog, Counted, Logged, REQUEST_ID_HEADER, RoutedRequest, SERVER_TIMING, UpstreamInfo,
};
pub use request_id::{RequestId, RequestIds};

/// The response header naming the upstream that answered (routed requests).
pub const UPSTREAM_HEADER: HeaderName = HeaderName::from_static("x-llmproxy-upstream");
/// The response header counting the attempts made (routed requests).
pub const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("x-llmproxy-attempts");
