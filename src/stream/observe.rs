//! The one wrapper that watches a body: an [`Observer`] sees each frame,
//! the clean end, a failure, or the body being dropped before either.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// What watches a body. Every hook has a no-op default; at most one of
/// `on_end`, `on_error` and `on_cancel` is called, once.
pub trait Observer {
    /// A data frame went through (the observer sees the same bytes: a
    /// clone is a reference count); `last` when the body has nothing more
    /// after it (hyper stops polling a sized body then).
    fn on_data(&mut self, _data: &Bytes, _last: bool) {}
    /// The body ended cleanly.
    fn on_end(&mut self) {}
    /// The body failed.
    fn on_error(&mut self, _error: &(dyn std::error::Error + 'static)) {}
    /// The body was dropped before it ended or failed (the client left).
    fn on_cancel(&mut self) {}
}

/// An observer and whether it has been told how the body ended; telling it
/// `on_cancel` on drop otherwise.
struct Watch<O: Observer> {
    observer: O,
    over: bool,
}

impl<O: Observer> Drop for Watch<O> {
    fn drop(&mut self) {
        if !self.over {
            self.observer.on_cancel();
        }
    }
}

pin_project_lite::pin_project! {
    /// `inner`, passed through unchanged, with `observer` told what happens.
    pub struct Observed<B, O: Observer> {
        #[pin]
        inner: B,
        watch: Watch<O>,
    }
}

impl<B, O: Observer> Observed<B, O> {
    /// Wraps `inner`.
    pub fn new(inner: B, observer: O) -> Self {
        Self {
            inner,
            watch: Watch {
                observer,
                over: false,
            },
        }
    }
}

impl<B, O> Body for Observed<B, O>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + 'static,
    O: Observer,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let watch = this.watch;
        if !watch.over {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        let last = this.inner.is_end_stream();
                        watch.observer.on_data(data, last);
                        if last {
                            watch.over = true;
                            watch.observer.on_end();
                        }
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    watch.over = true;
                    watch.observer.on_error(error);
                }
                Poll::Ready(None) => {
                    watch.over = true;
                    watch.observer.on_end();
                }
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An observer that only keeps something alive for as long as the body:
/// a deployment's in-flight count, the request's in-flight permit.
pub struct Hold<T>(pub T);

impl<T> Observer for Hold<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl Observer for Seen {
        fn on_data(&mut self, data: &Bytes, last: bool) {
            let len = data.len();
            self.0.lock().unwrap().push(format!("data {len} {last}"));
        }
        fn on_end(&mut self) {
            self.0.lock().unwrap().push("end".into());
        }
        fn on_error(&mut self, _: &(dyn std::error::Error + 'static)) {
            self.0.lock().unwrap().push("error".into());
        }
        fn on_cancel(&mut self) {
            self.0.lock().unwrap().push("cancel".into());
        }
    }

    #[tokio::test]
    async fn each_hook_fires_once_in_order() {
        let seen = Seen::default();
        let body = Observed::new(
            http_body_util::Full::new(Bytes::from_static(b"abc")),
            seen.clone(),
        );
        body.collect().await.unwrap();
        assert_eq!(*seen.0.lock().unwrap(), ["data 3 true", "end"]);

        let seen = Seen::default();
        let (mut tx, channel) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(2);
        let mut body = Box::pin(Observed::new(channel, seen.clone()));
        tx.send_data(Bytes::from_static(b"x")).await.unwrap();
        body.frame().await.unwrap().unwrap();
        tx.abort(std::io::Error::other("cut"));
        assert!(body.frame().await.unwrap().is_err());
        drop(body);
        assert_eq!(*seen.0.lock().unwrap(), ["data 1 false", "error"]);

        let seen = Seen::default();
        let (_tx, channel) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(2);
        drop(Observed::new(channel, seen.clone()));
        assert_eq!(*seen.0.lock().unwrap(), ["cancel"]);
    }
}
