//! Timers on bodies: an upstream answer's idle gap and total time, and a
//! client's request body deadline. None of them resets a timer per chunk.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::BoxError;

/// Why a streamed upstream body ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The upstream connection failed mid-body (reset, truncated, protocol error).
    #[error("upstream body failed: {0}")]
    Upstream(#[source] BoxError),
    /// The upstream sent nothing for longer than `timeouts.idle`.
    #[error("upstream sent nothing for {0:?} (idle timeout)")]
    Idle(Duration),
    /// The exchange ran longer than `timeouts.total`.
    #[error("upstream exchange exceeded the total timeout of {0:?}")]
    Total(Duration),
}

/// `start + after`, or a time so far ahead it never comes when that
/// overflows: a timer must never panic on the request path, whatever the
/// configuration says (limits are also checked when it is loaded).
pub fn deadline_after(start: Instant, after: Duration) -> Instant {
    start
        .checked_add(after)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 60 * 60))
}

pin_project_lite::pin_project! {
    /// Fails the body when no frame arrives within `idle` of the previous
    /// one, or once `total` has passed.
    ///
    /// The timer is not reset per chunk (a timer-wheel update on the hot
    /// path); each chunk only stores its arrival time, and when the timer
    /// fires it is pushed to `last_frame + idle` if a chunk came meanwhile.
    /// When it does fail the body, the upstream body is dropped first: its
    /// connection closes before the client's response is aborted.
    pub struct IdleTimeout<B> {
        #[pin]
        inner: Option<B>,
        #[pin]
        timer: Sleep,
        idle: Duration,
        last_frame: Instant,
        // `timeouts.total`: when the whole exchange must be over.
        total: Option<(Instant, Duration)>,
    }
}

impl<B> IdleTimeout<B> {
    /// Wraps `inner`; the first frame is also due within `idle`.
    pub fn new(inner: B, idle: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner: Some(inner),
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
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            // Failed already; nothing more comes.
            return Poll::Ready(None);
        };
        match inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.last_frame = Instant::now();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Upstream(e.into())))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => loop {
                ready!(this.timer.as_mut().poll(cx));
                let now = Instant::now();
                let failed = match *this.total {
                    Some((end, total)) if end <= now => Some(BodyError::Total(total)),
                    _ if deadline_after(*this.last_frame, *this.idle) <= now => {
                        Some(BodyError::Idle(*this.idle))
                    }
                    _ => None,
                };
                if let Some(error) = failed {
                    // Release the upstream connection before the client hears.
                    this.inner.set(None);
                    return Poll::Ready(Some(Err(error)));
                }
                let idle_deadline = deadline_after(*this.last_frame, *this.idle);
                let next = this
                    .total
                    .map_or(idle_deadline, |(end, _)| end.min(idle_deadline));
                this.timer.as_mut().reset(next);
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
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
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut(limit))))),
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body whose chunks `c0`, `c1`, ... arrive after the given delays.
    fn delayed_chunks(delays_ms: &'static [u64]) -> http_body_util::channel::Channel<Bytes> {
        let (mut tx, body) = http_body_util::channel::Channel::new(1);
        #[expect(clippy::disallowed_methods, reason = "a test's feeder task")]
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

    /// A body that never sends, and says when it is dropped.
    struct Silent(std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl Body for Silent {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Poll::Pending
        }
    }

    impl Drop for Silent {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_longer_than_idle_fails_the_body_and_releases_the_upstream_first() {
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut body = Box::pin(IdleTimeout::new(
            Silent(dropped.clone()),
            Duration::from_millis(100),
        ));
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(
            matches!(err, BodyError::Idle(d) if d == Duration::from_millis(100)),
            "{err}"
        );
        // The upstream body (its connection) was let go before the error surfaced.
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));

        let body = IdleTimeout::new(delayed_chunks(&[10, 10, 500]), Duration::from_millis(100));
        let err = body.collect().await.unwrap_err();
        assert!(matches!(err, BodyError::Idle(_)), "{err}");
    }
}
