//! Body wrappers for the response path: the upstream's body is never
//! collected, only wrapped to watch it.
//!
//! [`IdleTimeout`] ends a stream that goes silent for too long. It fails the
//! body with an error instead of ending it, so hyper aborts the downstream
//! response (no final chunk is written) and a client can never take a stalled
//! answer for a complete one.

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

impl<B> IdleTimeout<B> {
    /// Wraps `inner`; the first frame is also due within `idle`.
    pub fn new(inner: B, idle: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner,
            timer: tokio::time::sleep_until(now + idle),
            idle,
            last_frame: now,
            total: None,
        }
    }

    /// Also fails the body once `started + total` has passed.
    pub fn with_total(mut self, started: Instant, total: Option<Duration>) -> Self {
        if let Some(total) = total {
            let end = started + total;
            if end < self.last_frame + self.idle {
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
                let idle_deadline = *this.last_frame + *this.idle;
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
