//! One model's attempt chain: pick a deployment, send, and on a failure
//! worth retrying wait (backoff, or the upstream's `retry-after`) and try
//! again — elsewhere first — within the model's attempts and deadline.
//!
//! Nothing reaches the client while this runs (a body is only streamed once
//! an answer is kept), so a retry can never duplicate output. A client that
//! leaves drops the future, which ends the chain wherever it is, backoff
//! included.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, header};
use tokio::time::Instant;

use crate::config::Retry;
use crate::error::ProxyError;
use crate::ingress::openai::rename_model;
use crate::telemetry::UpstreamInfo;
use crate::upstream::Upstreams;
use crate::upstream::attempt::{Outcome, buffered, send};
use crate::wire;

use super::{Route, Unavailable, now_ms, random};

/// The parts of a routed request every attempt is built from.
pub struct Attempted<'a> {
    /// The client's request head.
    pub parts: &'a http::request::Parts,
    /// The client's body, read whole.
    pub bytes: &'a Bytes,
    /// The model the client asked for, and where its JSON string stands in `bytes`.
    pub model: &'a str,
    /// See `model`.
    pub span: std::ops::Range<usize>,
}

/// What a routed request did, for its answer and its log line.
#[derive(Debug, Default)]
pub struct Trace {
    /// Attempts made, over the model and its fallbacks.
    pub attempts: u32,
    /// Each attempt as `upstream:status` or `upstream:error_kind`, comma-separated.
    pub path: String,
    /// The upstream of the last attempt.
    pub upstream: Option<HeaderValue>,
}

/// Whether an attempt's outcome is worth another attempt under `policy`.
fn retryable(policy: &Retry, outcome: &Outcome) -> bool {
    match outcome {
        Ok(response) => policy.on_status.contains(response.status().as_u16()),
        Err(err) => match err.root() {
            ProxyError::UpstreamUnreachable(_) => policy.on_connect_error,
            ProxyError::ConnectTimeout(_) | ProxyError::UpstreamTimeout(_) => policy.on_timeout,
            _ => false,
        },
    }
}

/// Whether an outcome says the deployment is in trouble (its breaker counts
/// it): server errors, rate limits, Anthropic's 529 overloaded, and no answer at all. Independent of
/// what the retry policy chooses to retry.
fn deployment_failed(outcome: &Outcome) -> bool {
    match outcome {
        Ok(response) => matches!(
            response.status().as_u16(),
            429 | 500 | 502 | 503 | 504 | 529
        ),
        Err(err) => err.is_retryable(),
    }
}

/// Runs `route`'s attempt chain. Returns the last outcome and whether it
/// ended exhausted (still retryable when attempts or the deadline ran out,
/// or no deployment could take it), so the caller can fall back.
pub async fn attempt_chain(
    upstreams: &Upstreams,
    route: &Route,
    request: &Attempted<'_>,
    trace: &mut Trace,
) -> (Outcome, bool) {
    let policy = &route.retry;
    let started = Instant::now();
    let mut tried = 0u64;
    let mut attempt = 1u32;
    // The last attempt's own failure: when the breakers then close every
    // door, it is the real cause, and the answer names it.
    let mut last_error: Option<ProxyError> = None;
    let session = route
        .session_header
        .as_ref()
        .and_then(|name| request.parts.headers.get(name))
        .map(|value| super::balance::session_key(value.as_bytes()))
        .or_else(|| {
            route
                .session_user
                .then(|| crate::ingress::openai::user(request.bytes))
                .flatten()
                .map(|user| super::balance::session_key(user.as_bytes()))
        });
    loop {
        let now = now_ms();
        let admitted = match route.pick_available(tried, now, session) {
            Ok(admitted) => admitted,
            // Nowhere to go: exhausted, so fallbacks get a turn.
            Err(reason) => {
                let error = match (last_error, reason) {
                    (Some(error), _) => error,
                    (None, Unavailable::Cooling) => ProxyError::ModelUnavailable {
                        model: route.name.clone(),
                        retry_after: Duration::from_millis(route.retry_after_ms(now)),
                    },
                    (None, Unavailable::AtCapacity) => {
                        ProxyError::ModelAtCapacity(route.name.clone())
                    }
                };
                return (Err(error), true);
            }
        };
        let (index, in_flight, _probe) = (admitted.index, admitted.in_flight, admitted.probe);
        let deployment = Arc::clone(admitted.deployment);
        tried |= 1u64.checked_shl(index as u32).unwrap_or(0);
        let Some(target) = upstreams.targets.get(deployment.upstream) else {
            return (
                Err(ProxyError::UpstreamUnreachable("no such upstream".into())),
                false,
            );
        };
        let wanted = route.upstream_model(&deployment, request.model);
        let body = if wanted == request.model {
            request.bytes.clone()
        } else {
            rename_model(request.bytes, request.span.clone(), wanted)
        };
        let mut headers = request.parts.headers.clone();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let mut builder = http::Request::new(());
        *builder.method_mut() = request.parts.method.clone();
        *builder.uri_mut() = request.parts.uri.clone();
        *builder.headers_mut() = headers;
        let (attempt_parts, ()) = builder.into_parts();

        trace.attempts += 1;
        let sent = Instant::now();
        let timeouts = target.upstream.timeouts.with(route.timeouts);
        // The deployment stays busy until the answer has been streamed.
        let outcome = send(
            upstreams.max_body_size,
            target,
            timeouts,
            attempt_parts,
            buffered(body),
            in_flight,
        )
        .await;

        if let Ok(response) = &outcome
            && let Some(info) = response.extensions().get::<UpstreamInfo>()
        {
            deployment.observe(info.headers_after);
        }
        if deployment_failed(&outcome) {
            deployment.record_failure(now_ms());
        } else {
            deployment.record_success();
        }
        let status;
        let result: &str = match &outcome {
            Ok(response) => {
                status = response.status();
                status.as_str()
            }
            Err(err) => err.kind(),
        };
        if !trace.path.is_empty() {
            trace.path.push(',');
        }
        let _ = write!(trace.path, "{}:{result}", target.upstream.name);
        trace.upstream = Some(target.name_header.clone());
        tracing::debug!(
            model = route.name.as_str(),
            upstream = target.upstream.name.as_str(),
            attempt = trace.attempts,
            outcome = result,
            duration_us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX),
            "attempt"
        );

        let untried_left = (tried.count_ones() as usize) < route.deployments.len();
        if !retryable(policy, &outcome) {
            return (outcome, false);
        }
        let wait = match &outcome {
            Ok(response) => {
                let backoff = backoff(policy, attempt);
                match wire::retry_after(response.headers()) {
                    // Another deployment is not bound by this one's retry-after.
                    Some(_) if untried_left => Some(backoff),
                    Some(asked) if asked <= policy.retry_after_cap => Some(asked.max(backoff)),
                    Some(_) => None,
                    None => Some(backoff),
                }
            }
            Err(_) => Some(backoff(policy, attempt)),
        };
        match wait {
            Some(wait)
                if attempt < policy.attempts && started.elapsed() + wait < policy.deadline =>
            {
                last_error = outcome.err();
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            // Retryable, but out of attempts, time, or patience for retry-after.
            _ => return (outcome, true),
        }
    }
}

/// Exponential backoff with full jitter: a random wait up to
/// `backoff × 2^(attempt−1)`, capped at `max_backoff`.
fn backoff(policy: &Retry, attempt: u32) -> Duration {
    let ceiling = policy
        .backoff
        .saturating_mul(
            1u32.checked_shl(attempt.saturating_sub(1))
                .unwrap_or(u32::MAX),
        )
        .min(policy.max_backoff);
    let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(random() % micros.saturating_add(1))
}
