//! The wire formats upstreams speak. `openai` is passed through byte-exact
//! and never enters this module; every other provider translates the
//! OpenAI request it is given into its own API ([`prepare`]) and its
//! answer back ([`answer`]), incrementally for streams ([`Translating`]).
//!
//! Providers are an enum, not a trait object: there are few, each is a
//! module of plain functions, and a `match` keeps the pass-through path
//! free of any indirection.

pub mod anthropic;
pub mod gemini;

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::HeaderValue;
use http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE,
};
use http_body::Frame;
use http_body_util::BodyExt;

use crate::config::Provider;
use crate::error::ProxyError;
use crate::upstream::RequestBody;
use crate::upstream::attempt::buffered;

/// Largest answer read whole for translation (a non-streamed one).
const MAX_ANSWER: usize = 32 << 20;

/// Which translation an answer needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Anthropic's answer into OpenAI's.
    Anthropic,
    /// Gemini's answer into OpenAI's.
    Gemini,
    /// An OpenAI answer into Anthropic's, for a Messages client.
    Messages,
}

/// What the answer's translation needs to know about its request.
#[derive(Debug, Clone)]
pub struct Pending {
    kind: Kind,
    model: String,
    stream: bool,
    include_usage: bool,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Translates the request for `provider` (not `openai`): its path, headers
/// and body. Only Chat Completions can be translated; any other endpoint
/// is a 400 naming the provider.
pub async fn prepare(
    provider: &Provider,
    upstream: &str,
    parts: &mut http::request::Parts,
    body: RequestBody,
    max_body_size: u64,
) -> Result<(RequestBody, Option<Pending>), ProxyError> {
    let dialect = match provider {
        Provider::OpenAi if is_messages(parts.uri.path()) => {
            return messages_to_chat(parts, body, max_body_size).await;
        }
        Provider::OpenAi => return Ok((body, None)),
        Provider::Azure { api_version } => {
            let body = azure(api_version, parts, body, max_body_size).await?;
            return Ok((body, None));
        }
        Provider::Anthropic(settings) => {
            // The Messages API itself (Claude Code, the Anthropic SDKs):
            // passed through as sent, the client's `anthropic-version` and
            // `anthropic-beta` included.
            if is_messages(parts.uri.path()) {
                if !parts.headers.contains_key("anthropic-version") {
                    parts
                        .headers
                        .insert("anthropic-version", settings.version.clone());
                }
                return Ok((body, None));
            }
            "Anthropic's Messages API"
        }
        Provider::Gemini => "Google's Gemini API",
    };
    let path = parts.uri.path();
    if parts.method != http::Method::POST || path.trim_end_matches('/') != "/v1/chat/completions" {
        return Err(ProxyError::NotServed(format!(
            "upstream {upstream} speaks {dialect}: llmproxy translates POST /v1/chat/completions for it, not {} {path}",
            parts.method
        )));
    }
    let bytes = whole_body(body, max_body_size).await?;
    let model = crate::ingress::openai::facts(&bytes)
        .model
        .unwrap_or_default();
    let (translated, pending) = match provider {
        Provider::Anthropic(settings) => {
            let translated = anthropic::request(settings, &bytes).map_err(ProxyError::NotServed)?;
            parts.uri = http::Uri::from_static("/v1/messages");
            parts
                .headers
                .insert("anthropic-version", settings.version.clone());
            let pending = Pending {
                kind: Kind::Anthropic,
                model,
                stream: translated.stream,
                include_usage: translated.include_usage,
            };
            (translated.body, pending)
        }
        _ => {
            let translated = gemini::request(&bytes).map_err(ProxyError::NotServed)?;
            parts.uri = http::Uri::try_from(translated.path.as_str()).map_err(|e| {
                ProxyError::NotServed(format!("the Gemini path cannot be made: {e}"))
            })?;
            let pending = Pending {
                kind: Kind::Gemini,
                model,
                stream: translated.stream,
                include_usage: translated.include_usage,
            };
            (translated.body, pending)
        }
    };
    let headers = &mut parts.headers;
    // The client's credentials are for llmproxy or for another provider:
    // the upstream gets only its `default_headers`.
    for name in [
        AUTHORIZATION.as_str(),
        "x-api-key",
        "api-key",
        "x-goog-api-key",
    ] {
        headers.remove(name);
    }
    // Translated bytes must be plain: no compressed answer to re-encode.
    headers.remove(ACCEPT_ENCODING);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(translated.len()));
    Ok((buffered(translated), Some(pending)))
}

/// A Messages request for an OpenAI-compatible upstream: sent as Chat
/// Completions, its answer turned back into Anthropic's.
async fn messages_to_chat(
    parts: &mut http::request::Parts,
    body: RequestBody,
    max_body_size: u64,
) -> Result<(RequestBody, Option<Pending>), ProxyError> {
    if parts.uri.path().trim_end_matches('/') != "/v1/messages" {
        return Err(ProxyError::NotServed(
            "/v1/messages/count_tokens is answered by Anthropic upstreams only".into(),
        ));
    }
    let bytes = whole_body(body, max_body_size).await?;
    let stream = crate::ingress::openai::facts(&bytes).stream;
    let chat = crate::ingress::anthropic::request(&bytes).map_err(ProxyError::NotServed)?;
    parts.uri = http::Uri::from_static("/v1/chat/completions");
    for name in [
        "anthropic-version",
        "anthropic-beta",
        ACCEPT_ENCODING.as_str(),
    ] {
        parts.headers.remove(name);
    }
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(chat.len()));
    let pending = Pending {
        kind: Kind::Messages,
        model: String::new(),
        stream,
        include_usage: true,
    };
    Ok((buffered(chat), Some(pending)))
}

/// The request body, whole (a translation needs all of it; routed requests
/// already hold it), within `limits.max_body_size`.
async fn whole_body(body: RequestBody, max_body_size: u64) -> Result<Bytes, ProxyError> {
    let limit = usize::try_from(max_body_size).unwrap_or(usize::MAX);
    http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|e| ProxyError::BadRequest(format!("the request body could not be read: {e}")))
}

/// Appends `items` as a turn of `role` (under `key`: Anthropic's
/// `content`, Gemini's `parts`), merged into the last turn when it has the
/// same role: both APIs want the roles to alternate.
fn push_turn(
    turns: &mut Vec<serde_json::Value>,
    key: &str,
    role: &str,
    mut items: Vec<serde_json::Value>,
) {
    if items.is_empty() {
        return;
    }
    if let Some(last) = turns.last_mut()
        && last["role"] == role
        && let Some(existing) = last[key].as_array_mut()
    {
        existing.append(&mut items);
        return;
    }
    turns.push(serde_json::json!({"role": role, key: items}));
}

/// An assistant tool call's `arguments` as JSON (empty means `{}`); a
/// refusal naming `messages[i].tool_calls[j]` when they are not JSON.
fn call_arguments(
    call: &serde_json::Value,
    at: &str,
    j: usize,
) -> Result<serde_json::Value, String> {
    let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
    let arguments = if arguments.trim().is_empty() {
        "{}"
    } else {
        arguments
    };
    serde_json::from_str(arguments)
        .map_err(|_| format!("{at}.tool_calls[{j}].function.arguments is not JSON"))
}

/// The chat request's `stop` (a string or a list) as a list, if any.
fn stop_list(stop: Option<&serde_json::Value>) -> Option<serde_json::Value> {
    match stop? {
        serde_json::Value::String(stop) => Some(serde_json::json!([stop])),
        serde_json::Value::Array(stops) if !stops.is_empty() => {
            Some(serde_json::Value::Array(stops.clone()))
        }
        _ => None,
    }
}

/// Whether `path` is Anthropic's own Messages API.
fn is_messages(path: &str) -> bool {
    matches!(
        path.trim_end_matches('/'),
        "/v1/messages" | "/v1/messages/count_tokens"
    )
}

/// An Azure OpenAI classic deployment: `/v1/X` becomes
/// `/openai/deployments/{model}/X?api-version=…`, the deployment being the
/// request's (routed) model; the body and the answer pass unchanged.
async fn azure(
    api_version: &str,
    parts: &mut http::request::Parts,
    body: RequestBody,
    max_body_size: u64,
) -> Result<RequestBody, ProxyError> {
    let bytes = whole_body(body, max_body_size).await?;
    let model = crate::ingress::openai::facts(&bytes)
        .model
        .unwrap_or_default();
    if !gemini::valid_model(&model) {
        return Err(ProxyError::NotServed(format!(
            "an Azure deployment is named by the request's `model`, and {model:?} is not a deployment name (letters, digits, `-`, `.`, `_`)"
        )));
    }
    let rest = parts
        .uri
        .path()
        .strip_prefix("/v1")
        .unwrap_or(parts.uri.path());
    let query = parts.uri.query().map_or(String::new(), |q| format!("&{q}"));
    let path = format!("/v1/openai/deployments/{model}{rest}?api-version={api_version}{query}");
    parts.uri = http::Uri::try_from(path)
        .map_err(|e| ProxyError::NotServed(format!("the Azure path cannot be made: {e}")))?;
    for name in [AUTHORIZATION.as_str(), "x-api-key", "api-key"] {
        parts.headers.remove(name);
    }
    Ok(buffered(bytes))
}

/// The upstream's answer in the OpenAI format: a stream translated as it
/// passes; a whole answer (or an error) read, translated, sent.
pub async fn answer(pending: Pending, response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.remove(CONTENT_ENCODING);
    let success = parts.status.is_success();
    if success && pending.stream {
        parts
            .headers
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        let translator = match pending.kind {
            Kind::Gemini => Translator::Gemini(gemini::StreamTranslator::new(
                pending.include_usage,
                &pending.model,
                unix_now(),
            )),
            Kind::Anthropic => Translator::Anthropic(anthropic::StreamTranslator::new(
                pending.include_usage,
                unix_now(),
            )),
            Kind::Messages => {
                Translator::Messages(crate::ingress::anthropic::StreamTranslator::default())
            }
        };
        return Response::from_parts(parts, Body::new(Translating::new(body, translator)));
    }
    let whole = match http_body_util::Limited::new(body, MAX_ANSWER)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(err) => {
            return ProxyError::UpstreamProtocol(format!(
                "the answer's body failed before it ended: {err}"
            ))
            .into_response();
        }
    };
    let translated = match (pending.kind, success) {
        (Kind::Anthropic, true) => anthropic::response(&whole, unix_now()),
        (Kind::Anthropic, false) => anthropic::error(&whole),
        (Kind::Gemini, true) => gemini::response(&whole, &pending.model, unix_now()),
        (Kind::Gemini, false) => gemini::error(&whole),
        (Kind::Messages, true) => crate::ingress::anthropic::response(&whole),
        (Kind::Messages, false) => Some(crate::ingress::anthropic::error(
            parts.status.as_u16(),
            &whole,
        )),
    };
    match translated {
        Some(bytes) => {
            parts
                .headers
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Response::from_parts(parts, Body::from(bytes))
        }
        // An error that is not Anthropic's shape reaches the client as it was.
        None if !success => Response::from_parts(parts, Body::from(whole)),
        None => ProxyError::UpstreamProtocol(format!(
            "the {} upstream's answer is not one it can give",
            match pending.kind {
                Kind::Gemini => "Gemini",
                Kind::Anthropic => "Anthropic",
                Kind::Messages => "OpenAI-compatible",
            }
        ))
        .into_response(),
    }
}

/// One stream's translator, by provider.
#[derive(Debug)]
enum Translator {
    Anthropic(anthropic::StreamTranslator),
    Gemini(gemini::StreamTranslator),
    Messages(crate::ingress::anthropic::StreamTranslator),
}

impl Translator {
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            Self::Anthropic(t) => t.feed(data, out),
            Self::Gemini(t) => t.feed(data, out),
            Self::Messages(t) => t.feed(data, out),
        }
    }

    /// The upstream's body failed: a Messages client is told by an
    /// `error` event before the abort; OpenAI clients only see the abort.
    fn interrupted(&mut self, cause: &str, out: &mut Vec<u8>) {
        if let Self::Messages(t) = self {
            t.interrupted(cause, out);
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            Self::Anthropic(t) => t.finish(out),
            Self::Gemini(t) => t.finish(out),
            Self::Messages(t) => t.finish(out),
        }
    }
}

pin_project_lite::pin_project! {
    /// A provider's event stream, translated into OpenAI chunks as it
    /// passes. A failure (in-band `error` event, a stream that ends before
    /// its last event) ends the body with an error, so the client's
    /// response aborts and never looks complete.
    pub struct Translating {
        #[pin]
        inner: Body,
        translator: Translator,
        out: Vec<u8>,
        done: bool,
        // A failure held back until the bytes written before it are out
        // (a Messages client's `error` event).
        failure: Option<String>,
        yielded: bool,
    }
}

impl Translating {
    fn new(inner: Body, translator: Translator) -> Self {
        Self {
            inner,
            translator,
            out: Vec::new(),
            done: false,
            failure: None,
            yielded: false,
        }
    }
}

fn failed(message: String) -> axum::Error {
    axum::Error::new(std::io::Error::other(message))
}

impl http_body::Body for Translating {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let mut this = self.project();
        if this.failure.is_some() {
            // Yield once first: the server writes out the bytes before the
            // error (the `error` event) only when the body is pending; an
            // error right after them would drop them with the connection.
            if !*this.yielded {
                *this.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if let Some(failure) = this.failure.take() {
                return Poll::Ready(Some(Err(failed(failure))));
            }
        }
        if *this.done {
            return Poll::Ready(None);
        }
        loop {
            match std::task::ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if let Err(err) = this.translator.feed(&data, this.out) {
                        *this.done = true;
                        if this.out.is_empty() {
                            return Poll::Ready(Some(Err(failed(err))));
                        }
                        *this.failure = Some(err);
                        let chunk = Bytes::from(std::mem::take(this.out));
                        return Poll::Ready(Some(Ok(Frame::data(chunk))));
                    }
                    if !this.out.is_empty() {
                        let chunk = Bytes::from(std::mem::take(this.out));
                        return Poll::Ready(Some(Ok(Frame::data(chunk))));
                    }
                }
                Some(Err(err)) => {
                    *this.done = true;
                    this.translator.interrupted(&err.to_string(), this.out);
                    if this.out.is_empty() {
                        return Poll::Ready(Some(Err(err)));
                    }
                    *this.failure = Some(err.to_string());
                    let chunk = Bytes::from(std::mem::take(this.out));
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                None => {
                    *this.done = true;
                    return Poll::Ready(Some(match this.translator.finish(this.out) {
                        Ok(()) if this.out.is_empty() => return Poll::Ready(None),
                        Ok(()) => {
                            let chunk = Bytes::from(std::mem::take(this.out));
                            // The last bytes now; the end on the next poll.
                            Ok(Frame::data(chunk))
                        }
                        Err(err) if this.out.is_empty() => Err(failed(err)),
                        Err(err) => {
                            *this.failure = Some(err);
                            Ok(Frame::data(Bytes::from(std::mem::take(this.out))))
                        }
                    }));
                }
            }
        }
    }
}
