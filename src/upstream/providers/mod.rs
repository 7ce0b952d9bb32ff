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

/// The API the client spoke, when its answer must be turned back into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Front {
    /// Chat Completions: the hub every translation goes through.
    Chat,
    /// Anthropic's Messages API.
    Messages,
    /// OpenAI's Responses API, stateless.
    Responses,
}

/// The upstream's dialect, when it is not OpenAI's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Anthropic,
    Gemini,
}

/// What the answer's translation needs to know about its request: the
/// upstream's dialect is turned into Chat, and Chat into the client's API
/// (either step may be nothing; never both).
#[derive(Debug, Clone)]
pub struct Pending {
    front: Front,
    dialect: Option<Dialect>,
    model: String,
    stream: bool,
    /// The Chat stream (the hub) ends with a usage chunk.
    include_usage: bool,
}

/// What [`prepare`] made of a request.
pub enum Prepared {
    /// Send this body; translate the answer when there is a [`Pending`].
    Send(RequestBody, Option<Pending>),
    /// Answered without the upstream (a token count estimate).
    Answered(Response),
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The client's API, by path; `None` for every other endpoint.
fn front_of(path: &str) -> Option<Front> {
    match path.trim_end_matches('/') {
        "/v1/chat/completions" => Some(Front::Chat),
        "/v1/messages" => Some(Front::Messages),
        "/v1/responses" => Some(Front::Responses),
        _ => None,
    }
}

/// Translates the request for `provider`: its path, headers and body.
/// Chat Completions is the hub: a Messages or Responses request becomes a
/// Chat request first, and that becomes the upstream's own. What cannot be
/// translated is a 400 naming the provider and the endpoint.
pub async fn prepare(
    provider: &Provider,
    upstream: &str,
    parts: &mut http::request::Parts,
    body: RequestBody,
    max_body_size: u64,
) -> Result<Prepared, ProxyError> {
    let path = parts.uri.path().trim_end_matches('/');
    let counting = path == "/v1/messages/count_tokens";
    let front = front_of(path);
    let (dialect, name) = match provider {
        // The Messages API itself (Claude Code, the Anthropic SDKs):
        // passed through as sent, `anthropic-version` and `anthropic-beta`
        // included, count_tokens answered by Anthropic; so is the model
        // list Claude Code reads at its start (Anthropic has one).
        Provider::Anthropic(settings)
            if counting
                || front == Some(Front::Messages)
                || (parts.method == http::Method::GET && is_models(path)) =>
        {
            if !parts.headers.contains_key("anthropic-version") {
                parts
                    .headers
                    .insert("anthropic-version", settings.version.clone());
            }
            return Ok(Prepared::Send(body, None));
        }
        Provider::Anthropic(_) => (Some(Dialect::Anthropic), "Anthropic's Messages API"),
        Provider::Gemini => (Some(Dialect::Gemini), "Google's Gemini API"),
        Provider::OpenAi | Provider::Azure { .. } => (None, "the OpenAI API"),
    };
    if counting {
        let bytes = whole_body(body, max_body_size).await?;
        return Ok(Prepared::Answered(count_tokens(&bytes)?));
    }
    let front = match front {
        // OpenAI-compatible upstreams translate only the Messages API.
        Some(front) if dialect.is_some() || front == Front::Messages => front,
        _ if dialect.is_none() => {
            let body = match provider {
                Provider::Azure { api_version } => {
                    azure(api_version, parts, body, max_body_size).await?
                }
                _ => body,
            };
            return Ok(Prepared::Send(body, None));
        }
        _ => return Err(not_served(upstream, name, parts)),
    };
    if parts.method != http::Method::POST {
        return Err(not_served(upstream, name, parts));
    }
    let bytes = whole_body(body, max_body_size).await?;
    let chat = match front {
        Front::Chat => Ok(bytes),
        Front::Messages => crate::ingress::anthropic::request(&bytes),
        Front::Responses => crate::ingress::responses::request(&bytes),
    }
    .map_err(ProxyError::NotServed)?;
    let facts = crate::ingress::openai::facts(&chat);
    let (model, stream) = (facts.model.unwrap_or_default(), facts.stream);
    let headers = &mut parts.headers;
    // The client's credentials are for llmproxy or for another provider:
    // a translated upstream gets only its `default_headers`.
    for name in [
        "x-api-key",
        "x-goog-api-key",
        "anthropic-version",
        "anthropic-beta",
    ] {
        headers.remove(name);
    }
    if dialect.is_some() {
        headers.remove(AUTHORIZATION);
        headers.remove("api-key");
    }
    // Translated bytes must be plain: no compressed answer to re-encode.
    headers.remove(ACCEPT_ENCODING);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let (translated, stream, include_usage) = match (provider, dialect) {
        (Provider::Anthropic(settings), _) => {
            let translated = anthropic::request(settings, &chat).map_err(ProxyError::NotServed)?;
            parts.uri = http::Uri::from_static("/v1/messages");
            headers.insert("anthropic-version", settings.version.clone());
            (translated.body, translated.stream, translated.include_usage)
        }
        (_, Some(Dialect::Gemini)) => {
            let translated = gemini::request(&chat).map_err(ProxyError::NotServed)?;
            parts.uri = http::Uri::try_from(translated.path.as_str()).map_err(|e| {
                ProxyError::NotServed(format!("the Gemini path cannot be made: {e}"))
            })?;
            (translated.body, translated.stream, translated.include_usage)
        }
        (Provider::Azure { api_version }, _) => {
            parts.uri = http::Uri::from_static("/v1/chat/completions");
            headers.insert(CONTENT_LENGTH, HeaderValue::from(chat.len()));
            let body = azure(api_version, parts, buffered(chat), max_body_size).await?;
            let pending = Pending {
                front,
                dialect,
                model,
                stream,
                include_usage: true,
            };
            return Ok(Prepared::Send(body, Some(pending)));
        }
        _ => {
            parts.uri = http::Uri::from_static("/v1/chat/completions");
            (chat, stream, true)
        }
    };
    headers.insert(CONTENT_LENGTH, HeaderValue::from(translated.len()));
    let pending = Pending {
        front,
        dialect,
        model,
        stream,
        include_usage,
    };
    Ok(Prepared::Send(buffered(translated), Some(pending)))
}

/// One `chat.completion.chunk` event: `prefix` (`data: {"id":…,"choices":[`),
/// the choice with the delta made of `delta`'s pieces, its `finish_reason`.
fn write_chunk(prefix: &[u8], delta: &[&[u8]], finish: Option<&str>, out: &mut Vec<u8>) {
    out.extend_from_slice(prefix);
    out.extend_from_slice(b"{\"index\":0,\"delta\":");
    for part in delta {
        out.extend_from_slice(part);
    }
    match finish {
        Some(reason) => {
            out.extend_from_slice(b",\"finish_reason\":\"");
            out.extend_from_slice(reason.as_bytes());
            out.extend_from_slice(b"\"}]}\n\n");
        }
        None => out.extend_from_slice(b",\"finish_reason\":null}]}\n\n"),
    }
}

/// `GET /v1/models` or `/v1/models/{id}`.
fn is_models(path: &str) -> bool {
    path == "/v1/models" || path.starts_with("/v1/models/")
}

fn not_served(upstream: &str, dialect: &str, parts: &http::request::Parts) -> ProxyError {
    ProxyError::NotServed(format!(
        "upstream {upstream} speaks {dialect}: llmproxy translates POST /v1/chat/completions, /v1/responses and /v1/messages for it, not {} {}",
        parts.method,
        parts.uri.path()
    ))
}

/// Anthropic's `count_tokens` answered for an upstream that has no such
/// endpoint: an estimate of ⌈characters / 4⌉ over every string of the
/// request's `system`, `messages` and `tools` (the tokenizers are not
/// public; four characters a token is the usual rule for English and code).
fn count_tokens(body: &[u8]) -> Result<Response, ProxyError> {
    fn characters(value: &serde_json::Value) -> usize {
        match value {
            serde_json::Value::String(text) => text.chars().count(),
            serde_json::Value::Array(items) => items.iter().map(characters).sum(),
            serde_json::Value::Object(map) => map.values().map(characters).sum(),
            _ => 0,
        }
    }
    let request: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| {
            ProxyError::BadRequest(format!("the request body is not a JSON object: {e}"))
        })?;
    let total: usize = ["system", "messages", "tools"]
        .iter()
        .filter_map(|key| request.get(*key))
        .map(characters)
        .sum();
    let answer = serde_json::json!({"input_tokens": total.div_ceil(4)});
    Ok((
        [(
            http::header::HeaderName::from_static("x-llmproxy-token-count"),
            "estimate",
        )],
        axum::Json(answer),
    )
        .into_response())
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

/// Appends `items` as a turn of `role` (its items under `key`), merged into
/// the last turn when it has the same role: Gemini wants the roles to
/// alternate (Anthropic's typed turns do the same in `anthropic::push`).
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

/// The upstream's answer in the client's API: a stream translated as it
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
        let translator = Translator::new(&pending);
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
    let Some(chat) = (match (pending.dialect, success) {
        (None, _) => Some(whole.clone()),
        (Some(Dialect::Anthropic), true) => anthropic::response(&whole, unix_now()),
        (Some(Dialect::Anthropic), false) => anthropic::error(&whole),
        (Some(Dialect::Gemini), true) => gemini::response(&whole, &pending.model, unix_now()),
        (Some(Dialect::Gemini), false) => gemini::error(&whole),
    }) else {
        if !success && pending.front != Front::Messages {
            // An error not in the provider's shape reaches the client as it was.
            return Response::from_parts(parts, Body::from(whole));
        }
        if !success {
            let body = crate::ingress::anthropic::error(parts.status.as_u16(), &whole);
            return json_answer(parts, body);
        }
        return not_an_answer(pending.dialect);
    };
    let translated = match (pending.front, success) {
        (Front::Chat, _) | (Front::Responses, false) => Some(chat),
        (Front::Messages, true) => crate::ingress::anthropic::response(&chat),
        (Front::Messages, false) => Some(crate::ingress::anthropic::error(
            parts.status.as_u16(),
            &chat,
        )),
        (Front::Responses, true) => crate::ingress::responses::response(&chat),
    };
    match translated {
        Some(bytes) => json_answer(parts, bytes),
        None => not_an_answer(None),
    }
}

fn json_answer(mut parts: http::response::Parts, body: Bytes) -> Response {
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, Body::from(body))
}

fn not_an_answer(dialect: Option<Dialect>) -> Response {
    ProxyError::UpstreamProtocol(format!(
        "the {} upstream's answer is not one it can give",
        match dialect {
            Some(Dialect::Gemini) => "Gemini",
            Some(Dialect::Anthropic) => "Anthropic",
            None => "OpenAI-compatible",
        }
    ))
    .into_response()
}

/// The upstream's stream turned into Chat chunks.
#[derive(Debug)]
enum FromDialect {
    Anthropic(anthropic::StreamTranslator),
    Gemini(gemini::StreamTranslator),
}

/// Chat chunks turned into the client's API.
#[derive(Debug)]
enum ToFront {
    Messages(crate::ingress::anthropic::StreamTranslator),
    Responses(crate::ingress::responses::StreamTranslator),
}

impl ToFront {
    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            Self::Messages(t) => t.feed(data, out),
            Self::Responses(t) => t.feed(data, out),
        }
    }

    fn interrupted(&mut self, cause: &str, out: &mut Vec<u8>) {
        match self {
            Self::Messages(t) => t.interrupted(cause, out),
            Self::Responses(t) => t.interrupted(cause, out),
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            Self::Messages(t) => t.finish(out),
            Self::Responses(t) => t.finish(out),
        }
    }
}

/// One stream's translation: from the upstream's dialect into Chat, and
/// from Chat into the client's API, each step present only when needed
/// (a Chat client of a translated upstream pays for one step, not two).
#[derive(Debug)]
struct Translator {
    from: Option<FromDialect>,
    to: Option<ToFront>,
    /// The Chat bytes between the two steps.
    hub: Vec<u8>,
}

impl Translator {
    fn new(pending: &Pending) -> Self {
        let from = pending.dialect.map(|dialect| match dialect {
            Dialect::Gemini => FromDialect::Gemini(gemini::StreamTranslator::new(
                pending.include_usage,
                &pending.model,
                unix_now(),
            )),
            Dialect::Anthropic => FromDialect::Anthropic(anthropic::StreamTranslator::new(
                pending.include_usage,
                unix_now(),
            )),
        });
        let to = match pending.front {
            Front::Chat => None,
            Front::Messages => Some(ToFront::Messages(Default::default())),
            Front::Responses => Some(ToFront::Responses(Default::default())),
        };
        Self {
            from,
            to,
            hub: Vec::new(),
        }
    }

    /// Runs the second step over what the first wrote; a failure of the
    /// first is told to the client by the second (its `error` event).
    fn through(&mut self, first: Result<(), String>, out: &mut Vec<u8>) -> Result<(), String> {
        let Some(to) = &mut self.to else {
            return first;
        };
        let second = to.feed(&self.hub, out);
        self.hub.clear();
        second?;
        first.inspect_err(|err| to.interrupted(err, out))
    }

    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let first = match (&mut self.from, self.to.is_some()) {
            (Some(FromDialect::Anthropic(t)), false) => return t.feed(data, out),
            (Some(FromDialect::Gemini(t)), false) => return t.feed(data, out),
            (Some(FromDialect::Anthropic(t)), true) => t.feed(data, &mut self.hub),
            (Some(FromDialect::Gemini(t)), true) => t.feed(data, &mut self.hub),
            // The upstream speaks Chat already: straight to the second step.
            (None, _) => {
                return self.to.as_mut().map_or(Ok(()), |to| to.feed(data, out));
            }
        };
        self.through(first, out)
    }

    /// The upstream's body failed: a Messages or Responses client is told
    /// by an `error` event before the abort; Chat clients only see the abort.
    fn interrupted(&mut self, cause: &str, out: &mut Vec<u8>) {
        if let Some(to) = &mut self.to {
            to.interrupted(cause, out);
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        let first = match (&mut self.from, self.to.is_some()) {
            (Some(FromDialect::Anthropic(t)), false) => return t.finish(out),
            (Some(FromDialect::Gemini(t)), false) => return t.finish(out),
            (Some(FromDialect::Anthropic(t)), true) => t.finish(&mut self.hub),
            (Some(FromDialect::Gemini(t)), true) => t.finish(&mut self.hub),
            (None, _) => Ok(()),
        };
        self.through(first, out)?;
        match &mut self.to {
            Some(to) => to.finish(out),
            None => Ok(()),
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

/// The translated bytes so far, as one frame; the buffer stays for the
/// next read (grown once, not from empty at every frame).
fn take(out: &mut Vec<u8>) -> Bytes {
    let chunk = Bytes::copy_from_slice(out);
    out.clear();
    // A held stream keeps no more than a typical frame's room.
    if out.capacity() > 64 << 10 {
        *out = Vec::new();
    }
    chunk
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
                        let chunk = take(this.out);
                        return Poll::Ready(Some(Ok(Frame::data(chunk))));
                    }
                    if !this.out.is_empty() {
                        let chunk = take(this.out);
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
                    let chunk = take(this.out);
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                None => {
                    *this.done = true;
                    return Poll::Ready(Some(match this.translator.finish(this.out) {
                        Ok(()) if this.out.is_empty() => return Poll::Ready(None),
                        Ok(()) => {
                            let chunk = take(this.out);
                            // The last bytes now; the end on the next poll.
                            Ok(Frame::data(chunk))
                        }
                        Err(err) if this.out.is_empty() => Err(failed(err)),
                        Err(err) => {
                            *this.failure = Some(err);
                            Ok(Frame::data(take(this.out)))
                        }
                    }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEMINI: &str = include_str!("../../../tests/fixtures/gemini/stream.sse");
    const ANTHROPIC_ERROR: &str =
        include_str!("../../../tests/fixtures/anthropic/stream_error.sse");

    fn translate(front: Front, dialect: Dialect, stream: &str) -> (String, Result<(), String>) {
        let pending = Pending {
            front,
            dialect: Some(dialect),
            model: "gemini-2.5-flash".into(),
            stream: true,
            include_usage: true,
        };
        let mut translator = Translator::new(&pending);
        let mut out = Vec::new();
        // In pieces that split lines, as a network would.
        for piece in stream.as_bytes().chunks(41) {
            if let Err(err) = translator.feed(piece, &mut out) {
                return (String::from_utf8(out).unwrap(), Err(err));
            }
        }
        let end = translator.finish(&mut out);
        (String::from_utf8(out).unwrap(), end)
    }

    fn last_event(text: &str) -> &str {
        text.trim_end().rsplit("\n\n").next().unwrap_or_default()
    }

    #[test]
    fn two_steps_make_the_clients_stream_and_its_end() {
        // Gemini → Chat → Messages: Anthropic's whole sequence.
        let (text, end) = translate(Front::Messages, Dialect::Gemini, GEMINI);
        end.unwrap();
        assert!(text.starts_with("event: message_start\n"), "{text}");
        assert!(
            last_event(&text).starts_with("event: message_stop\n"),
            "{text}"
        );
        assert!(text.contains("\"name\":\"paint\""), "{text}");
        // Gemini → Chat → Responses.
        let (text, end) = translate(Front::Responses, Dialect::Gemini, GEMINI);
        end.unwrap();
        assert!(
            last_event(&text).starts_with("event: response.completed\n"),
            "{text}"
        );
    }

    #[test]
    fn a_failure_in_the_first_step_is_told_by_the_second() {
        // A Gemini stream cut before its finishReason: the Messages client
        // gets an `error` event last, and the stream fails.
        let cut = &GEMINI[..GEMINI.find("\"finishReason\"").unwrap()];
        let cut = &cut[..cut.rfind("data:").unwrap()];
        let (text, end) = translate(Front::Messages, Dialect::Gemini, cut);
        assert!(end.is_err());
        assert!(last_event(&text).starts_with("event: error\n"), "{text}");
        assert!(!text.contains("message_stop"));
        // Anthropic's in-band error, to a Responses client.
        let (text, end) = translate(Front::Responses, Dialect::Anthropic, ANTHROPIC_ERROR);
        assert!(end.unwrap_err().contains("Overloaded"));
        assert!(last_event(&text).starts_with("event: error\n"), "{text}");
        assert!(!text.contains("response.completed"));
    }
}
