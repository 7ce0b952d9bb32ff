//! Google's Gemini API (`models/{model}:generateContent`, streamed with
//! `:streamGenerateContent?alt=sse`) behind the OpenAI Chat Completions API.
//!
//! Field by field (the README's table lists the same):
//! - `system`/`developer` messages → `systemInstruction`; `user` →
//!   `user` contents, assistant → `model` contents; text parts → `text`,
//!   `image_url` `data:` URLs → `inlineData`, other URLs → `fileData`;
//!   assistant `tool_calls` → `functionCall` parts; `tool` messages →
//!   `functionResponse` parts named after the call they answer; same-role
//!   turns are merged.
//! - `max_completion_tokens`/`max_tokens` → `generationConfig.maxOutputTokens`,
//!   `temperature`, `top_p` → `topP`, `stop` → `stopSequences`, `n` →
//!   `candidateCount` (only 1 is translated back: `n` > 1 is refused);
//!   `tools` → `functionDeclarations`; `tool_choice` auto/required/none/named
//!   → `functionCallingConfig` AUTO/ANY/NONE/ANY with `allowedFunctionNames`.
//! - Dropped: `user`, `seed`, `logprobs`, penalties, `logit_bias`,
//!   `response_format`, `parallel_tool_calls`, `stream_options` (usage is
//!   always reported).
//! - Answers: `text` parts → `content`, `functionCall` parts → `tool_calls`
//!   (ids `call_N` unless Gemini gives one), thought parts dropped;
//!   `finishReason` STOP → `stop` (`tool_calls` when calls were made),
//!   MAX_TOKENS → `length`, SAFETY and the other blocking reasons →
//!   `content_filter`; `usageMetadata` → usage where `completion_tokens`
//!   includes `thoughtsTokenCount` (Gemini's `candidatesTokenCount`
//!   excludes thinking, OpenAI's completion tokens include reasoning) and
//!   `prompt_tokens_details.cached_tokens` is `cachedContentTokenCount`.
//! - Errors: `{"error":{"code","message","status"}}` → the OpenAI error
//!   shape, status kept.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::anthropic::Refusal;

/// A translated request: its body and the path it goes to.
#[derive(Debug)]
pub struct Translated {
    /// The `generateContent` request body.
    pub body: Bytes,
    /// `/v1/models/{model}:generateContent` or `…:streamGenerateContent?alt=sse`.
    pub path: String,
    /// The client asked for a stream.
    pub stream: bool,
    /// … with the final usage chunk.
    pub include_usage: bool,
}

fn parts_of(content: &Value, at: &str) -> Result<Vec<Value>, Refusal> {
    match content {
        Value::Null => Ok(Vec::new()),
        Value::String(text) if text.is_empty() => Ok(Vec::new()),
        Value::String(text) => Ok(vec![json!({"text": text})]),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(i, part)| match part["type"].as_str() {
                Some("text") => Ok(json!({"text": part["text"]})),
                Some("image_url") => {
                    let url = part["image_url"]["url"]
                        .as_str()
                        .ok_or_else(|| format!("{at}.content[{i}].image_url.url is missing"))?;
                    if let Some(rest) = url.strip_prefix("data:")
                        && let Some((mime, data)) = rest.split_once(";base64,")
                    {
                        Ok(json!({"inlineData": {"mimeType": mime, "data": data}}))
                    } else {
                        Ok(json!({"fileData": {"mimeType": "image/*", "fileUri": url}}))
                    }
                }
                other => Err(format!(
                    "{at}.content[{i}] has type {other:?}, which a Gemini upstream cannot take (text and image_url can)"
                )),
            })
            .collect(),
        _ => Err(format!("{at}.content must be a string or an array of parts")),
    }
}

/// Whether `model` can stand in a URL path as is (Gemini's model path,
/// Azure's deployment path).
pub fn valid_model(model: &str) -> bool {
    !model.is_empty()
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// The Gemini request for an OpenAI chat completion request `body`.
pub fn request(body: &[u8]) -> Result<Translated, Refusal> {
    let chat: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| format!("the request body is not a JSON object: {e}"))?;
    let model = chat
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !valid_model(model) {
        return Err(format!(
            "`model` {model:?} is not a Gemini model name (letters, digits, `-`, `.`, `_`)"
        ));
    }
    if chat.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err("`n` above 1 cannot be served by a Gemini upstream".into());
    }
    let empty = Vec::new();
    let mut system = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    // Gemini answers a call by its function's name, OpenAI by the call's id.
    let mut names: Vec<(String, Value)> = Vec::new();
    let input = chat
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for (i, message) in input.iter().enumerate() {
        let at = format!("messages[{i}]");
        match message["role"].as_str() {
            Some("system" | "developer") => system.extend(parts_of(&message["content"], &at)?),
            Some("user") => super::push_turn(
                &mut contents,
                "parts",
                "user",
                parts_of(&message["content"], &at)?,
            ),
            Some("assistant") => {
                let mut parts = parts_of(&message["content"], &at)?;
                for (j, call) in message["tool_calls"]
                    .as_array()
                    .unwrap_or(&empty)
                    .iter()
                    .enumerate()
                {
                    let args = super::call_arguments(call, &at, j)?;
                    let name = call["function"]["name"].clone();
                    if let Some(id) = call["id"].as_str() {
                        names.push((id.to_owned(), name.clone()));
                    }
                    parts.push(json!({"functionCall": {"name": name, "args": args}}));
                }
                super::push_turn(&mut contents, "parts", "model", parts);
            }
            Some("tool") => {
                let id = message["tool_call_id"].as_str().unwrap_or_default();
                let name = names
                    .iter()
                    .find(|(known, _)| known == id)
                    .map(|(_, name)| name.clone())
                    .ok_or_else(|| {
                        format!("{at}.tool_call_id {id:?} answers no earlier tool call")
                    })?;
                let text = match &message["content"] {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                // A JSON object result is given as is; anything else wrapped.
                let response = match serde_json::from_str::<Value>(&text) {
                    Ok(object @ Value::Object(_)) => object,
                    _ => json!({"content": text}),
                };
                super::push_turn(
                    &mut contents,
                    "parts",
                    "user",
                    vec![json!({"functionResponse": {"name": name, "response": response}})],
                );
            }
            other => return Err(format!("{at}.role {other:?} is not a chat role")),
        }
    }
    let mut out = Map::new();
    out.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        out.insert("systemInstruction".into(), json!({"parts": system}));
    }
    let mut config = Map::new();
    if let Some(max) = chat
        .get("max_completion_tokens")
        .or_else(|| chat.get("max_tokens"))
        .and_then(Value::as_u64)
    {
        config.insert("maxOutputTokens".into(), max.into());
    }
    for (from, to) in [("temperature", "temperature"), ("top_p", "topP")] {
        if let Some(value) = chat.get(from).filter(|v| !v.is_null()) {
            config.insert(to.into(), value.clone());
        }
    }
    if let Some(stops) = super::stop_list(chat.get("stop")) {
        config.insert("stopSequences".into(), stops);
    }
    if !config.is_empty() {
        out.insert("generationConfig".into(), Value::Object(config));
    }
    if let Some(tools) = chat.get("tools").and_then(Value::as_array) {
        let declarations: Vec<Value> = tools
            .iter()
            .map(|tool| {
                let function = &tool["function"];
                let mut declaration = json!({"name": function["name"]});
                if let Some(description) = function["description"].as_str() {
                    declaration["description"] = description.into();
                }
                if function["parameters"].is_object() {
                    declaration["parameters"] = function["parameters"].clone();
                }
                declaration
            })
            .collect();
        out.insert(
            "tools".into(),
            json!([{"functionDeclarations": declarations}]),
        );
    }
    let calling = match chat.get("tool_choice") {
        Some(Value::String(mode)) => match mode.as_str() {
            "auto" => Some(json!({"mode": "AUTO"})),
            "required" => Some(json!({"mode": "ANY"})),
            "none" => Some(json!({"mode": "NONE"})),
            other => {
                return Err(format!(
                    "tool_choice {other:?} is not auto, required or none"
                ));
            }
        },
        Some(Value::Object(named)) => Some(json!({
            "mode": "ANY",
            "allowedFunctionNames": [named.get("function").map(|f| f["name"].clone())],
        })),
        _ => None,
    };
    if let Some(calling) = calling {
        out.insert(
            "toolConfig".into(),
            json!({"functionCallingConfig": calling}),
        );
    }
    let stream = chat.get("stream") == Some(&Value::Bool(true));
    let include_usage = chat
        .get("stream_options")
        .is_some_and(|o| o["include_usage"] == true);
    let path = if stream {
        format!("/v1/models/{model}:streamGenerateContent?alt=sse")
    } else {
        format!("/v1/models/{model}:generateContent")
    };
    let body = serde_json::to_vec(&out)
        .map(Bytes::from)
        .map_err(|e| format!("the translated request could not be written: {e}"))?;
    Ok(Translated {
        body,
        path,
        stream,
        include_usage,
    })
}

/// OpenAI's `finish_reason` for Gemini's `finishReason`.
pub fn finish_reason(reason: &str, called: bool) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            "content_filter"
        }
        _ if called => "tool_calls",
        _ => "stop",
    }
}

/// Gemini's `usageMetadata`; absent counts are 0.
#[derive(Debug, Default, Clone, Copy, serde::Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Metadata {
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
}

impl Metadata {
    /// OpenAI usage: thinking counts as completion (Gemini counts it apart).
    pub fn openai(&self) -> Value {
        let prompt = self.prompt_token_count.unwrap_or(0);
        let thoughts = self.thoughts_token_count.unwrap_or(0);
        let completion = self
            .candidates_token_count
            .unwrap_or(0)
            .saturating_add(thoughts);
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt.saturating_add(completion),
            "prompt_tokens_details": {"cached_tokens": self.cached_content_token_count.unwrap_or(0)},
            "completion_tokens_details": {"reasoning_tokens": thoughts},
        })
    }
}

/// The text and calls of a candidate's parts (thoughts skipped).
fn read_parts(candidate: &Value, first_call: u64) -> (String, Vec<Value>) {
    let mut text = String::new();
    let mut calls = Vec::new();
    for part in candidate["content"]["parts"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
    {
        if part["thought"] == true {
            continue;
        }
        if let Some(piece) = part["text"].as_str() {
            text.push_str(piece);
        } else if let Some(call) = part.get("functionCall") {
            let index = first_call + calls.len() as u64;
            let id = call["id"]
                .as_str()
                .map_or_else(|| format!("call_{index}"), str::to_owned);
            calls.push(json!({
                "index": index,
                "id": id,
                "type": "function",
                "function": {"name": call["name"], "arguments": call["args"].to_string()},
            }));
        }
    }
    (text, calls)
}

/// The `chat.completion` for a `generateContent` answer.
pub fn response(body: &[u8], model: &str, created: u64) -> Option<Bytes> {
    let answer: Value = serde_json::from_slice(body).ok()?;
    let candidate = answer["candidates"].get(0)?;
    let (text, mut calls) = read_parts(candidate, 0);
    for call in &mut calls {
        if let Some(call) = call.as_object_mut() {
            call.remove("index");
        }
    }
    let reason = candidate["finishReason"].as_str().unwrap_or("STOP");
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { text.into() }});
    let called = !calls.is_empty();
    if called {
        message["tool_calls"] = Value::Array(calls);
    }
    let out = json!({
        "id": answer["responseId"].as_str().map_or_else(|| format!("chatcmpl-gemini-{created}"), |id| format!("chatcmpl-{id}")),
        "object": "chat.completion",
        "created": created,
        "model": answer["modelVersion"].as_str().unwrap_or(model),
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(reason, called)}],
        "usage": Metadata::deserialize(&answer["usageMetadata"]).unwrap_or_default().openai(),
    });
    serde_json::to_vec(&out).ok().map(Bytes::from)
}

/// The OpenAI error body for a Google error body.
pub fn error(body: &[u8]) -> Option<Bytes> {
    let parsed: Value = serde_json::from_slice(body).ok()?;
    // Streams and some proxies wrap it in an array.
    let error = parsed
        .get("error")
        .or_else(|| parsed.get(0)?.get("error"))?;
    let kind = error["status"].as_str().unwrap_or("error");
    let out =
        json!({"error": {"message": error["message"], "type": kind, "param": null, "code": kind}});
    serde_json::to_vec(&out).ok().map(Bytes::from)
}

/// A Gemini SSE stream translated into OpenAI chunks, event by event:
/// each event read into borrowed pieces, each chunk written directly (a
/// lone text part copied as Gemini encoded it).
#[derive(Debug, Default)]
pub struct StreamTranslator {
    include_usage: bool,
    created: u64,
    model: String,
    id: String,
    /// `data: {"id":…,"object":…,"created":…,"model":…,"choices":[`, for
    /// the current id and model.
    prefix: Vec<u8>,
    lines: crate::stream::lines::Lines,
    started: bool,
    calls: u64,
    usage: Metadata,
    finished: bool,
}

#[derive(serde::Deserialize)]
struct Event<'a> {
    #[serde(borrow, default)]
    candidates: Vec<Candidate<'a>>,
    #[serde(rename = "usageMetadata")]
    usage_metadata: Option<Metadata>,
    #[serde(rename = "modelVersion", borrow)]
    model_version: Option<Cow<'a, str>>,
    #[serde(rename = "responseId", borrow)]
    response_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    error: Option<Failure<'a>>,
}

#[derive(serde::Deserialize)]
struct Candidate<'a> {
    #[serde(borrow)]
    content: Option<Content<'a>>,
    #[serde(rename = "finishReason", borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct Content<'a> {
    #[serde(borrow, default)]
    parts: Vec<Part<'a>>,
}

#[derive(serde::Deserialize)]
struct Part<'a> {
    #[serde(borrow)]
    text: Option<&'a RawValue>,
    thought: Option<bool>,
    #[serde(rename = "functionCall", borrow)]
    function_call: Option<Call<'a>>,
}

#[derive(serde::Deserialize)]
struct Call<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(borrow)]
    args: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
struct Failure<'a> {
    #[serde(borrow)]
    message: Option<Cow<'a, str>>,
    #[serde(borrow)]
    status: Option<Cow<'a, str>>,
}

impl StreamTranslator {
    /// A translator for one stream of `model`.
    pub fn new(include_usage: bool, model: &str, created: u64) -> Self {
        Self {
            include_usage,
            created,
            model: model.to_owned(),
            id: format!("chatcmpl-gemini-{created}"),
            ..Self::default()
        }
    }

    fn set_prefix(&mut self) {
        let mut prefix = b"data: {\"id\":".to_vec();
        let _ = serde_json::to_writer(&mut prefix, &self.id);
        prefix.extend_from_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
        prefix.extend_from_slice(crate::stream::decimal(self.created, &mut [0; 20]));
        prefix.extend_from_slice(b",\"model\":");
        let _ = serde_json::to_writer(&mut prefix, &self.model);
        prefix.extend_from_slice(b",\"choices\":[");
        self.prefix = prefix;
    }

    /// A chunk whose delta is the pieces of `delta`, in order.
    fn chunk(&self, delta: &[&[u8]], finish: Option<&str>, out: &mut Vec<u8>) {
        super::write_chunk(&self.prefix, delta, finish, out);
    }

    /// Translates what `data` completes into `out`; an `error` event is an error.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
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
        let event: Event<'_> = serde_json::from_slice(payload.trim_ascii())
            .map_err(|e| format!("the upstream sent an event that is not JSON: {e}"))?;
        if let Some(error) = &event.error {
            return Err(format!(
                "the upstream failed mid-stream: {} ({})",
                error.message.as_deref().unwrap_or("no message"),
                error.status.as_deref().unwrap_or("error"),
            ));
        }
        let mut renamed = self.prefix.is_empty();
        if let Some(id) = &event.response_id
            && self.id.strip_prefix("chatcmpl-") != Some(id)
        {
            self.id = format!("chatcmpl-{id}");
            renamed = true;
        }
        if let Some(version) = &event.model_version
            && self.model != *version
        {
            version.as_ref().clone_into(&mut self.model);
            renamed = true;
        }
        if renamed {
            self.set_prefix();
        }
        if !self.started {
            self.started = true;
            self.chunk(&[b"{\"role\":\"assistant\",\"content\":\"\"}"], None, out);
        }
        if let Some(usage) = event.usage_metadata {
            self.usage = usage;
        }
        let Some(candidate) = event.candidates.first() else {
            return Ok(());
        };
        let parts = candidate
            .content
            .as_ref()
            .map_or(&[][..], |c| c.parts.as_slice());
        let texts: Vec<&RawValue> = parts
            .iter()
            .filter(|p| p.thought != Some(true))
            .filter_map(|p| p.text)
            .filter(|t| t.get().starts_with('"') && t.get() != "\"\"")
            .collect();
        match texts.as_slice() {
            [] => {}
            [one] => self.chunk(&[b"{\"content\":", one.get().as_bytes(), b"}"], None, out),
            many => {
                let joined: String = many
                    .iter()
                    .filter_map(|t| serde_json::from_str::<Cow<'_, str>>(t.get()).ok())
                    .collect();
                let encoded = serde_json::to_vec(&joined).unwrap_or_default();
                self.chunk(&[b"{\"content\":", &encoded, b"}"], None, out);
            }
        }
        let mut calls = Vec::new();
        for call in parts.iter().filter_map(|p| p.function_call.as_ref()) {
            let index = self.calls;
            self.calls += 1;
            calls.push(json!({
                "index": index,
                "id": call.id.as_deref().map_or_else(|| format!("call_{index}"), str::to_owned),
                "type": "function",
                "function": {"name": call.name, "arguments": call.args.map_or("{}", RawValue::get)},
            }));
        }
        if !calls.is_empty() {
            let calls = serde_json::to_vec(&calls).unwrap_or_default();
            self.chunk(&[b"{\"tool_calls\":", &calls, b"}"], None, out);
        }
        if let Some(reason) = candidate.finish_reason.as_deref() {
            self.finished = true;
            self.chunk(&[b"{}"], Some(finish_reason(reason, self.calls > 0)), out);
        }
        Ok(())
    }

    /// The stream has ended: an error unless a `finishReason` came.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), String> {
        if let Some(rest) = self.lines.rest() {
            self.line(&rest, out)?;
        }
        if !self.finished {
            return Err("the upstream's stream ended before a finishReason".into());
        }
        if self.include_usage {
            out.extend_from_slice(&self.prefix);
            out.extend_from_slice(b"],\"usage\":");
            let _ = serde_json::to_writer(&mut *out, &self.usage.openai());
            out.extend_from_slice(b"}\n\n");
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESPONSE: &str =
        include_str!("../../../tests/fixtures/gemini/response_function_call.json");
    const STREAM: &str = include_str!("../../../tests/fixtures/gemini/stream.sse");
    const QUOTA: &str = include_str!("../../../tests/fixtures/gemini/error_quota.json");

    #[test]
    fn a_chat_request_becomes_a_generate_content_request() {
        let chat = json!({
            "model": "gemini-2.5-flash",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Paint"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "paint", "arguments": "{\"color\":\"red\"}"}}]},
                {"role": "tool", "tool_call_id": "call_9", "content": "{\"ok\":true}"},
                {"role": "tool", "tool_call_id": "call_9", "content": "done"},
            ],
            "max_tokens": 64, "temperature": 0.5, "top_p": 0.8, "stop": ["X"], "seed": 1, "user": "u",
            "tools": [{"type": "function", "function": {"name": "paint", "description": "Paints", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "paint"}},
            "stream": true, "stream_options": {"include_usage": true},
        });
        let translated = request(chat.to_string().as_bytes()).unwrap();
        assert_eq!(
            translated.path,
            "/v1/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
        assert!(translated.stream && translated.include_usage);
        let body: Value = serde_json::from_slice(&translated.body).unwrap();
        assert_eq!(
            body,
            json!({
                "contents": [
                    {"role": "user", "parts": [{"text": "Paint"}, {"inlineData": {"mimeType": "image/png", "data": "AAAA"}}]},
                    {"role": "model", "parts": [{"functionCall": {"name": "paint", "args": {"color": "red"}}}]},
                    {"role": "user", "parts": [
                        {"functionResponse": {"name": "paint", "response": {"ok": true}}},
                        {"functionResponse": {"name": "paint", "response": {"content": "done"}}},
                    ]},
                ],
                "systemInstruction": {"parts": [{"text": "Be brief."}]},
                "generationConfig": {"maxOutputTokens": 64, "temperature": 0.5, "topP": 0.8, "stopSequences": ["X"]},
                "tools": [{"functionDeclarations": [{"name": "paint", "description": "Paints", "parameters": {"type": "object"}}]}],
                "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["paint"]}},
            })
        );
        let plain = request(br#"{"model":"gemini-2.5-pro","messages":[]}"#).unwrap();
        assert_eq!(plain.path, "/v1/models/gemini-2.5-pro:generateContent");
        for (body, names) in [
            (json!({"model": "../x", "messages": []}), "`model`"),
            (json!({"model": "g", "n": 2, "messages": []}), "`n`"),
            (
                json!({"model": "g", "messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}),
                "tool_call_id",
            ),
        ] {
            let err = request(body.to_string().as_bytes()).unwrap_err();
            assert!(err.contains(names), "{err}");
        }
    }

    #[test]
    fn an_answer_becomes_a_chat_completion_counting_thoughts_as_completion() {
        let out: Value =
            serde_json::from_slice(&response(RESPONSE.as_bytes(), "gemini", 5).unwrap()).unwrap();
        let message = &out["choices"][0]["message"];
        assert_eq!(
            message["content"], "Checking the weather.",
            "thoughts dropped"
        );
        assert_eq!(message["tool_calls"][0]["id"], "call_0");
        assert_eq!(message["tool_calls"][1]["id"], "call_1");
        assert!(message["tool_calls"][0].get("index").is_none());
        assert_eq!(out["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(out["model"], "gemini-2.5-flash");
        assert_eq!(out["id"], "chatcmpl-resp-abc");
        // candidatesTokenCount excludes thinking: 30 + 40.
        assert_eq!(out["usage"]["completion_tokens"], 70);
        assert_eq!(out["usage"]["prompt_tokens"], 120);
        assert_eq!(out["usage"]["prompt_tokens_details"]["cached_tokens"], 64);
        assert_eq!(
            out["usage"]["completion_tokens_details"]["reasoning_tokens"],
            40
        );
        assert_eq!(finish_reason("MAX_TOKENS", false), "length");
        assert_eq!(finish_reason("SAFETY", false), "content_filter");
        assert_eq!(finish_reason("STOP", false), "stop");
        let error: Value =
            serde_json::from_slice(&super::error(QUOTA.as_bytes()).unwrap()).unwrap();
        assert_eq!(error["error"]["type"], "RESOURCE_EXHAUSTED");
    }

    fn run(stream: &str, split: Option<usize>) -> (String, Result<(), String>) {
        let mut translator = StreamTranslator::new(true, "gemini", 3);
        let mut out = Vec::new();
        let bytes = stream.as_bytes();
        let pieces: Vec<&[u8]> = match split {
            Some(at) => vec![&bytes[..at], &bytes[at..]],
            None => vec![bytes],
        };
        for piece in pieces {
            if let Err(err) = translator.feed(piece, &mut out) {
                return (String::from_utf8(out).unwrap(), Err(err));
            }
        }
        let end = translator.finish(&mut out);
        (String::from_utf8(out).unwrap(), end)
    }

    #[test]
    fn a_stream_translates_the_same_at_every_split_and_fails_loudly() {
        let (whole, end) = run(STREAM, None);
        end.unwrap();
        assert!(whole.ends_with("data: [DONE]\n\n"));
        assert!(whole.contains("\"content\":\"The sky — ☀️ is\""));
        assert!(whole.contains("\"finish_reason\":\"tool_calls\""));
        let call = whole
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .find_map(|e| e["choices"][0]["delta"]["tool_calls"].get(0).cloned())
            .unwrap();
        assert_eq!(
            (
                &call["index"],
                &call["id"],
                &call["type"],
                &call["function"]["name"]
            ),
            (
                &json!(0),
                &json!("call_0"),
                &json!("function"),
                &json!("paint")
            )
        );
        let arguments: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(arguments, json!({"color": "blue"}));
        assert!(
            whole.contains("\"completion_tokens\":22"),
            "12 + 10 thoughts: {whole}"
        );
        for split in 1..STREAM.len() {
            assert_eq!(run(STREAM, Some(split)).0, whole, "split at {split}");
        }
        // Cut before the finishReason: never complete.
        let cut = STREAM
            .find("data: {\"candidates\": [{\"content\": {\"parts\": [{\"functionCall\"")
            .unwrap();
        let (out, end) = run(&STREAM[..cut], None);
        assert!(end.unwrap_err().contains("finishReason"));
        assert!(!out.contains("[DONE]"));
        let (_, end) = run(
            "data: {\"error\": {\"code\": 503, \"message\": \"overloaded\", \"status\": \"UNAVAILABLE\"}}\n\n",
            None,
        );
        assert!(end.unwrap_err().contains("overloaded"));
    }
}
