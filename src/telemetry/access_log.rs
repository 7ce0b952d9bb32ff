//! Request ids and the access log: the outermost layer, wrapped around every
//! request the server answers.
//!
//! The layer gives each request llmproxy's own id (echoed to the client as
//! `x-llmproxy-request-id`), counts bytes in and out, and writes one log line
//! per request when the response is really over: at the end of a streamed
//! body, when it fails, or when the client goes away. The record logs itself
//! on `Drop`, so every path that ends a request (including the future being
//! dropped before a response existed) writes exactly one line.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use tokio::time::Instant;

use crate::error::Failure;
use crate::stream::{Observed, Observer, failure_kind};

use super::{RequestId, RequestIds, UPSTREAM_HEADER, access_line};

/// The response header carrying llmproxy's request id.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-llmproxy-request-id");

/// The W3C header through which llmproxy reports its own time and the upstream's.
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// What the forwarding handler learned from the upstream, left in the
/// response extensions for the log line.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamInfo {
    /// The upstream's status.
    pub status: StatusCode,
    /// From sending the request to receiving the upstream's response headers.
    pub headers_after: Duration,
}

/// What routing did for a request, left in the response extensions for the
/// log line (routed requests only, so the single-upstream path pays nothing).
#[derive(Debug, Clone)]
pub struct RoutedRequest {
    /// The model the request asked for.
    pub model: Box<str>,
    /// Attempts made, over the model and its fallbacks.
    pub attempts: u32,
    /// Each attempt as `upstream:status` or `upstream:error_kind`.
    pub path: Box<str>,
}

/// `llmproxy;dur=<own ms>, upstream;dur=<upstream ms>` up to the response
/// headers, so anyone can see the proxy's overhead on their own traffic.
/// Written digit by digit on the stack, without `fmt` (its machinery cost
/// about 1,800 instructions per request, 3 % of the whole path): the only
/// allocation is the header value itself.
fn server_timing(total: Duration, upstream: Option<UpstreamInfo>) -> HeaderValue {
    let mut out = StackText::default();
    out.push(b"llmproxy;dur=");
    match upstream {
        Some(upstream) => {
            out.millis(total.saturating_sub(upstream.headers_after));
            out.push(b", upstream;dur=");
            out.millis(upstream.headers_after);
        }
        None => out.millis(total),
    }
    // Digits, letters and punctuation only: always a valid header value.
    HeaderValue::from_bytes(out.as_bytes()).unwrap_or(HeaderValue::from_static("llmproxy"))
}

/// A small text buffer on the stack; what does not fit is dropped (a
/// `Server-Timing` value is at most about 70 bytes).
struct StackText {
    buf: [u8; 96],
    len: usize,
}

impl Default for StackText {
    fn default() -> Self {
        Self {
            buf: [0; 96],
            len: 0,
        }
    }
}

impl StackText {
    fn push(&mut self, bytes: &[u8]) {
        let end = (self.len + bytes.len()).min(self.buf.len());
        let n = end - self.len;
        self.buf[self.len..end].copy_from_slice(&bytes[..n]);
        self.len = end;
    }

    fn number(&mut self, n: u64) {
        self.push(crate::stream::decimal(n, &mut [0; 20]));
    }

    /// Milliseconds with up to three decimals, trailing zeros dropped:
    /// 0.255, 12.3, 4.
    fn millis(&mut self, duration: Duration) {
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        let (ms, mut rest) = (micros / 1000, micros % 1000);
        self.number(ms);
        if rest == 0 {
            return;
        }
        let mut width = 3;
        while rest % 10 == 0 {
            rest /= 10;
            width -= 1;
        }
        self.push(b".");
        let mut fraction = [b'0'; 3];
        for slot in fraction[..width].iter_mut().rev() {
            *slot = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        self.push(&fraction[..width]);
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// How a request ended, as written in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The response body was delivered to its end.
    Complete,
    /// The response body failed (upstream died, idle timeout).
    Failed,
    /// The client went away before the response was over.
    ClientClosed,
}

/// One request's log line, written when it is dropped.
struct Record {
    id: RequestId,
    method: Method,
    /// A copy, not the request's `Uri`: that one shares the connection's
    /// 8 KiB read buffer and would pin it for the life of a stream.
    path: Box<str>,
    start: Instant,
    bytes_in: Arc<AtomicU64>,
    status: Option<StatusCode>,
    upstream: Option<UpstreamInfo>,
    /// `x-llmproxy-upstream` of the answer: which upstream served it.
    upstream_name: Option<HeaderValue>,
    /// What routing did.
    routed: Option<RoutedRequest>,
    error: Option<&'static str>,
    error_detail: Option<Arc<str>>,
    first_byte: Option<Instant>,
    bytes_out: u64,
    outcome: Outcome,
}

impl Drop for Record {
    fn drop(&mut self) {
        let end = Instant::now();
        // Integer microseconds: exact, and cheap to format on every request.
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let outcome = match self.outcome {
            Outcome::Complete => "complete",
            Outcome::Failed => "failed",
            Outcome::ClientClosed => "client_closed",
        };
        use access_line::Value::{Number, Text};
        let routed = self.routed.as_ref();
        // The path only, never the query: it may carry credentials.
        access_line::write(&[
            ("request_id", Some(Text(self.id.as_str()))),
            ("method", Some(Text(self.method.as_str()))),
            ("path", Some(Text(&self.path))),
            ("status", self.status.map(|s| Number(u64::from(s.as_u16())))),
            (
                "upstream",
                self.upstream_name
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .map(Text),
            ),
            (
                "upstream_status",
                self.upstream.map(|u| Number(u64::from(u.status.as_u16()))),
            ),
            ("model", routed.map(|r| Text(&r.model))),
            ("attempts", routed.map(|r| Number(u64::from(r.attempts)))),
            ("attempt_path", routed.map(|r| Text(&r.path))),
            ("latency_us", Some(Number(us(end - self.start)))),
            (
                "ttfb_us",
                self.first_byte.map(|t| Number(us(t - self.start))),
            ),
            (
                "upstream_us",
                self.upstream.map(|u| Number(us(u.headers_after))),
            ),
            (
                "bytes_in",
                Some(Number(self.bytes_in.load(Ordering::Relaxed))),
            ),
            ("bytes_out", Some(Number(self.bytes_out))),
            ("outcome", Some(Text(outcome))),
            ("error", self.error.map(Text)),
            ("error_detail", self.error_detail.as_deref().map(Text)),
        ]);
    }
}

/// The access-log service around the router.
#[derive(Clone)]
pub struct AccessLog<S> {
    inner: S,
    ids: Arc<RequestIds>,
    /// Whether the request carries its id in its extensions (usage records
    /// need it; an extension costs an allocation, so only then).
    share_ids: bool,
}

impl<S> AccessLog<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            ids: Arc::new(RequestIds::default()),
            share_ids: false,
        }
    }

    /// Puts each request's [`RequestId`] into its extensions for the stack inside.
    pub fn sharing_ids(mut self, share: bool) -> Self {
        self.share_ids = share;
        self
    }
}

impl<S, B, RB> tower::Service<Request<B>> for AccessLog<S>
where
    S: tower::Service<Request<Counted<B>>, Response = Response<RB>, Error = Infallible>,
    RB: Body,
{
    type Response = Response<Logged<RB>>;
    type Error = Infallible;
    type Future = AccessLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let id = self.ids.next_id();
        let bytes_in = Arc::new(AtomicU64::new(0));
        let record = Record {
            id,
            method: request.method().clone(),
            path: request.uri().path().into(),
            start: Instant::now(),
            bytes_in: bytes_in.clone(),
            status: None,
            upstream: None,
            upstream_name: None,
            routed: None,
            error: None,
            error_detail: None,
            first_byte: None,
            bytes_out: 0,
            outcome: Outcome::ClientClosed,
        };
        let (mut parts, body) = request.into_parts();
        if self.share_ids {
            parts.extensions.insert(id);
        }
        let request = Request::from_parts(parts, Observed::new(body, CountIn(bytes_in)));
        AccessLogFuture {
            inner: self.inner.call(request),
            record: Some(record),
        }
    }
}

pin_project_lite::pin_project! {
    /// Waits for the response head, then moves the log record into the body.
    pub struct AccessLogFuture<F> {
        #[pin]
        inner: F,
        record: Option<Record>,
    }
}

impl<F, RB> Future for AccessLogFuture<F>
where
    F: Future<Output = Result<Response<RB>, Infallible>>,
    RB: Body,
{
    type Output = Result<Response<Logged<RB>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = std::task::ready!(this.inner.poll(cx));
        let record = this.record.take().map(|mut record| {
            record.status = Some(response.status());
            record.upstream = response.extensions().get::<UpstreamInfo>().copied();
            // Only routed requests carry this; the lookup is a null check otherwise.
            if let Some(routed) = response.extensions_mut().remove::<RoutedRequest>() {
                record.upstream_name = response.headers().get(UPSTREAM_HEADER).cloned();
                record.routed = Some(routed);
            }
            if let Some(failure) = response.extensions().get::<Failure>() {
                record.error = Some(failure.kind);
                record.error_detail = Some(failure.detail.clone());
            }
            // hyper never polls a body that is empty from the start, so it is
            // complete now rather than when it is dropped.
            if response.body().is_end_stream() {
                record.outcome = Outcome::Complete;
            }
            let headers = response.headers_mut();
            // Hex digits are always a valid header value.
            if let Ok(id) = HeaderValue::from_bytes(record.id.as_str().as_bytes()) {
                headers.insert(REQUEST_ID_HEADER, id);
            }
            // Appended, not inserted: an upstream's own Server-Timing entries stay.
            headers.append(
                SERVER_TIMING,
                server_timing(record.start.elapsed(), record.upstream),
            );
            record
        });
        Poll::Ready(Ok(
            response.map(|inner| Observed::new(inner, LogOnEnd(record)))
        ))
    }
}

/// Counts the bytes of the request body the client sent.
pub struct CountIn(Arc<AtomicU64>);

impl Observer for CountIn {
    fn on_data(&mut self, data: &bytes::Bytes, _last: bool) {
        let len = data.len();
        self.0.fetch_add(len as u64, Ordering::Relaxed);
    }
}

/// The request body, counted.
pub type Counted<B> = Observed<B, CountIn>;

/// Carries the log record through the response body until it is over;
/// the record writes its line when dropped.
pub struct LogOnEnd(Option<Record>);

impl Observer for LogOnEnd {
    fn on_data(&mut self, data: &bytes::Bytes, _last: bool) {
        let len = data.len();
        if let Some(record) = self.0.as_mut() {
            record.first_byte.get_or_insert_with(Instant::now);
            record.bytes_out += len as u64;
        }
    }

    fn on_end(&mut self) {
        if let Some(mut record) = self.0.take() {
            record.outcome = Outcome::Complete;
        }
    }

    fn on_error(&mut self, error: &(dyn std::error::Error + 'static)) {
        if let Some(mut record) = self.0.take() {
            record.outcome = Outcome::Failed;
            record.error.get_or_insert(failure_kind(error));
        }
    }

    // On cancel the record is dropped as it stands: `client_closed`.
}

/// The response body, logged when it is over.
pub type Logged<B> = Observed<B, LogOnEnd>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_timing_splits_own_time_from_the_upstreams() {
        let upstream = UpstreamInfo {
            status: StatusCode::OK,
            headers_after: Duration::from_micros(12_345),
        };
        let value = server_timing(Duration::from_micros(12_600), Some(upstream));
        assert_eq!(value, "llmproxy;dur=0.255, upstream;dur=12.345");
        assert_eq!(
            server_timing(Duration::from_micros(80), None),
            "llmproxy;dur=0.08"
        );
        for (micros, text) in [
            (0, "llmproxy;dur=0"),
            (4_000, "llmproxy;dur=4"),
            (12_300, "llmproxy;dur=12.3"),
            (1_001, "llmproxy;dur=1.001"),
            (987_654_321, "llmproxy;dur=987654.321"),
        ] {
            assert_eq!(server_timing(Duration::from_micros(micros), None), text);
        }
        assert_eq!(
            server_timing(Duration::MAX, None),
            "llmproxy;dur=18446744073709551.615"
        );
    }
}
