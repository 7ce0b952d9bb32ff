//! Anthropic's Messages API behind the OpenAI Chat Completions API: the
//! request translated to `POST {base_url}/messages`, the answer (whole or
//! streamed) back into `chat.completion` / `chat.completion.chunk`.
//!
//! Field by field (the README's table lists the same):
//! - `system`/`developer` messages → `system` text blocks, in order;
//!   `user` text and `image_url` parts (https URLs and `data:` base64) →
//!   content blocks; assistant `tool_calls` → `tool_use` blocks (their
//!   `arguments` must be JSON); `tool` messages → `tool_result` blocks in a
//!   user turn; consecutive turns of one role are merged (Anthropic wants
//!   them alternating).
//! - `max_tokens` / `max_completion_tokens` → `max_tokens` (the upstream's
//!   `default_max_tokens` when absent: Anthropic requires it); `stop` →
//!   `stop_sequences`; `temperature`, `top_p`, `stream` kept; `user` →
//!   `metadata.user_id`; `tools` → `name`/`description`/`input_schema`;
//!   `tool_choice` auto/required/none/named → auto/any/none/tool;
//!   `parallel_tool_calls: false` → `disable_parallel_tool_use`.
//! - Dropped (no Anthropic counterpart): `n` > 1 is refused; `logprobs`,
//!   `presence_penalty`, `frequency_penalty`, `seed`, `response_format`,
//!   `logit_bias`, `stream_options` (usage is always asked for) are not sent.
//! - Answers: text blocks → `content`, `tool_use` → `tool_calls`, thinking
//!   blocks dropped; `stop_reason` end_turn/stop_sequence → `stop`,
//!   max_tokens → `length`, tool_use → `tool_calls`; usage → OpenAI usage,
//!   where `prompt_tokens` counts cache reads and writes too (Anthropic's
//!   `input_tokens` excludes them) and `prompt_tokens_details.cached_tokens`
//!   is the cache reads.
//! - Errors: `{"type":"error","error":{"type","message"}}` → the OpenAI
//!   error shape, status kept (429, 529 `overloaded_error`, …).

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::config::AnthropicSettings;

/// Why a request cannot be translated: a 400 naming the field.
pub type Refusal = String;

/// A translated request.
#[derive(Debug)]
pub struct Translated {
    /// The Messages request body.
    pub body: Bytes,
    /// The client asked for a stream.
    pub stream: bool,
    /// … with the final usage chunk.
    pub include_usage: bool,
}

fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::String(text) => Some(text.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        _ => None,
    }
}

/// OpenAI content (a string or parts) as Anthropic content blocks.
fn blocks(content: &Value, at: &str) -> Result<Vec<Value>, Refusal> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(text) if text.is_empty() => Ok(Vec::new()),
        Value::String(text) => Ok(vec![json!({"type": "text", "text": text})]),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(i, part)| match part["type"].as_str() {
                Some("text") => Ok(json!({"type": "text", "text": part["text"]})),
                Some("image_url") => {
                    let url = part["image_url"]["url"]
                        .as_str()
                        .or_else(|| part["image_url"].as_str())
                        .ok_or_else(|| format!("{at}.content[{i}].image_url.url is missing"))?;
                    Ok(image(url))
                }
                other => Err(format!(
                    "{at}.content[{i}] has type {other:?}, which an Anthropic upstream cannot take (text and image_url can)"
                )),
            })
            .collect(),
        _ => Err(format!("{at}.content must be a string or an array of parts")),
    }
}

fn image(url: &str) -> Value {
    if let Some(rest) = url.strip_prefix("data:")
        && let Some((media_type, data)) = rest.split_once(";base64,")
    {
        return json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}});
    }
    json!({"type": "image", "source": {"type": "url", "url": url}})
}

/// The Messages request for an OpenAI chat completion request `body`.
pub fn request(settings: &AnthropicSettings, body: &[u8]) -> Result<Translated, Refusal> {
    let chat: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| format!("the request body is not a JSON object: {e}"))?;
    if chat.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err("`n` above 1 cannot be served by an Anthropic upstream".into());
    }
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let empty = Vec::new();
    let input = chat
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for (i, message) in input.iter().enumerate() {
        let at = format!("messages[{i}]");
        match message["role"].as_str() {
            Some("system" | "developer") => {
                if let Some(text) = text_of(&message["content"])
                    && !text.is_empty()
                {
                    system.push(json!({"type": "text", "text": text}));
                }
            }
            Some("user") => super::push_turn(
                &mut messages,
                "content",
                "user",
                blocks(&message["content"], &at)?,
            ),
            Some("assistant") => {
                let mut content = blocks(&message["content"], &at)?;
                for (j, call) in message["tool_calls"]
                    .as_array()
                    .unwrap_or(&empty)
                    .iter()
                    .enumerate()
                {
                    let input = super::call_arguments(call, &at, j)?;
                    content.push(json!({
                        "type": "tool_use",
                        "id": call["id"],
                        "name": call["function"]["name"],
                        "input": input,
                    }));
                }
                super::push_turn(&mut messages, "content", "assistant", content);
            }
            Some("tool") => {
                let result = json!({
                    "type": "tool_result",
                    "tool_use_id": message["tool_call_id"],
                    "content": text_of(&message["content"]).unwrap_or_default(),
                });
                super::push_turn(&mut messages, "content", "user", vec![result]);
            }
            other => return Err(format!("{at}.role {other:?} is not a chat role")),
        }
    }
    let mut out = Map::new();
    out.insert(
        "model".into(),
        chat.get("model").cloned().unwrap_or(Value::Null),
    );
    let max_tokens = chat
        .get("max_completion_tokens")
        .or_else(|| chat.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(settings.default_max_tokens);
    out.insert("max_tokens".into(), max_tokens.into());
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(stops) = super::stop_list(chat.get("stop")) {
        out.insert("stop_sequences".into(), stops);
    }
    for field in ["temperature", "top_p", "stream"] {
        if let Some(value) = chat.get(field).filter(|v| !v.is_null()) {
            out.insert(field.into(), value.clone());
        }
    }
    if let Some(user) = chat.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    if let Some(tools) = chat.get("tools").and_then(Value::as_array) {
        let tools = tools
            .iter()
            .map(|tool| {
                let function = &tool["function"];
                let mut out = json!({
                    "name": function["name"],
                    "input_schema": if function["parameters"].is_object() {
                        function["parameters"].clone()
                    } else {
                        json!({"type": "object"})
                    },
                });
                if let Some(description) = function["description"].as_str() {
                    out["description"] = description.into();
                }
                out
            })
            .collect();
        out.insert("tools".into(), Value::Array(tools));
    }
    let mut choice = match chat.get("tool_choice") {
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            other => {
                return Err(format!(
                    "tool_choice {other:?} is not auto, required or none"
                ));
            }
        },
        Some(Value::Object(named)) => {
            Some(json!({"type": "tool", "name": named.get("function").map(|f| f["name"].clone())}))
        }
        _ => None,
    };
    if chat.get("parallel_tool_calls") == Some(&Value::Bool(false)) && out.contains_key("tools") {
        let choice = choice.get_or_insert_with(|| json!({"type": "auto"}));
        choice["disable_parallel_tool_use"] = true.into();
    }
    if let Some(choice) = choice {
        out.insert("tool_choice".into(), choice);
    }
    let stream = chat.get("stream") == Some(&Value::Bool(true));
    let include_usage = chat
        .get("stream_options")
        .is_some_and(|o| o["include_usage"] == true);
    let body = serde_json::to_vec(&out)
        .map(Bytes::from)
        .map_err(|e| format!("the translated request could not be written: {e}"))?;
    Ok(Translated {
        body,
        stream,
        include_usage,
    })
}

/// OpenAI's `finish_reason` for Anthropic's `stop_reason`.
pub fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn and any newer reason
        _ => "stop",
    }
}

/// OpenAI usage for Anthropic usage: `prompt_tokens` includes what
/// Anthropic counts apart (cache reads and writes).
pub fn usage(anthropic: &Value) -> Value {
    let count = |field: &str| anthropic[field].as_u64().unwrap_or(0);
    let cached = count("cache_read_input_tokens");
    let prompt = count("input_tokens")
        .saturating_add(cached)
        .saturating_add(count("cache_creation_input_tokens"));
    let completion = count("output_tokens");
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// The `chat.completion` for a Messages answer, or `None` when it is not one.
pub fn response(body: &[u8], created: u64) -> Option<Bytes> {
    let message: Value = serde_json::from_slice(body).ok()?;
    if message["type"] != "message" {
        return None;
    }
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in message["content"].as_array()? {
        match block["type"].as_str() {
            Some("text") => text.push_str(block["text"].as_str().unwrap_or_default()),
            Some("tool_use") => calls.push(json!({
                "id": block["id"],
                "type": "function",
                "function": {"name": block["name"], "arguments": block["input"].to_string()},
            })),
            _ => {}
        }
    }
    let mut reply = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { text.into() }});
    if !calls.is_empty() {
        reply["tool_calls"] = Value::Array(calls);
    }
    let answer = json!({
        "id": message["id"],
        "object": "chat.completion",
        "created": created,
        "model": message["model"],
        "choices": [{
            "index": 0,
            "message": reply,
            "finish_reason": finish_reason(message["stop_reason"].as_str().unwrap_or("end_turn")),
        }],
        "usage": usage(&message["usage"]),
    });
    serde_json::to_vec(&answer).ok().map(Bytes::from)
}

/// The OpenAI error body for an Anthropic error body (kept as it was when
/// it is not Anthropic's shape).
pub fn error(body: &[u8]) -> Option<Bytes> {
    let parsed: Value = serde_json::from_slice(body).ok()?;
    let error = parsed.get("error").filter(|_| parsed["type"] == "error")?;
    let answer = json!({"error": {
        "message": error["message"],
        "type": error["type"],
        "param": null,
        "code": error["type"],
    }});
    serde_json::to_vec(&answer).ok().map(Bytes::from)
}

/// An Anthropic event stream translated, event by event, into OpenAI
/// `chat.completion.chunk` events: every complete event in is translated
/// and out at once; only a line split across reads waits for its end.
#[derive(Debug, Default)]
pub struct StreamTranslator {
    /// The client asked for the final usage chunk.
    include_usage: bool,
    created: u64,
    id: Value,
    model: Value,
    lines: crate::stream::lines::Lines,
    /// Anthropic content-block index → OpenAI tool-call index.
    tool_index: Vec<(u64, u64)>,
    next_tool: u64,
    usage: Value,
    stopped: bool,
    /// See [`Self::set_prefix`].
    prefix: Vec<u8>,
}

impl StreamTranslator {
    /// A translator for one stream; `include_usage` adds the usage chunk.
    pub fn new(include_usage: bool, created: u64) -> Self {
        Self {
            include_usage,
            created,
            usage: json!({}),
            ..Self::default()
        }
    }

    /// The start of every chunk, written once `message_start` names the
    /// message: each chunk is then this, its delta and a fixed tail.
    fn set_prefix(&mut self) {
        let mut prefix = b"data: {\"id\":".to_vec();
        let _ = serde_json::to_writer(&mut prefix, &self.id);
        prefix.extend_from_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
        prefix.extend_from_slice(self.created.to_string().as_bytes());
        prefix.extend_from_slice(b",\"model\":");
        let _ = serde_json::to_writer(&mut prefix, &self.model);
        prefix.extend_from_slice(b",\"choices\":[{\"index\":0,\"delta\":");
        self.prefix = prefix;
    }

    fn chunk(&mut self, delta: Value, finish: Option<&str>, out: &mut Vec<u8>) {
        if self.prefix.is_empty() {
            self.set_prefix();
        }
        out.extend_from_slice(&self.prefix);
        let _ = serde_json::to_writer(&mut *out, &delta);
        self.tail(finish, out);
    }

    fn tail(&self, finish: Option<&str>, out: &mut Vec<u8>) {
        match finish {
            Some(reason) => {
                out.extend_from_slice(b",\"finish_reason\":\"");
                out.extend_from_slice(reason.as_bytes());
                out.extend_from_slice(b"\"}]}\n\n");
            }
            None => out.extend_from_slice(b",\"finish_reason\":null}]}\n\n"),
        }
    }

    /// The hot path: a text or tool-argument delta, parsed into borrowed
    /// strings and written without building a JSON tree. `false` when the
    /// event is another kind.
    fn fast_delta(&mut self, payload: &[u8], out: &mut Vec<u8>) -> bool {
        #[derive(serde::Deserialize)]
        struct Event<'a> {
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
            index: Option<u64>,
            #[serde(borrow)]
            delta: Option<Delta<'a>>,
        }
        #[derive(serde::Deserialize)]
        struct Delta<'a> {
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
            #[serde(borrow, default)]
            text: Option<std::borrow::Cow<'a, str>>,
            #[serde(borrow, default)]
            partial_json: Option<std::borrow::Cow<'a, str>>,
        }
        if self.prefix.is_empty() {
            return false;
        }
        let Ok(event) = serde_json::from_slice::<Event<'_>>(payload) else {
            return false;
        };
        let Some(delta) = event.delta.filter(|_| event.kind == "content_block_delta") else {
            return false;
        };
        match (&*delta.kind, delta.text, delta.partial_json) {
            ("text_delta", Some(text), _) => {
                out.extend_from_slice(&self.prefix);
                out.extend_from_slice(b"{\"content\":");
                let _ = serde_json::to_writer(&mut *out, &*text);
                out.push(b'}');
                self.tail(None, out);
                true
            }
            ("input_json_delta", _, Some(partial)) => {
                let block = event.index.unwrap_or(0);
                let index = self
                    .tool_index
                    .iter()
                    .find(|(b, _)| *b == block)
                    .map_or(0, |(_, i)| *i);
                out.extend_from_slice(&self.prefix);
                out.extend_from_slice(b"{\"tool_calls\":[{\"index\":");
                out.extend_from_slice(index.to_string().as_bytes());
                out.extend_from_slice(b",\"function\":{\"arguments\":");
                let _ = serde_json::to_writer(&mut *out, &*partial);
                out.extend_from_slice(b"}}]}");
                self.tail(None, out);
                true
            }
            _ => false,
        }
    }

    /// Translates what `data` completes into `out`; an in-band `error`
    /// event (or a line that is not JSON) is an error: the stream must not
    /// look complete.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        // Taken out for the call: `line` needs the rest of `self`.
        let mut lines = std::mem::take(&mut self.lines);
        let result = lines.feed(data, |line| self.line(line, out));
        self.lines = lines;
        result
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let line = line.trim_ascii_end();
        let Some(payload) = line.strip_prefix(b"data:") else {
            // `event:` lines repeat the data's `type`; blank lines end events.
            return Ok(());
        };
        let payload = payload.trim_ascii();
        if self.fast_delta(payload, out) {
            return Ok(());
        }
        let event: Value = serde_json::from_slice(payload)
            .map_err(|e| format!("the upstream sent an event that is not JSON: {e}"))?;
        match event["type"].as_str() {
            Some("message_start") => {
                let message = &event["message"];
                self.id = message["id"].clone();
                self.model = message["model"].clone();
                self.usage = message["usage"].clone();
                self.set_prefix();
                self.chunk(json!({"role": "assistant", "content": ""}), None, out);
            }
            Some("content_block_start") => {
                let block = &event["content_block"];
                if block["type"] == "tool_use" {
                    let index = self.next_tool;
                    self.next_tool += 1;
                    self.tool_index
                        .push((event["index"].as_u64().unwrap_or(0), index));
                    self.chunk(
                        json!({"tool_calls": [{
                            "index": index,
                            "id": block["id"],
                            "type": "function",
                            "function": {"name": block["name"], "arguments": ""},
                        }]}),
                        None,
                        out,
                    );
                } else if block["type"] == "text"
                    && let Some(text) = block["text"].as_str().filter(|t| !t.is_empty())
                {
                    self.chunk(json!({"content": text}), None, out);
                }
            }
            Some("content_block_delta") => {
                let delta = &event["delta"];
                match delta["type"].as_str() {
                    Some("text_delta") => self.chunk(json!({"content": delta["text"]}), None, out),
                    Some("input_json_delta") => {
                        let block = event["index"].as_u64().unwrap_or(0);
                        let index = self
                            .tool_index
                            .iter()
                            .find(|(b, _)| *b == block)
                            .map_or(0, |(_, i)| *i);
                        self.chunk(
                            json!({"tool_calls": [{
                                "index": index,
                                "function": {"arguments": delta["partial_json"]},
                            }]}),
                            None,
                            out,
                        );
                    }
                    // thinking and signature deltas have no Chat counterpart
                    _ => {}
                }
            }
            Some("message_delta") => {
                if let Some(usage) = event["usage"].as_object() {
                    for (field, value) in usage {
                        if !value.is_null() {
                            self.usage[field] = value.clone();
                        }
                    }
                }
                let reason = event["delta"]["stop_reason"].as_str().unwrap_or("end_turn");
                self.chunk(json!({}), Some(finish_reason(reason)), out);
            }
            Some("message_stop") => {
                if self.include_usage {
                    let chunk = json!({
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage(&self.usage),
                    });
                    write_event(&chunk, out);
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                self.stopped = true;
            }
            Some("error") => {
                return Err(format!(
                    "the upstream failed mid-stream: {} ({})",
                    event["error"]["message"].as_str().unwrap_or("no message"),
                    event["error"]["type"].as_str().unwrap_or("error"),
                ));
            }
            // ping, content_block_stop, and event types added later
            _ => {}
        }
        Ok(())
    }

    /// The stream has ended: an error unless `message_stop` came.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        if let Some(rest) = self.lines.rest() {
            self.line(&rest, out)?;
        }
        if self.stopped {
            Ok(())
        } else {
            Err("the upstream's stream ended before message_stop".into())
        }
    }
}

pub(super) fn write_event(value: &Value, out: &mut Vec<u8>) {
    out.extend_from_slice(b"data: ");
    // Writing a `Value` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = include_str!("../../../tests/fixtures/anthropic/stream_tool_use.sse");
    const STREAM_ERROR: &str = include_str!("../../../tests/fixtures/anthropic/stream_error.sse");
    const MESSAGE: &str = include_str!("../../../tests/fixtures/anthropic/message_tool_use.json");
    const OVERLOADED: &str =
        include_str!("../../../tests/fixtures/anthropic/error_overloaded.json");

    fn settings() -> AnthropicSettings {
        AnthropicSettings {
            version: http::HeaderValue::from_static("2023-06-01"),
            default_max_tokens: 4096,
        }
    }

    fn translate(chat: Value) -> Value {
        let translated = request(&settings(), chat.to_string().as_bytes()).unwrap();
        serde_json::from_slice(&translated.body).unwrap()
    }

    #[test]
    fn a_chat_request_becomes_a_messages_request_field_by_field() {
        let out = translate(json!({
            "model": "claude-sonnet-4-5",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is here?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"at\":\"desk\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": ""}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a lamp"},
                {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
                {"role": "user", "content": "Thanks"},
            ],
            "max_completion_tokens": 300,
            "stop": "END",
            "temperature": 0.2,
            "top_p": 0.9,
            "stream": true,
            "stream_options": {"include_usage": true},
            "user": "u-42",
            "seed": 7,
            "tools": [{"type": "function", "function": {"name": "look", "description": "Looks", "parameters": {"type": "object", "properties": {"at": {"type": "string"}}}}}],
            "tool_choice": "required",
            "parallel_tool_calls": false,
        }));
        assert_eq!(
            out,
            json!({
                "model": "claude-sonnet-4-5",
                "max_tokens": 300,
                "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}],
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is here?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                    ]},
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "call_1", "name": "look", "input": {"at": "desk"}},
                        {"type": "tool_use", "id": "call_2", "name": "time", "input": {}},
                    ]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "a lamp"},
                        {"type": "tool_result", "tool_use_id": "call_2", "content": "noon"},
                        {"type": "text", "text": "Thanks"},
                    ]},
                ],
                "stop_sequences": ["END"],
                "temperature": 0.2,
                "top_p": 0.9,
                "stream": true,
                "metadata": {"user_id": "u-42"},
                "tools": [{"name": "look", "description": "Looks", "input_schema": {"type": "object", "properties": {"at": {"type": "string"}}}}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            })
        );
    }

    #[test]
    fn defaults_and_refusals() {
        let out = translate(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "tool_choice": {"type": "function", "function": {"name": "f"}}}),
        );
        assert_eq!(out["max_tokens"], 5);
        assert_eq!(out["tool_choice"], json!({"type": "tool", "name": "f"}));
        let out = translate(json!({"model": "m", "messages": []}));
        assert_eq!(out["max_tokens"], 4096, "Anthropic requires max_tokens");
        for (body, names) in [
            (json!({"messages": [], "n": 2}), "`n`"),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
                "messages[0].content[0]",
            ),
            (
                json!({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]}),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                json!({"messages": [{"role": "robot", "content": "x"}]}),
                "messages[0].role",
            ),
        ] {
            let err = request(&settings(), body.to_string().as_bytes()).unwrap_err();
            assert!(err.contains(names), "{err}");
        }
        assert!(request(&settings(), b"[1]").is_err());
    }

    #[test]
    fn an_answer_becomes_a_chat_completion_with_openai_usage() {
        let out: Value =
            serde_json::from_slice(&response(MESSAGE.as_bytes(), 1_700_000_000).unwrap()).unwrap();
        assert_eq!(out["object"], "chat.completion");
        assert_eq!(out["created"], 1_700_000_000);
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        let message = &out["choices"][0]["message"];
        assert_eq!(
            message["content"], "I'll check the weather.",
            "thinking dropped"
        );
        assert_eq!(
            message["tool_calls"][0]["id"],
            "toolu_01A09q90qw90lq917835lq9"
        );
        let arguments: Value = serde_json::from_str(
            message["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            arguments,
            json!({"location": "San Francisco, CA", "unit": "celsius"})
        );
        // Anthropic's input_tokens excludes the cache: 2095 + 1024 read + 0 written.
        assert_eq!(
            out["usage"],
            json!({"prompt_tokens": 3119, "completion_tokens": 503, "total_tokens": 3622, "prompt_tokens_details": {"cached_tokens": 1024}})
        );
        for (reason, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
        ] {
            assert_eq!(finish_reason(reason), finish);
        }
        assert!(response(OVERLOADED.as_bytes(), 0).is_none());
    }

    #[test]
    fn errors_take_the_openai_shape() {
        let out: Value = serde_json::from_slice(&error(OVERLOADED.as_bytes()).unwrap()).unwrap();
        assert_eq!(
            out,
            json!({"error": {"message": "Overloaded", "type": "overloaded_error", "param": null, "code": "overloaded_error"}})
        );
        assert!(error(b"{\"error\":\"not anthropic\"}").is_none());
    }

    fn run(stream: &str, pieces: &[usize], include_usage: bool) -> (String, Result<(), String>) {
        let mut translator = StreamTranslator::new(include_usage, 7);
        let mut out = Vec::new();
        let bytes = stream.as_bytes();
        let mut from = 0;
        for &to in pieces.iter().chain(std::iter::once(&bytes.len())) {
            if let Err(err) = translator.feed(&bytes[from..to], &mut out) {
                return (String::from_utf8(out).unwrap(), Err(err));
            }
            from = to;
        }
        let end = translator.finish(&mut out);
        (String::from_utf8(out).unwrap(), end)
    }

    fn chunks(text: &str) -> Vec<Value> {
        text.split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect()
    }

    #[test]
    fn a_stream_translates_the_same_at_every_split() {
        let (whole, end) = run(STREAM, &[], true);
        end.unwrap();
        assert!(whole.ends_with("data: [DONE]\n\n"));
        let events = chunks(&whole);
        assert_eq!(
            events[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(events[0]["id"], "msg_014p7gG3wDgGV9EUtLvnow3U");
        let text: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(
            text,
            "Okay, let's check the weather — ☀️ for San Francisco:"
        );
        // Parallel calls keep their own index; arguments arrive in pieces.
        let calls: Vec<&Value> = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["tool_calls"].get(0))
            .collect();
        assert_eq!(calls[0]["index"], 0);
        assert_eq!(calls[0]["id"], "toolu_01T1x1fJ34qAmk2tNTrN7Up6");
        let first: String = calls
            .iter()
            .filter(|c| c["index"] == 0)
            .filter_map(|c| c["function"]["arguments"].as_str())
            .collect();
        assert_eq!(first, "{\"location\": \"San Francisco, CA\"}");
        let second: Vec<&&Value> = calls.iter().filter(|c| c["index"] == 1).collect();
        assert_eq!(second[0]["id"], "toolu_02");
        assert_eq!(second[1]["function"]["arguments"], "{\"tz\":\"PST\"}");
        let finish: Vec<&str> = events
            .iter()
            .filter_map(|e| e["choices"][0]["finish_reason"].as_str())
            .collect();
        assert_eq!(finish, ["tool_calls"]);
        let last = events.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["prompt_tokens"], 582);
        assert_eq!(last["usage"]["completion_tokens"], 89);
        assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], 100);
        // Split anywhere (mid-line, mid-UTF-8): the same bytes out.
        for split in 1..STREAM.len() {
            let (out, end) = run(STREAM, &[split], true);
            end.unwrap();
            assert_eq!(out, whole, "split at {split}");
        }
        let (without, _) = run(STREAM, &[], false);
        assert!(!without.contains("\"usage\""));
    }

    #[test]
    fn a_failed_stream_never_looks_complete() {
        let (out, end) = run(STREAM_ERROR, &[], true);
        assert!(end.unwrap_err().contains("Overloaded"));
        assert!(!out.contains("[DONE]") && !out.contains("finish_reason\":\"stop"));
        // Cut before message_stop.
        let cut = STREAM.find("event: message_delta").unwrap();
        let (out, end) = run(&STREAM[..cut], &[], true);
        assert!(end.unwrap_err().contains("message_stop"));
        assert!(!out.contains("[DONE]"));
    }
}
