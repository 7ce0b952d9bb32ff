//! A panic while handling a request becomes a logged 500 in the OpenAI error
//! shape, never a connection dropped without an answer.
//!
//! Panics are defects (the request path has no `unwrap`, and untrusted input
//! is parsed with checked arithmetic in `wire.rs`); this layer is the net
//! under them. It sits inside the access log, so the request still gets its
//! one log line, with `error=internal_error`. A panic while a body is
//! already streaming can only end that stream: its headers are gone.

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::response::{IntoResponse, Response};
use http::Request;

use crate::error::ProxyError;

/// Wraps a service whose futures may panic.
#[derive(Clone)]
pub struct CatchPanic<S>(pub S);

impl<S, B> tower::Service<Request<B>> for CatchPanic<S>
where
    S: tower::Service<Request<B>, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = CatchPanicFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // `AssertUnwindSafe`: after a panic the inner future is dropped, never
        // polled again, so no half-updated state of it is observed.
        match catch_unwind(AssertUnwindSafe(|| self.0.call(request))) {
            Ok(inner) => CatchPanicFuture { inner: Some(inner) },
            Err(payload) => {
                report(payload.as_ref());
                CatchPanicFuture { inner: None }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner future, or `None` once it has panicked.
    pub struct CatchPanicFuture<F> {
        #[pin]
        inner: Option<F>,
    }
}

impl<F> Future for CatchPanicFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(Ok(ProxyError::Internal.into_response()));
        };
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(polled) => polled,
            Err(payload) => {
                report(payload.as_ref());
                this.inner.set(None);
                Poll::Ready(Ok(ProxyError::Internal.into_response()))
            }
        }
    }
}

fn report(payload: &(dyn Any + Send)) {
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    tracing::error!(panic = message, "a request handler panicked; answered 500");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::Service;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_in_the_openai_shape() {
        let router = axum::Router::new().route(
            "/boom",
            axum::routing::get(|| async {
                if std::hint::black_box(true) {
                    panic!("a defect");
                }
                String::new()
            }),
        );
        let mut service = CatchPanic(router);
        let response = service
            .call(
                Request::get("/boom")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), 500);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"]["code"], "internal_error");
    }
}
