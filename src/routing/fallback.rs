//! A model's way out when its own deployments cannot answer: its
//! `fallbacks` in order when it is exhausted, and its
//! `context_window_fallbacks` when the upstream says the request is too long.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use http_body_util::BodyExt;

use crate::error::ProxyError;
use crate::stream::Replay;
use crate::upstream::Upstreams;
use crate::upstream::attempt::Outcome;

use super::retry::{Attempted, Trace, attempt_chain};
use super::{ModelRouter, Route};

/// Serves a routed request: the model's attempt chain, then its fallbacks.
pub async fn serve(
    upstreams: &Upstreams,
    router: &ModelRouter,
    primary: &Route,
    request: &Attempted<'_>,
    trace: &mut Trace,
) -> Outcome {
    let (mut outcome, mut exhausted) = attempt_chain(upstreams, primary, request, trace).await;
    // Its deployments exhausted, the model hands over to its fallbacks in order.
    let mut fallbacks = primary.fallbacks.iter().filter_map(|&i| router.route(i));
    while exhausted {
        let Some(fallback) = fallbacks.next() else {
            break;
        };
        (outcome, exhausted) = attempt_chain(upstreams, fallback, request, trace).await;
    }
    // A request too long for the model's context goes to a bigger one.
    for fallback in primary
        .context_window_fallbacks
        .iter()
        .filter_map(|&i| router.route(i))
    {
        let response = match outcome {
            Ok(response) if response.status() == http::StatusCode::BAD_REQUEST => response,
            other => return other,
        };
        let (too_long, response) = context_length_exceeded(response).await;
        if !too_long {
            return Ok(response);
        }
        outcome = attempt_chain(upstreams, fallback, request, trace).await.0;
    }
    outcome
}

/// Whether an upstream's 400 says the request exceeds the context window.
///
/// Only the first 64 KiB are read to decide (provider error bodies are far
/// smaller); whatever was read is put back in front of the rest, so the
/// client gets the upstream's whole answer, however long, when it is not
/// a context-length error.
async fn context_length_exceeded(response: Response) -> (bool, Response) {
    const PEEK: usize = 64 * 1024;
    const CODE: &[u8] = b"context_length_exceeded";
    let (parts, mut body) = response.into_parts();
    let mut peeked = BytesMut::new();
    while peeked.len() < PEEK {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    peeked.extend_from_slice(&data);
                }
            }
            Some(Err(err)) => {
                return (
                    false,
                    ProxyError::UpstreamUnreachable(format!(
                        "reading the upstream's error failed: {err}"
                    ))
                    .into_response(),
                );
            }
            None => break,
        }
    }
    let hit = peeked.windows(CODE.len()).any(|w| w == CODE);
    let body = Body::new(Replay::new(peeked.freeze(), body));
    (hit, Response::from_parts(parts, body))
}
