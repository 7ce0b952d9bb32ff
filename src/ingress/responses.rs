//! OpenAI's Responses API in its stateless form (`store: false`, the whole
//! input each turn, as coding agents send it) for deployments that do not
//! speak it: a Responses request becomes a Chat Completions request, which
//! the provider's own translation takes on, and the answer (whole or
//! streamed) comes back as a `response` object or `response.*` events.
//! OpenAI-compatible upstreams never come here: they get the request as
//! sent.
//!
//! Kept: `instructions` (→ a system message), `input` as a string or items
//! (`message` with `input_text` / `output_text` / `input_image` parts,
//! `function_call`, `function_call_output`), `tools` of type `function`,
//! `tool_choice`, `parallel_tool_calls`, `max_output_tokens`, `temperature`,
//! `top_p`, `user`, `stream`. Dropped: `reasoning` items and options (the
//! encrypted reasoning belongs to OpenAI), `store`, `metadata`, `include`,
//! `truncation`, `text` (a Chat `response_format` no translated provider
//! takes), `service_tier`. Refused (400 naming the field):
//! `previous_response_id` and `conversation` (they need OpenAI's stored
//! state), `item_reference` items, file inputs and built-in tools.

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::chunk::{self, Chunk};

/// Text of a message's `content` (a string, or parts of any text type).
fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter(|p| {
                matches!(
                    p["type"].as_str(),
                    Some("input_text" | "output_text" | "text" | "refusal")
                )
            })
            .filter_map(|p| p["text"].as_str().or_else(|| p["refusal"].as_str()))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// A user (or system) message's parts as Chat content parts.
fn user_parts(content: &Value, at: &str) -> Result<Value, String> {
    let Value::Array(parts) = content else {
        return match content {
            Value::String(_) => Ok(content.clone()),
            _ => Err(format!(
                "{at}.content must be a string or an array of parts"
            )),
        };
    };
    parts
        .iter()
        .enumerate()
        .map(|(j, part)| match part["type"].as_str() {
            Some("input_text" | "output_text" | "text") => {
                Ok(json!({"type": "text", "text": part["text"]}))
            }
            Some("input_image") => match part["image_url"].as_str() {
                Some(url) => Ok(json!({"type": "image_url", "image_url": {"url": url}})),
                None => Err(format!(
                    "{at}.content[{j}] is an image by file_id, which only OpenAI stores; send image_url"
                )),
            },
            other => Err(format!(
                "{at}.content[{j}] has type {:?}, which llmproxy cannot translate (input_text and input_image can)",
                other.unwrap_or("none")
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

/// Appends a tool call to the last assistant message, or starts one: Chat
/// keeps a turn's calls in one message.
fn push_call(messages: &mut Vec<Value>, call: Value) {
    if let Some(last) = messages.last_mut()
        && last["role"] == "assistant"
    {
        match last["tool_calls"].as_array_mut() {
            Some(calls) => calls.push(call),
            None => last["tool_calls"] = json!([call]),
        }
        return;
    }
    messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
}

/// The Chat Completions request for a Responses request `body`.
pub fn request(body: &[u8]) -> Result<Bytes, String> {
    let input: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| format!("the request body is not a JSON object: {e}"))?;
    for stateful in ["previous_response_id", "conversation"] {
        if input.get(stateful).is_some_and(|v| !v.is_null()) {
            return Err(format!(
                "`{stateful}` needs the conversation OpenAI stored, and this deployment is not OpenAI's: send the whole input each turn (store: false)"
            ));
        }
    }
    let mut messages = Vec::new();
    if let Some(instructions) = input.get("instructions").and_then(Value::as_str)
        && !instructions.is_empty()
    {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    match input.get("input") {
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let at = format!("input[{i}]");
                item_to_chat(item, &at, &mut messages)?;
            }
        }
        Some(Value::Null) | None => {}
        Some(_) => return Err("`input` must be a string or an array of items".into()),
    }
    let mut chat = Map::new();
    chat.insert(
        "model".into(),
        input.get("model").cloned().unwrap_or(Value::Null),
    );
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(max) = input.get("max_output_tokens").filter(|v| !v.is_null()) {
        chat.insert("max_tokens".into(), max.clone());
    }
    for field in ["temperature", "top_p", "user", "parallel_tool_calls"] {
        if let Some(value) = input.get(field).filter(|v| !v.is_null()) {
            chat.insert(field.into(), value.clone());
        }
    }
    if input.get("stream") == Some(&Value::Bool(true)) {
        chat.insert("stream".into(), true.into());
        // `response.completed` carries the usage.
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(tools) = input.get("tools").and_then(Value::as_array) {
        let tools = tools
            .iter()
            .enumerate()
            .map(|(i, tool)| match tool["type"].as_str() {
                Some("function") => Ok(json!({"type": "function", "function": {
                    "name": tool["name"],
                    "description": tool["description"].as_str().unwrap_or_default(),
                    "parameters": tool.get("parameters").filter(|p| !p.is_null()).cloned()
                        .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                }})),
                other => Err(format!(
                    "tools[{i}] has type {:?}, a tool only OpenAI runs; this deployment takes function tools",
                    other.unwrap_or("none")
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !tools.is_empty() {
            chat.insert("tools".into(), Value::Array(tools));
        }
    }
    if let Some(choice) = input.get("tool_choice").filter(|v| !v.is_null()) {
        let mapped = match (choice.as_str(), choice["type"].as_str()) {
            (Some(mode @ ("auto" | "none" | "required")), _) => json!(mode),
            (None, Some("function")) => {
                json!({"type": "function", "function": {"name": choice["name"]}})
            }
            _ => {
                return Err(format!(
                    "tool_choice {choice} is not auto, none, required or a function"
                ));
            }
        };
        chat.insert("tool_choice".into(), mapped);
    }
    serde_json::to_vec(&chat)
        .map(Bytes::from)
        .map_err(|e| format!("the translated request could not be written: {e}"))
}

/// One `input` item appended to the Chat messages.
fn item_to_chat(item: &Value, at: &str, messages: &mut Vec<Value>) -> Result<(), String> {
    let kind = item["type"]
        .as_str()
        .or_else(|| item.get("role").map(|_| "message"));
    match kind {
        Some("message") => {
            let role = item["role"].as_str().unwrap_or_default();
            match role {
                "user" => messages
                    .push(json!({"role": "user", "content": user_parts(&item["content"], at)?})),
                "system" | "developer" => {
                    messages.push(json!({"role": "system", "content": text_of(&item["content"])}));
                }
                "assistant" => {
                    let text = text_of(&item["content"]);
                    match messages.last_mut() {
                        // Text after the turn's calls stays in that turn.
                        Some(last) if last["role"] == "assistant" && last["content"].is_null() => {
                            last["content"] = text.into();
                        }
                        _ => messages.push(json!({"role": "assistant", "content": text})),
                    }
                }
                other => {
                    return Err(format!(
                        "{at}.role {other:?} is not user, assistant, system or developer"
                    ));
                }
            }
        }
        Some("function_call") => {
            let arguments = item["arguments"].as_str().unwrap_or("{}");
            push_call(
                messages,
                json!({"id": item["call_id"], "type": "function",
                       "function": {"name": item["name"], "arguments": arguments}}),
            );
        }
        Some("function_call_output") => {
            let output = match &item["output"] {
                Value::String(text) => text.clone(),
                other => text_of(other),
            };
            messages
                .push(json!({"role": "tool", "tool_call_id": item["call_id"], "content": output}));
        }
        // OpenAI's encrypted reasoning means nothing to another provider.
        Some("reasoning") => {}
        Some("item_reference") => {
            return Err(format!(
                "{at} is an item_reference, which needs the items OpenAI stored; send the item itself"
            ));
        }
        other => {
            return Err(format!(
                "{at} has type {:?}, which llmproxy cannot translate for this deployment",
                other.unwrap_or("none")
            ));
        }
    }
    Ok(())
}

/// Responses usage for Chat usage.
fn usage(chat: &Value) -> Value {
    let input = chat["prompt_tokens"].as_u64().unwrap_or(0);
    let output = chat["completion_tokens"].as_u64().unwrap_or(0);
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": chat["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0)},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": chat["completion_tokens_details"]["reasoning_tokens"].as_u64().unwrap_or(0)},
        "total_tokens": input.saturating_add(output),
    })
}

/// The response's id for a Chat id.
fn response_id(chat_id: &Value) -> String {
    let id = chat_id.as_str().unwrap_or("translated");
    format!("resp_{}", id.strip_prefix("chatcmpl-").unwrap_or(id))
}

fn text_item(id: &str, text: &str, status: &str) -> Value {
    let content = if status == "completed" {
        json!([{"type": "output_text", "text": text, "annotations": []}])
    } else {
        json!([])
    };
    json!({"type": "message", "id": id, "status": status, "role": "assistant", "content": content})
}

fn call_item(call_id: &Value, name: &Value, arguments: &str, status: &str) -> Value {
    let id = format!("fc_{}", call_id.as_str().unwrap_or_default());
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": arguments, "status": status})
}

/// A `response` object; `finish` decides completed or incomplete.
fn envelope(
    id: &str,
    model: &Value,
    created: &Value,
    finish: Option<&str>,
    output: Value,
    usage: Value,
) -> Value {
    let (status, incomplete) = match finish {
        None => ("in_progress", Value::Null),
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        Some(_) => ("completed", Value::Null),
    };
    json!({
        "id": id, "object": "response", "created_at": created, "status": status,
        "error": null, "incomplete_details": incomplete, "model": model,
        "output": output, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
        "store": false, "usage": usage,
    })
}

/// The `response` object for a `chat.completion`, or `None` when it is not one.
pub fn response(body: &[u8]) -> Option<Bytes> {
    let chat: Value = serde_json::from_slice(body).ok()?;
    let choice = chat["choices"].get(0)?;
    let message = &choice["message"];
    let id = response_id(&chat["id"]);
    let mut output = Vec::new();
    if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
        output.push(text_item(
            &format!("msg_{}", id.trim_start_matches("resp_")),
            text,
            "completed",
        ));
    }
    for call in message["tool_calls"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
    {
        let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
        output.push(call_item(
            &call["id"],
            &call["function"]["name"],
            arguments,
            "completed",
        ));
    }
    let finish = choice["finish_reason"].as_str().unwrap_or("stop");
    let answer = envelope(
        &id,
        &chat["model"],
        &chat["created"],
        Some(finish),
        Value::Array(output),
        usage(&chat["usage"]),
    );
    serde_json::to_vec(&answer).ok().map(Bytes::from)
}

/// One output item being streamed; `encoded` is its id as JSON, written
/// into each of its deltas.
#[derive(Debug)]
enum Item {
    Text {
        id: String,
        encoded: Vec<u8>,
        text: String,
    },
    Call {
        index: u64,
        call_id: Value,
        name: Value,
        encoded: Vec<u8>,
        arguments: String,
    },
}

/// A borrowed value as a tree (`null` when absent): for the few fields
/// kept across a stream's events (ids, names, the model).
fn decode(raw: Option<&RawValue>) -> Value {
    raw.and_then(|r| serde_json::from_str(r.get()).ok())
        .unwrap_or(Value::Null)
}

/// A JSON string token's text.
fn decoded(token: &RawValue) -> Result<std::borrow::Cow<'_, str>, String> {
    serde_json::from_str(token.get())
        .map_err(|e| format!("the upstream sent a string that is not one: {e}"))
}

/// A delta event, written directly: `item_id` is JSON already, `delta`
/// the upstream's string token; `sequence` counts the stream's events.
fn delta_event(
    sequence: &mut u64,
    output_index: usize,
    kind: &str,
    item_id: &[u8],
    text: bool,
    delta: &[u8],
    out: &mut Vec<u8>,
) {
    let (mut number, mut index) = ([0; 20], [0; 20]);
    let parts: [&[u8]; 11] = [
        b"event: ",
        kind.as_bytes(),
        b"\ndata: {\"type\":\"",
        kind.as_bytes(),
        b"\",\"sequence_number\":",
        crate::stream::decimal(*sequence, &mut number),
        b",\"item_id\":",
        item_id,
        b",\"output_index\":",
        crate::stream::decimal(output_index as u64, &mut index),
        if text {
            b",\"content_index\":0,\"delta\":"
        } else {
            b",\"delta\":"
        },
    ];
    *sequence += 1;
    for part in parts {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(delta);
    out.extend_from_slice(if text {
        b",\"logprobs\":[]}\n\n"
    } else {
        b"}\n\n"
    });
}

/// Chat chunks translated into `response.*` events as they pass.
#[derive(Debug, Default)]
pub struct StreamTranslator {
    lines: crate::stream::lines::Lines,
    sequence: u64,
    id: String,
    model: Value,
    created: Value,
    /// Items closed so far, as `output_item.done` gave them.
    output: Vec<Value>,
    open: Option<Item>,
    finish: Option<String>,
    usage: Value,
    started: bool,
    done: bool,
}

impl StreamTranslator {
    fn event(&mut self, kind: &str, mut data: Value, out: &mut Vec<u8>) {
        data["type"] = kind.into();
        data["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        let _ = serde_json::to_writer(&mut *out, &data);
        out.extend_from_slice(b"\n\n");
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        let index = self.output.len();
        let item = match self.open.take() {
            None => return,
            Some(Item::Text { id, text, .. }) => {
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                self.event(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text}),
                    out,
                );
                self.event(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                    out,
                );
                text_item(&id, &text, "completed")
            }
            Some(Item::Call {
                call_id,
                name,
                arguments,
                ..
            }) => {
                let item = call_item(&call_id, &name, &arguments, "completed");
                self.event("response.function_call_arguments.done", json!({"item_id": item["id"], "output_index": index, "name": name, "arguments": arguments}), out);
                item
            }
        };
        self.event(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
            out,
        );
        self.output.push(item);
    }

    /// Translates what `data` completes into `out`; on a failure, an
    /// `error` event is the last thing written.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let mut lines = std::mem::take(&mut self.lines);
        let result = lines.feed(data, |line| self.line(line, out));
        self.lines = lines;
        result.inspect_err(|err| self.interrupted(err, out))
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        let Some(payload) = line.trim_ascii_end().strip_prefix(b"data:") else {
            return Ok(());
        };
        let payload = payload.trim_ascii();
        if payload == b"[DONE]" {
            self.close(out);
            let finish = self.finish.clone().unwrap_or_else(|| "stop".into());
            let output = Value::Array(std::mem::take(&mut self.output));
            let response = envelope(
                &self.id,
                &self.model,
                &self.created,
                Some(&finish),
                output,
                usage(&self.usage),
            );
            let kind = if response["status"] == "incomplete" {
                "response.incomplete"
            } else {
                "response.completed"
            };
            self.event(kind, json!({"response": response}), out);
            self.done = true;
            return Ok(());
        }
        let chunk = Chunk::parse(payload)?;
        if let Some(failure) = chunk.failure() {
            return Err(failure);
        }
        if !self.started {
            self.started = true;
            self.id = response_id(&decode(chunk.id));
            self.model = decode(chunk.model);
            self.created = decode(chunk.created);
            let response = envelope(
                &self.id,
                &self.model,
                &self.created,
                None,
                json!([]),
                Value::Null,
            );
            self.event("response.created", json!({"response": response}), out);
            self.event("response.in_progress", json!({"response": response}), out);
        }
        if let Some(usage) = chunk.usage {
            self.usage = json!({
                "prompt_tokens": usage.prompt(),
                "completion_tokens": usage.completion(),
                "prompt_tokens_details": {"cached_tokens": usage.cached()},
                "completion_tokens_details": {"reasoning_tokens": usage.reasoning()},
            });
        }
        let Some(choice) = chunk.choices.first() else {
            return Ok(());
        };
        if let Some(delta) = &choice.delta {
            if let Some(text) = chunk::text(delta.content) {
                self.text(text, out)?;
            }
            for call in delta.tool_calls.as_deref().unwrap_or_default() {
                self.call(call, out)?;
            }
        }
        if let Some(finish) = choice.finish_reason.as_deref() {
            self.finish = Some(finish.to_owned());
        }
        Ok(())
    }

    // The open item's `output_index` is `output.len()`: the closed ones
    // are all in `output`.
    fn text(&mut self, text: &RawValue, out: &mut Vec<u8>) -> Result<(), String> {
        if !matches!(self.open, Some(Item::Text { .. })) {
            self.close(out);
            let index = self.output.len();
            let id = format!("msg_{}_{index}", self.id.trim_start_matches("resp_"));
            self.event(
                "response.output_item.added",
                json!({"output_index": index, "item": text_item(&id, "", "in_progress")}),
                out,
            );
            let part = json!({"type": "output_text", "text": "", "annotations": []});
            self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
                out,
            );
            self.open = Some(Item::Text {
                encoded: serde_json::to_vec(&id).unwrap_or_default(),
                id,
                text: String::new(),
            });
        }
        let Some(Item::Text {
            encoded, text: all, ..
        }) = &mut self.open
        else {
            return Ok(());
        };
        all.push_str(&decoded(text)?);
        delta_event(
            &mut self.sequence,
            self.output.len(),
            "response.output_text.delta",
            encoded,
            true,
            text.get().as_bytes(),
            out,
        );
        Ok(())
    }

    fn call(&mut self, call: &chunk::CallDelta<'_>, out: &mut Vec<u8>) -> Result<(), String> {
        let index = call.index.unwrap_or(0);
        let function = call.function.as_ref();
        if !matches!(&self.open, Some(Item::Call { index: open, .. }) if *open == index) {
            self.close(out);
            let call_id = decode(call.id);
            let name = decode(function.and_then(|f| f.name));
            let item = call_item(&call_id, &name, "", "in_progress");
            let encoded = serde_json::to_vec(&item["id"]).unwrap_or_default();
            let output_index = self.output.len();
            self.event(
                "response.output_item.added",
                json!({"output_index": output_index, "item": item}),
                out,
            );
            self.open = Some(Item::Call {
                index,
                call_id,
                name,
                encoded,
                arguments: String::new(),
            });
        }
        let Some(more) = chunk::text(function.and_then(|f| f.arguments)) else {
            return Ok(());
        };
        let Some(Item::Call {
            arguments, encoded, ..
        }) = &mut self.open
        else {
            return Ok(());
        };
        arguments.push_str(&decoded(more)?);
        delta_event(
            &mut self.sequence,
            self.output.len(),
            "response.function_call_arguments.delta",
            encoded,
            false,
            more.get().as_bytes(),
            out,
        );
        Ok(())
    }

    /// The stream failed: an `error` event is the client's last.
    pub fn interrupted(&mut self, cause: &str, out: &mut Vec<u8>) {
        self.event(
            "error",
            json!({"code": "upstream_error", "message": cause, "param": null}),
            out,
        );
    }

    /// The stream has ended: without `[DONE]` it failed, and the client
    /// gets an `error` event before the abort.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        if let Some(rest) = self.lines.rest() {
            self.line(&rest, out)
                .inspect_err(|err| self.interrupted(err, out))?;
        }
        if self.done {
            return Ok(());
        }
        let cause = "the upstream's stream ended before it finished";
        self.interrupted(cause, out);
        Err(cause.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stateless coding-agent turn, as the Codex CLI sends one.
    #[test]
    fn a_stateless_responses_request_becomes_a_chat_request() {
        let body = json!({
            "model": "claude-sonnet", "instructions": "You are a coding agent.", "store": false,
            "stream": true, "max_output_tokens": 500, "temperature": 0.2, "user": "u-7",
            "reasoning": {"effort": "medium"}, "include": ["reasoning.encrypted_content"],
            "parallel_tool_calls": false, "tool_choice": "auto",
            "input": [
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Repo: llmproxy"}]},
                {"role": "user", "content": [
                    {"type": "input_text", "text": "List the files"},
                    {"type": "input_image", "image_url": "data:image/png;base64,QUJD"},
                ]},
                {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"},
                {"type": "function_call", "call_id": "call_1", "name": "shell", "arguments": "{\"cmd\":\"ls\"}"},
                {"type": "function_call", "call_id": "call_2", "name": "shell", "arguments": "{\"cmd\":\"pwd\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "src\ntests"},
                {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "/work"}]},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Two dirs."}]},
                {"role": "user", "content": "Thanks"},
            ],
            "tools": [{"type": "function", "name": "shell", "description": "Runs a command", "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}, "strict": true}],
        });
        let chat: Value =
            serde_json::from_slice(&request(body.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(
            chat,
            json!({
                "model": "claude-sonnet", "max_tokens": 500, "temperature": 0.2, "user": "u-7",
                "parallel_tool_calls": false, "tool_choice": "auto",
                "stream": true, "stream_options": {"include_usage": true},
                "messages": [
                    {"role": "system", "content": "You are a coding agent."},
                    {"role": "system", "content": "Repo: llmproxy"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "List the files"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
                    ]},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "shell", "arguments": "{\"cmd\":\"ls\"}"}},
                        {"id": "call_2", "type": "function", "function": {"name": "shell", "arguments": "{\"cmd\":\"pwd\"}"}},
                    ]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "src\ntests"},
                    {"role": "tool", "tool_call_id": "call_2", "content": "/work"},
                    {"role": "assistant", "content": "Two dirs."},
                    {"role": "user", "content": "Thanks"},
                ],
                "tools": [{"type": "function", "function": {"name": "shell", "description": "Runs a command", "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}}],
            })
        );
        let plain: Value = serde_json::from_slice(
            &request(br#"{"model":"m","input":"Hi","tool_choice":{"type":"function","name":"f"}}"#)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            plain["messages"],
            json!([{"role": "user", "content": "Hi"}])
        );
        assert_eq!(
            plain["tool_choice"],
            json!({"type": "function", "function": {"name": "f"}})
        );
    }

    #[test]
    fn what_needs_openais_state_or_tools_is_refused_by_name() {
        for (body, named) in [
            (
                r#"{"input":"x","previous_response_id":"resp_1"}"#,
                "`previous_response_id`",
            ),
            (r#"{"input":"x","conversation":"conv_1"}"#, "`conversation`"),
            (
                r#"{"input":[{"type":"item_reference","id":"msg_1"}]}"#,
                "input[0] is an item_reference",
            ),
            (
                r#"{"input":"x","tools":[{"type":"web_search"}]}"#,
                "tools[0] has type \"web_search\"",
            ),
            (
                r#"{"input":[{"role":"user","content":[{"type":"input_file","file_id":"f"}]}]}"#,
                "input[0].content[0]",
            ),
            (
                r#"{"input":[{"role":"user","content":[{"type":"input_image","file_id":"f"}]}]}"#,
                "file_id",
            ),
        ] {
            let err = request(body.as_bytes()).unwrap_err();
            assert!(err.contains(named), "{body}: {err}");
        }
        assert!(request(br#"{"input":"x","previous_response_id":null}"#).is_ok());
    }

    #[test]
    fn a_chat_answer_becomes_a_response() {
        let chat = json!({"id": "chatcmpl-9", "created": 1700000000, "model": "claude-sonnet", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": "Running it.", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "shell", "arguments": "{\"cmd\":\"ls\"}"}}]}}], "usage": {"prompt_tokens": 100, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 40}}});
        let answer: Value =
            serde_json::from_slice(&response(chat.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(answer["id"], "resp_9");
        assert_eq!(answer["object"], "response");
        assert_eq!(answer["status"], "completed");
        assert_eq!(
            answer["output"],
            json!([
                {"type": "message", "id": "msg_9", "status": "completed", "role": "assistant", "content": [{"type": "output_text", "text": "Running it.", "annotations": []}]},
                {"type": "function_call", "id": "fc_call_1", "call_id": "call_1", "name": "shell", "arguments": "{\"cmd\":\"ls\"}", "status": "completed"},
            ])
        );
        assert_eq!(
            answer["usage"],
            json!({"input_tokens": 100, "input_tokens_details": {"cached_tokens": 40}, "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 107})
        );
        let cut = json!({"id": "c", "choices": [{"index": 0, "finish_reason": "length", "message": {"content": "Half"}}]});
        let answer: Value =
            serde_json::from_slice(&response(cut.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(
            (answer["status"].as_str(), &answer["incomplete_details"]),
            (Some("incomplete"), &json!({"reason": "max_output_tokens"}))
        );
        assert!(response(b"{\"choices\":[]}").is_none());
    }

    const STREAM: &str = concat!(
        "data: {\"id\":\"chatcmpl-c\",\"created\":1,\"model\":\"claude\",\"choices\":[]}\n\n",
        "data: {\"id\":\"chatcmpl-c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hé\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"llo\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_a\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n",
        "data: {\"id\":\"chatcmpl-c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\":1}\"}}]}}]}\n\n",
        "data: {\"id\":\"chatcmpl-c\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"call_b\",\"function\":{\"name\":\"g\",\"arguments\":\"{}\"}}]}}]}\n\n",
        "data: {\"id\":\"chatcmpl-c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: {\"id\":\"chatcmpl-c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4}}\n\n",
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

    fn events(text: &str) -> Vec<Value> {
        text.split("\n\n")
            .filter_map(|event| event.split_once("\ndata: "))
            .map(|(kind, data)| {
                let data: Value = serde_json::from_str(data).unwrap();
                assert_eq!(kind.strip_prefix("event: "), data["type"].as_str());
                data
            })
            .collect()
    }

    #[test]
    fn a_chat_stream_becomes_response_events_at_every_split() {
        let (whole, end) = run(STREAM, 0);
        end.unwrap();
        let events = events(&whole);
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (n, event) in events.iter().enumerate() {
            assert_eq!(event["sequence_number"], n);
        }
        assert_eq!(events[6]["text"], "Héllo");
        // Parallel calls keep their own output items.
        assert_eq!(
            (
                events[9]["output_index"].as_u64(),
                events[13]["output_index"].as_u64()
            ),
            (Some(1), Some(2))
        );
        assert_eq!(events[11]["arguments"], "{\"a\":1}");
        let done = &events[17]["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["output"].as_array().unwrap().len(), 3);
        assert_eq!(done["output"][0]["content"][0]["text"], "Héllo");
        assert_eq!(done["output"][2]["call_id"], "call_b");
        assert_eq!(
            (
                done["usage"]["input_tokens"].as_u64(),
                done["usage"]["output_tokens"].as_u64()
            ),
            (Some(9), Some(4))
        );
        for split in 1..STREAM.len() {
            assert_eq!(run(STREAM, split).0, whole, "split at {split}");
        }
    }

    #[test]
    fn a_stream_that_dies_never_completes() {
        let cut = STREAM.find("data: [DONE]").unwrap();
        let (out, end) = run(&STREAM[..cut], 0);
        assert!(end.is_err());
        let last = events(&out).pop().unwrap();
        assert_eq!(last["type"], "error");
        assert!(
            last["message"]
                .as_str()
                .unwrap()
                .contains("ended before it finished")
        );
        assert!(!out.contains("response.completed"));
        let failing = "data: {\"id\":\"c\",\"choices\":[]}\n\ndata: {\"error\":{\"message\":\"overloaded\"}}\n\n";
        let (out, end) = run(failing, 0);
        assert!(end.unwrap_err().contains("overloaded"));
        assert_eq!(events(&out).pop().unwrap()["type"], "error");
        let long = STREAM.replace(
            "\"finish_reason\":\"tool_calls\"",
            "\"finish_reason\":\"length\"",
        );
        let (out, _) = run(&long, 0);
        let last = events(&out).pop().unwrap();
        assert_eq!(
            (
                last["type"].as_str(),
                last["response"]["incomplete_details"]["reason"].as_str()
            ),
            (Some("response.incomplete"), Some("max_output_tokens"))
        );
    }
}
