//! Anthropic's Messages API as a front door to OpenAI-compatible upstreams:
//! a Messages request becomes a Chat Completions request, and the answer
//! (whole or streamed) becomes Anthropic's, the stream as Anthropic's exact
//! event sequence (`message_start` … `message_stop`).
//!
//! Kept: `system`, text, image and `tool_result` / `tool_use` blocks,
//! `max_tokens`, `stop_sequences`, `temperature`, `top_p`, `stream`,
//! `metadata.user_id` (→ `user`), `tools`, `tool_choice`. Dropped: `thinking`
//! blocks and the `thinking` option (Chat has no place for a signed
//! thought), `top_k`, cache-control markers.

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::chunk::{self, Chunk};
use crate::stream::decimal;

fn text_blocks(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter(|b| b["type"] == "text")
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn image_part(source: &Value) -> Value {
    let url = if source["type"] == "base64" {
        format!(
            "data:{};base64,{}",
            source["media_type"].as_str().unwrap_or("image/png"),
            source["data"].as_str().unwrap_or_default()
        )
    } else {
        source["url"].as_str().unwrap_or_default().to_owned()
    };
    json!({"type": "image_url", "image_url": {"url": url}})
}

/// The Chat Completions request for a Messages request `body`.
pub fn request(body: &[u8]) -> Result<Bytes, String> {
    let input: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| format!("the request body is not a JSON object: {e}"))?;
    let mut messages = Vec::new();
    let system = input.get("system").map(text_blocks).unwrap_or_default();
    if !system.is_empty() {
        messages.push(json!({"role": "system", "content": system}));
    }
    let empty = Vec::new();
    for (i, message) in input
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
        .iter()
        .enumerate()
    {
        let role = message["role"].as_str().unwrap_or_default();
        let blocks: Vec<Value> = match &message["content"] {
            Value::String(text) => vec![json!({"type": "text", "text": text})],
            Value::Array(blocks) => blocks.clone(),
            _ => return Err(format!("messages[{i}].content must be a string or blocks")),
        };
        match role {
            "user" => {
                let mut parts = Vec::new();
                for block in &blocks {
                    match block["type"].as_str() {
                        Some("text") => parts.push(json!({"type": "text", "text": block["text"]})),
                        Some("image") => parts.push(image_part(&block["source"])),
                        Some("tool_result") => messages.push(json!({
                            "role": "tool",
                            "tool_call_id": block["tool_use_id"],
                            "content": text_blocks(&block["content"]),
                        })),
                        _ => {}
                    }
                }
                if !parts.is_empty() {
                    messages.push(json!({"role": "user", "content": parts}));
                }
            }
            "assistant" => {
                let text = text_blocks(&Value::Array(blocks.clone()));
                let calls: Vec<Value> = blocks
                    .iter()
                    .filter(|b| b["type"] == "tool_use")
                    .map(|b| {
                        json!({"id": b["id"], "type": "function",
                               "function": {"name": b["name"], "arguments": b["input"].to_string()}})
                    })
                    .collect();
                let mut out = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { text.into() }});
                if !calls.is_empty() {
                    out["tool_calls"] = Value::Array(calls);
                }
                messages.push(out);
            }
            other => {
                return Err(format!(
                    "messages[{i}].role {other:?} is not user or assistant"
                ));
            }
        }
    }
    let mut chat = Map::new();
    chat.insert(
        "model".into(),
        input.get("model").cloned().unwrap_or(Value::Null),
    );
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(max) = input.get("max_tokens") {
        chat.insert("max_tokens".into(), max.clone());
    }
    if let Some(stops) = input.get("stop_sequences").filter(|s| s.is_array()) {
        chat.insert("stop".into(), stops.clone());
    }
    for field in ["temperature", "top_p"] {
        if let Some(value) = input.get(field).filter(|v| !v.is_null()) {
            chat.insert(field.into(), value.clone());
        }
    }
    if input.get("stream") == Some(&Value::Bool(true)) {
        chat.insert("stream".into(), true.into());
        // The final message_delta needs the output tokens.
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(user) = input.get("metadata").and_then(|m| m["user_id"].as_str()) {
        chat.insert("user".into(), user.into());
    }
    if let Some(tools) = input.get("tools").and_then(Value::as_array) {
        let tools = tools
            .iter()
            .map(|tool| {
                json!({"type": "function", "function": {
                    "name": tool["name"],
                    "description": tool["description"].as_str().unwrap_or_default(),
                    "parameters": tool["input_schema"],
                }})
            })
            .collect();
        chat.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = input.get("tool_choice") {
        let mapped = match choice["type"].as_str() {
            Some("auto") => json!("auto"),
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => json!({"type": "function", "function": {"name": choice["name"]}}),
            other => {
                return Err(format!(
                    "tool_choice.type {other:?} is not auto, any, tool or none"
                ));
            }
        };
        chat.insert("tool_choice".into(), mapped);
        if choice["disable_parallel_tool_use"] == true {
            chat.insert("parallel_tool_calls".into(), false.into());
        }
    }
    serde_json::to_vec(&chat)
        .map(Bytes::from)
        .map_err(|e| format!("the translated request could not be written: {e}"))
}

/// Anthropic's `stop_reason` for OpenAI's `finish_reason`.
pub fn stop_reason(finish: &str) -> &'static str {
    match finish {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// The Messages answer for a `chat.completion`, or `None` when it is not
/// one: read into borrowed pieces, written directly (the text and ids
/// copied as the upstream encoded them).
pub fn response(body: &[u8]) -> Option<Bytes> {
    #[derive(serde::Deserialize)]
    struct Completion<'a> {
        #[serde(borrow)]
        id: Option<&'a RawValue>,
        #[serde(borrow)]
        model: Option<&'a RawValue>,
        #[serde(borrow)]
        choices: Vec<Choice<'a>>,
        #[serde(default)]
        usage: Option<chunk::Usage>,
    }
    #[derive(serde::Deserialize)]
    struct Choice<'a> {
        #[serde(borrow, default)]
        message: Message<'a>,
        #[serde(borrow)]
        finish_reason: Option<std::borrow::Cow<'a, str>>,
    }
    #[derive(Default, serde::Deserialize)]
    struct Message<'a> {
        #[serde(borrow)]
        content: Option<&'a RawValue>,
        #[serde(borrow, default)]
        tool_calls: Vec<Call<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Call<'a> {
        #[serde(borrow)]
        id: Option<&'a RawValue>,
        #[serde(borrow)]
        function: Option<chunk::FunctionDelta<'a>>,
    }
    let completion: Completion<'_> = serde_json::from_slice(body).ok()?;
    let choice = completion.choices.first()?;
    let mut out = Vec::with_capacity(body.len() + 256);
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(chunk::raw(completion.id));
    out.extend_from_slice(b",\"type\":\"message\",\"role\":\"assistant\",\"model\":");
    out.extend_from_slice(chunk::raw(completion.model));
    out.extend_from_slice(b",\"content\":[");
    let mut first = true;
    if let Some(text) = chunk::text(choice.message.content) {
        out.extend_from_slice(b"{\"type\":\"text\",\"text\":");
        out.extend_from_slice(text.get().as_bytes());
        out.push(b'}');
        first = false;
    }
    for call in &choice.message.tool_calls {
        let function = call.function.as_ref();
        // `arguments` is JSON in a string: Anthropic wants the object.
        let input: Value = function
            .and_then(|f| f.arguments)
            .and_then(|a| serde_json::from_str::<std::borrow::Cow<'_, str>>(a.get()).ok())
            .and_then(|a| serde_json::from_str(&a).ok())
            .unwrap_or_else(|| json!({}));
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(b"{\"type\":\"tool_use\",\"id\":");
        out.extend_from_slice(chunk::raw(call.id));
        out.extend_from_slice(b",\"name\":");
        out.extend_from_slice(chunk::raw(function.and_then(|f| f.name)));
        out.extend_from_slice(b",\"input\":");
        serde_json::to_writer(&mut out, &input).ok()?;
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"stop_reason\":\"");
    out.extend_from_slice(
        stop_reason(choice.finish_reason.as_deref().unwrap_or("stop")).as_bytes(),
    );
    let usage = completion.usage.unwrap_or_default();
    let (prompt, cached) = (usage.prompt(), usage.cached());
    let (mut a, mut b, mut c) = ([0; 20], [0; 20], [0; 20]);
    for part in [
        &b"\",\"stop_sequence\":null,\"usage\":{\"input_tokens\":"[..],
        decimal(prompt.saturating_sub(cached), &mut a),
        b",\"output_tokens\":",
        decimal(usage.completion(), &mut b),
        b",\"cache_read_input_tokens\":",
        decimal(cached, &mut c),
        b",\"cache_creation_input_tokens\":0}}",
    ] {
        out.extend_from_slice(part);
    }
    Some(Bytes::from(out))
}

/// Anthropic's error body for an upstream error body (OpenAI-shaped or not)
/// with `status`.
pub fn error(status: u16, body: &[u8]) -> Bytes {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let message = parsed["error"]["message"]
        .as_str()
        .map_or_else(|| String::from_utf8_lossy(body).into_owned(), str::to_owned);
    let kind = match status {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    };
    let out = json!({"type": "error", "error": {"type": kind, "message": message}});
    Bytes::from(serde_json::to_vec(&out).unwrap_or_default())
}

/// `response`, or, when it is one of llmproxy's own failures (an invalid
/// key, a limit, an unreachable upstream), the same status and headers with
/// Anthropic's error body. Upstream answers pass as they are.
pub fn own_error(response: axum::response::Response) -> axum::response::Response {
    let Some(failure) = response.extensions().get::<crate::error::Failure>() else {
        return response;
    };
    let status = response.status().as_u16();
    let body = error(
        status,
        &serde_json::to_vec(&json!({"error": {"message": &*failure.detail}})).unwrap_or_default(),
    );
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(http::header::CONTENT_LENGTH);
    axum::response::Response::from_parts(parts, axum::body::Body::from(body))
}

/// OpenAI chunks translated into Anthropic's event sequence as they pass:
/// each chunk parsed once into borrowed pieces ([`Chunk`]), each event
/// written directly, text and arguments copied as the upstream encoded them.
#[derive(Debug, Default)]
pub struct StreamTranslator {
    lines: crate::stream::lines::Lines,
    started: bool,
    /// The open content block: its Anthropic index and, for a tool call,
    /// the OpenAI tool index it carries.
    open: Option<(u64, Option<u64>)>,
    next_block: u64,
    /// Anthropic's `stop_reason`, once the upstream gave its finish.
    finish: Option<&'static str>,
    usage: chunk::Usage,
    done: bool,
}

/// Writes one event: `event: KIND`, then `data:` with the pieces of its
/// JSON in order.
fn event(kind: &str, parts: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    for part in parts {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\n\n");
}

/// Anthropic's `error` event, `message` JSON-encoded.
fn error_event(message: &str, out: &mut Vec<u8>) {
    let message = serde_json::to_vec(message).unwrap_or_else(|_| b"\"\"".to_vec());
    event(
        "error",
        &[
            b"{\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":",
            &message,
            b"}}",
        ],
        out,
    );
}

impl StreamTranslator {
    fn close_block(&mut self, out: &mut Vec<u8>) {
        if let Some((index, _)) = self.open.take() {
            let mut digits = [0; 20];
            event(
                "content_block_stop",
                &[
                    b"{\"type\":\"content_block_stop\",\"index\":",
                    decimal(index, &mut digits),
                    b"}",
                ],
                out,
            );
        }
    }

    /// Opens the next block (closing the open one) with `block`'s JSON.
    fn open_block(&mut self, block: &[&[u8]], tool: Option<u64>, out: &mut Vec<u8>) -> u64 {
        self.close_block(out);
        let index = self.next_block;
        self.next_block += 1;
        let mut digits = [0; 20];
        let mut parts: Vec<&[u8]> = Vec::with_capacity(block.len() + 3);
        parts.push(b"{\"type\":\"content_block_start\",\"index\":");
        parts.push(decimal(index, &mut digits));
        parts.push(b",\"content_block\":");
        parts.extend_from_slice(block);
        parts.push(b"}");
        event("content_block_start", &parts, out);
        self.open = Some((index, tool));
        index
    }

    fn delta(&self, index: u64, kind: &[u8], field: &[u8], value: &[u8], out: &mut Vec<u8>) {
        let mut digits = [0; 20];
        event(
            "content_block_delta",
            &[
                b"{\"type\":\"content_block_delta\",\"index\":",
                decimal(index, &mut digits),
                b",\"delta\":{\"type\":\"",
                kind,
                b"\",\"",
                field,
                b"\":",
                value,
                b"}}",
            ],
            out,
        );
    }

    /// Translates what `data` completes into `out`; on a failure, an
    /// `error` event is the last thing written.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        self.lines(data, out)
            .inspect_err(|err| error_event(err, out))
    }

    fn lines(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        // Taken out for the call: `line` needs the rest of `self`.
        let mut lines = std::mem::take(&mut self.lines);
        let result = lines.feed(data, |line| self.line(line, out));
        self.lines = lines;
        result
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let Some(payload) = line.trim_ascii_end().strip_prefix(b"data:") else {
            return Ok(());
        };
        let payload = payload.trim_ascii();
        if payload == b"[DONE]" {
            self.close_block(out);
            let reason = self.finish.unwrap_or("end_turn");
            // The whole usage (Anthropic's recent API versions send input
            // counts here too): the input is only known at the end of an
            // OpenAI stream.
            let (prompt, cached) = (self.usage.prompt(), self.usage.cached());
            let (mut a, mut b, mut c) = ([0; 20], [0; 20], [0; 20]);
            event(
                "message_delta",
                &[
                    b"{\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"",
                    reason.as_bytes(),
                    b"\",\"stop_sequence\":null},\"usage\":{\"input_tokens\":",
                    decimal(prompt.saturating_sub(cached), &mut a),
                    b",\"output_tokens\":",
                    decimal(self.usage.completion(), &mut b),
                    b",\"cache_read_input_tokens\":",
                    decimal(cached, &mut c),
                    b",\"cache_creation_input_tokens\":0}}",
                ],
                out,
            );
            event("message_stop", &[b"{\"type\":\"message_stop\"}"], out);
            self.done = true;
            return Ok(());
        }
        let chunk = Chunk::parse(payload)?;
        if let Some(failure) = chunk.failure() {
            return Err(failure);
        }
        if !self.started {
            self.started = true;
            event(
                "message_start",
                &[
                    b"{\"type\":\"message_start\",\"message\":{\"id\":",
                    chunk::raw(chunk.id),
                    b",\"type\":\"message\",\"role\":\"assistant\",\"model\":",
                    chunk::raw(chunk.model),
                    b",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":0,\"output_tokens\":0}}}",
                ],
                out,
            );
        }
        if let Some(usage) = chunk.usage {
            self.usage = usage;
        }
        // An OpenAI-compatible first chunk may have empty `choices`.
        let Some(choice) = chunk.choices.first() else {
            return Ok(());
        };
        if let Some(delta) = &choice.delta {
            if let Some(text) = chunk::text(delta.content) {
                let index = match self.open {
                    Some((index, None)) => index,
                    _ => self.open_block(&[b"{\"type\":\"text\",\"text\":\"\"}"], None, out),
                };
                self.delta(index, b"text_delta", b"text", text.get().as_bytes(), out);
            }
            for call in delta.tool_calls.as_deref().unwrap_or_default() {
                let tool = call.index.unwrap_or(0);
                let function = call.function.as_ref();
                let index = match self.open {
                    Some((index, Some(open))) if open == tool => index,
                    _ => self.open_block(
                        &[
                            b"{\"type\":\"tool_use\",\"id\":",
                            chunk::raw(call.id),
                            b",\"name\":",
                            chunk::raw(function.and_then(|f| f.name)),
                            b",\"input\":{}}",
                        ],
                        Some(tool),
                        out,
                    ),
                };
                if let Some(arguments) = chunk::text(function.and_then(|f| f.arguments)) {
                    self.delta(
                        index,
                        b"input_json_delta",
                        b"partial_json",
                        arguments.get().as_bytes(),
                        out,
                    );
                }
            }
        }
        if let Some(finish) = choice.finish_reason.as_deref() {
            self.finish = Some(stop_reason(finish));
        }
        Ok(())
    }

    /// The upstream's body failed mid-stream: the client's last event.
    pub fn interrupted(&mut self, cause: &str, out: &mut Vec<u8>) {
        error_event(&format!("the upstream failed mid-stream: {cause}"), out);
    }

    /// The stream has ended: without `[DONE]` it failed, and the client
    /// gets Anthropic's `error` event before the abort.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        if let Some(rest) = self.lines.rest() {
            self.line(&rest, out)
                .inspect_err(|err| error_event(err, out))?;
        }
        if self.done {
            return Ok(());
        }
        error_event("the upstream's stream ended before it finished", out);
        Err("the upstream's stream ended before [DONE]".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_messages_request_becomes_a_chat_request() {
        let body = json!({
            "model": "gpt-4o",
            "max_tokens": 100,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Look"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}},
                ]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "sig"},
                    {"type": "text", "text": "Calling."},
                    {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"at": "desk"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a lamp"}]},
                    {"type": "text", "text": "And?"},
                ]},
            ],
            "stop_sequences": ["END"], "temperature": 0.3, "top_p": 0.9, "top_k": 5, "stream": true,
            "metadata": {"user_id": "u-1"},
            "tools": [{"name": "look", "description": "Looks", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        });
        let chat: Value =
            serde_json::from_slice(&request(body.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(
            chat,
            json!({
                "model": "gpt-4o",
                "max_tokens": 100,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [
                        {"type": "text", "text": "Look"},
                        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
                    ]},
                    {"role": "assistant", "content": "Calling.", "tool_calls": [
                        {"id": "toolu_1", "type": "function", "function": {"name": "look", "arguments": "{\"at\":\"desk\"}"}},
                    ]},
                    {"role": "tool", "tool_call_id": "toolu_1", "content": "a lamp"},
                    {"role": "user", "content": [{"type": "text", "text": "And?"}]},
                ],
                "stop": ["END"], "temperature": 0.3, "top_p": 0.9,
                "stream": true, "stream_options": {"include_usage": true},
                "user": "u-1",
                "tools": [{"type": "function", "function": {"name": "look", "description": "Looks", "parameters": {"type": "object"}}}],
                "tool_choice": "required",
                "parallel_tool_calls": false,
            })
        );
        assert!(
            request(br#"{"messages":[{"role":"system","content":"x"}]}"#)
                .unwrap_err()
                .contains("messages[0].role")
        );
    }

    #[test]
    fn a_chat_answer_becomes_a_message() {
        let chat = json!({"id": "c1", "model": "gpt-4o", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": "Sure.", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}}], "usage": {"prompt_tokens": 100, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 40}}});
        let message: Value =
            serde_json::from_slice(&response(chat.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(
            message["content"],
            json!([{"type": "text", "text": "Sure."}, {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}])
        );
        assert_eq!(message["stop_reason"], "tool_use");
        assert_eq!(
            message["usage"],
            json!({"input_tokens": 60, "output_tokens": 7, "cache_read_input_tokens": 40, "cache_creation_input_tokens": 0})
        );
        let error: Value =
            serde_json::from_slice(&error(429, br#"{"error":{"message":"slow"}}"#)).unwrap();
        assert_eq!(
            error,
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}})
        );
    }

    const STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[]}\n\n",
        "data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hé\"}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"llo\"}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_a\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\":1}\"}}]}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"call_b\",\"function\":{\"name\":\"g\",\"arguments\":\"{}\"}}]}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4}}\n\n",
        "data: [DONE]\n\n",
    );

    fn run(text: &str, split: usize) -> (String, Result<(), String>) {
        let mut translator = StreamTranslator::default();
        let mut out = Vec::new();
        let bytes = text.as_bytes();
        for piece in [&bytes[..split], &bytes[split..]] {
            if let Err(err) = translator.feed(piece, &mut out) {
                return (String::from_utf8(out).unwrap(), Err(err));
            }
        }
        let end = translator.finish(&mut out);
        (String::from_utf8(out).unwrap(), end)
    }

    #[test]
    fn a_chat_stream_becomes_anthropics_event_sequence_at_every_split() {
        let (whole, end) = run(STREAM, 0);
        end.unwrap();
        let kinds: Vec<&str> = whole
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert_eq!(
            kinds,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let starts: Vec<Value> = whole
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("event: content_block_start\ndata: "))
            .map(|data| serde_json::from_str(data).unwrap())
            .collect();
        assert_eq!(
            starts[1],
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "call_a", "name": "f", "input": {}}})
        );
        assert_eq!(
            starts[2],
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "call_b", "name": "g", "input": {}}})
        );
        // Every event is JSON whose `type` is the event's name.
        for event in whole.split("\n\n").filter(|e| !e.is_empty()) {
            let (kind, data) = event.split_once("\ndata: ").unwrap();
            let data: Value = serde_json::from_str(data).unwrap();
            assert_eq!(
                kind.strip_prefix("event: "),
                data["type"].as_str(),
                "{event}"
            );
        }
        assert!(whole.contains("{\"type\":\"text_delta\",\"text\":\"Hé\"}"));
        assert!(whole.contains("\"stop_reason\":\"tool_use\""));
        assert!(whole.contains("\"output_tokens\":4"));
        for split in 1..STREAM.len() {
            assert_eq!(run(STREAM, split).0, whole, "split at {split}");
        }
        let cut = STREAM.find("data: [DONE]").unwrap();
        let (out, end) = run(&STREAM[..cut], 0);
        assert!(end.is_err());
        let last = out.trim_end().rsplit("\n\n").next().unwrap();
        assert!(
            last.starts_with("event: error\n") && last.contains("ended before it finished"),
            "{out}"
        );
        assert!(!out.contains("message_stop"));
    }
}
