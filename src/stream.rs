//! Body wrappers: bodies are never collected on the way through, only
//! wrapped to watch them.
//!
//! [`IdleTimeout`] ends an upstream answer that goes silent for too long. It
//! fails the body with an error instead of ending it, so hyper aborts the
//! downstream response (no final chunk is written) and a client can never
//! take a stalled answer for a complete one. [`Deadline`] bounds the time a
//! client may take to send its request body. [`Replay`] puts bytes read ahead
//! (to peek at an error answer) back in front of the rest of a body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// Boxed error type shared by the body wrappers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a streamed upstream body ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The upstream connection failed mid-body (reset, truncated, protocol error).
    #[error("upstream body failed: {0}")]
    Upstream(BoxError),
    /// The upstream sent nothing for longer than `timeouts.idle`.
    #[error("upstream sent nothing for {0:?} (idle timeout)")]
    Idle(Duration),
    /// The exchange ran longer than `timeouts.total`.
    #[error("upstream exchange exceeded the total timeout of {0:?}")]
    Total(Duration),
}

pin_project_lite::pin_project! {
    /// Fails the body when no frame arrives within `idle` of the previous one.
    ///
    /// The timer is not reset per chunk (a timer-wheel update on the hot
    /// path); each chunk only stores its arrival time, and when the timer
    /// fires it is pushed to `last_frame + idle` if a chunk came meanwhile.
    pub struct IdleTimeout<B> {
        #[pin]
        inner: B,
        #[pin]
        timer: Sleep,
        idle: Duration,
        last_frame: Instant,
        // `timeouts.total`: when the whole exchange must be over.
        total: Option<(Instant, Duration)>,
    }
}

/// `start + after`, or a time so far ahead it never comes when that
/// overflows: a timer must never panic on the request path, whatever the
/// configuration says (limits are also checked when it is loaded).
pub fn deadline_after(start: Instant, after: Duration) -> Instant {
    start
        .checked_add(after)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 60 * 60))
}

impl<B> IdleTimeout<B> {
    /// Wraps `inner`; the first frame is also due within `idle`.
    pub fn new(inner: B, idle: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner,
            timer: tokio::time::sleep_until(deadline_after(now, idle)),
            idle,
            last_frame: now,
            total: None,
        }
    }

    /// Also fails the body once `started + total` has passed.
    pub fn with_total(mut self, started: Instant, total: Option<Duration>) -> Self {
        if let Some(total) = total {
            let end = deadline_after(started, total);
            if end < deadline_after(self.last_frame, self.idle) {
                self.timer = tokio::time::sleep_until(end);
            }
            self.total = Some((end, total));
        }
        self
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.last_frame = Instant::now();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Upstream(e.into())))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => loop {
                ready!(this.timer.as_mut().poll(cx));
                let now = Instant::now();
                if let Some((end, total)) = *this.total
                    && end <= now
                {
                    return Poll::Ready(Some(Err(BodyError::Total(total))));
                }
                let idle_deadline = deadline_after(*this.last_frame, *this.idle);
                if idle_deadline <= now {
                    return Poll::Ready(Some(Err(BodyError::Idle(*this.idle))));
                }
                let next = this
                    .total
                    .map_or(idle_deadline, |(end, _)| end.min(idle_deadline));
                this.timer.as_mut().reset(next);
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// Passes the body through and keeps `held` alive until the body is
    /// dropped: e.g. a deployment's in-flight count for a whole stream.
    pub struct Holding<B, T> {
        #[pin]
        inner: B,
        held: T,
    }
}

impl<B, T> Holding<B, T> {
    /// Wraps `inner`, holding `held`.
    pub fn new(inner: B, held: T) -> Self {
        Self { inner, held }
    }
}

impl<B: Body, T> Body for Holding<B, T> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client did not finish its request body in time (`limits.body_read_timeout`).
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received within {0:?} (limits.body_read_timeout)")]
pub struct BodyTimedOut(pub Duration);

pin_project_lite::pin_project! {
    /// Fails a request body that is not over by a deadline.
    ///
    /// A body that is already complete when first polled (most API calls: the
    /// JSON arrives with the headers) never arms a timer, so the bound costs
    /// nothing unless a client is actually slow. (Boxed when armed: the
    /// upstream client wants an `Unpin` body.)
    pub struct Deadline<B> {
        #[pin]
        inner: B,
        timer: Option<Pin<Box<Sleep>>>,
        limit: Duration,
    }
}

impl<B> Deadline<B> {
    /// Wraps `inner`; it must end within `limit` of the first time it has
    /// nothing to give. (The request's own start would be a clock read on
    /// every request; the first wait comes microseconds after it.)
    pub fn new(inner: B, limit: Duration) -> Self {
        Self {
            inner,
            timer: None,
            limit,
        }
    }
}

impl<B> Body for Deadline<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let limit = *this.limit;
                let timer = this.timer.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(deadline_after(
                        Instant::now(),
                        limit,
                    )))
                });
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut(*this.limit))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// `prefix` (bytes already read from `inner`), then the rest of `inner`.
    pub struct Replay<B> {
        prefix: Option<Bytes>,
        #[pin]
        inner: B,
    }
}

impl<B> Replay<B> {
    /// Puts `prefix` back in front of `inner`.
    pub fn new(prefix: Bytes, inner: B) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            inner,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Replay<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        this.inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        // Upper first: `set_lower` asserts lower <= upper.
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(extra));
        }
        hint.set_lower(inner.lower().saturating_add(extra));
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body whose chunks `c0`, `c1`, ... arrive after the given delays.
    fn delayed_chunks(delays_ms: &'static [u64]) -> http_body_util::channel::Channel<Bytes> {
        let (mut tx, body) = http_body_util::channel::Channel::new(1);
        tokio::spawn(async move {
            for (i, delay) in delays_ms.iter().enumerate() {
                tokio::time::sleep(Duration::from_millis(*delay)).await;
                if tx.send_data(Bytes::from(format!("c{i}"))).await.is_err() {
                    return;
                }
            }
        });
        body
    }

    #[tokio::test(start_paused = true)]
    async fn chunks_within_the_idle_gap_pass_even_when_the_total_is_longer() {
        // Five gaps of 80 ms under a 100 ms idle limit: 400 ms in all.
        let body = IdleTimeout::new(
            delayed_chunks(&[80, 80, 80, 80, 80]),
            Duration::from_millis(100),
        );
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"c0c1c2c3c4");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_longer_than_total_fails_even_with_short_gaps() {
        let body = IdleTimeout::new(delayed_chunks(&[50; 20]), Duration::from_millis(100))
            .with_total(Instant::now(), Some(Duration::from_millis(260)));
        let err = body.collect().await.unwrap_err();
        assert!(matches!(err, BodyError::Total(_)), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_body_slower_than_its_deadline_fails() {
        let body = Deadline::new(delayed_chunks(&[10, 10, 500]), Duration::from_millis(100));
        let err = body.collect().await.unwrap_err();
        assert!(err.downcast_ref::<BodyTimedOut>().is_some(), "{err}");
        let fast = Deadline::new(delayed_chunks(&[10, 10]), Duration::from_millis(100));
        assert_eq!(&fast.collect().await.unwrap().to_bytes()[..], b"c0c1");
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_durations_do_not_panic() {
        let body = IdleTimeout::new(delayed_chunks(&[1]), Duration::MAX)
            .with_total(Instant::now(), Some(Duration::MAX));
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"c0");
    }

    #[tokio::test]
    async fn replay_puts_the_peeked_bytes_first() {
        let body = Replay::new(Bytes::from_static(b"ab"), delayed_chunks(&[0, 0]));
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"abc0c1");
        let sized = Replay::new(
            Bytes::from_static(b"ab"),
            http_body_util::Full::new(Bytes::from_static(b"cd")),
        );
        assert_eq!(sized.size_hint().exact(), Some(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_longer_than_idle_fails_the_body() {
        let mut body = Box::pin(IdleTimeout::new(
            delayed_chunks(&[10, 10, 500]),
            Duration::from_millis(100),
        ));
        let mut got = Vec::new();
        let err = loop {
            match body.frame().await {
                Some(Ok(frame)) => got.push(frame.into_data().unwrap()),
                Some(Err(e)) => break e,
                None => panic!("stream ended cleanly after a stall"),
            }
        };
        assert_eq!(got, [Bytes::from("c0"), Bytes::from("c1")]);
        assert!(
            matches!(err, BodyError::Idle(d) if d == Duration::from_millis(100)),
            "{err}"
        );
    }
}
