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

use std::borrow::Cow;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Value, json};

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

/// A content block of the translated request: a text block whose string
/// is the client's own JSON token (the common case, copied), or any other
/// block, built.
enum Block<'a> {
    Text(&'a RawValue),
    /// A value copied as it is (a tool's schema).
    Raw(&'a RawValue),
    Built(Value),
}

impl serde::Serialize for Block<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Self::Text(text) => {
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry("type", "text")?;
                map.serialize_entry("text", text)?;
                map.end()
            }
            Self::Raw(value) => value.serialize(serializer),
            Self::Built(value) => value.serialize(serializer),
        }
    }
}

#[derive(serde::Serialize)]
struct Turn<'a> {
    role: &'static str,
    content: Vec<Block<'a>>,
}

/// Appends `blocks` as a turn of `role`, merged into the last turn when it
/// has the same role: Anthropic wants the roles to alternate.
fn push<'a>(turns: &mut Vec<Turn<'a>>, role: &'static str, mut blocks: Vec<Block<'a>>) {
    if blocks.is_empty() {
        return;
    }
    match turns.last_mut() {
        Some(last) if last.role == role => last.content.append(&mut blocks),
        _ => turns.push(Turn {
            role,
            content: blocks,
        }),
    }
}

/// The fields the translation reads, borrowed from the request: values
/// that pass unchanged stay the client's own JSON text.
#[derive(serde::Deserialize)]
struct Chat<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Vec<ChatMessage<'a>>,
    #[serde(borrow)]
    n: Option<&'a RawValue>,
    #[serde(borrow)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow)]
    stop: Option<&'a RawValue>,
    #[serde(borrow)]
    temperature: Option<&'a RawValue>,
    #[serde(borrow)]
    top_p: Option<&'a RawValue>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow)]
    user: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    tool_choice: Option<&'a RawValue>,
    #[serde(borrow)]
    parallel_tool_calls: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
struct ChatMessage<'a> {
    #[serde(borrow)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow)]
    content: Option<&'a RawValue>,
    #[serde(borrow)]
    tool_calls: Option<&'a RawValue>,
    #[serde(borrow)]
    tool_call_id: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
struct Tool<'a> {
    #[serde(borrow)]
    function: Function<'a>,
}

#[derive(serde::Deserialize)]
struct Function<'a> {
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(borrow)]
    description: Option<&'a RawValue>,
    #[serde(borrow)]
    parameters: Option<&'a RawValue>,
}

#[derive(serde::Serialize)]
struct AnthropicTool<'a> {
    name: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a RawValue>,
    input_schema: Block<'a>,
}

/// The Messages request: fields in Anthropic's names.
#[derive(serde::Serialize)]
struct Messages<'a> {
    model: Option<&'a RawValue>,
    max_tokens: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    system: Vec<Block<'a>>,
    messages: Vec<Turn<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_sequences: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<Vec<AnthropicTool<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
}

/// A value that is present and not `null`.
fn given(value: Option<&RawValue>) -> Option<&RawValue> {
    value.filter(|v| v.get() != "null")
}

fn number_in(value: Option<&RawValue>) -> Option<u64> {
    value.and_then(|v| v.get().parse().ok())
}

/// A raw value decoded, for the rarer fields handled as trees.
fn tree(value: &RawValue, at: &str) -> Result<Value, Refusal> {
    serde_json::from_str(value.get()).map_err(|e| format!("{at} cannot be read: {e}"))
}

/// A message's `content` as blocks: a string is copied as its token.
fn content_blocks(content: Option<&RawValue>, i: usize) -> Result<Vec<Block<'_>>, Refusal> {
    let at = || format!("messages[{i}]");
    match given(content) {
        None => Ok(Vec::new()),
        Some(text) if text.get() == "\"\"" => Ok(Vec::new()),
        Some(text) if text.get().starts_with('"') => Ok(vec![Block::Text(text)]),
        Some(parts) => Ok(blocks(&tree(parts, &format!("{}.content", at()))?, &at())?
            .into_iter()
            .map(Block::Built)
            .collect()),
    }
}

/// The Messages request for an OpenAI chat completion request `body`.
pub fn request(settings: &AnthropicSettings, body: &[u8]) -> Result<Translated, Refusal> {
    let chat: Chat<'_> = serde_json::from_slice(body)
        .map_err(|e| format!("the request body is not a chat completion request: {e}"))?;
    if number_in(chat.n).is_some_and(|n| n > 1) {
        return Err("`n` above 1 cannot be served by an Anthropic upstream".into());
    }
    let mut system = Vec::new();
    let mut messages: Vec<Turn<'_>> = Vec::new();
    // Only a refusal needs the message's name.
    let at = |i: usize| format!("messages[{i}]");
    for (i, message) in chat.messages.iter().enumerate() {
        match message.role.as_deref() {
            Some("system" | "developer") => match given(message.content) {
                Some(text) if text.get() == "\"\"" => {}
                Some(text) if text.get().starts_with('"') => system.push(Block::Text(text)),
                Some(parts) => {
                    let at = at(i);
                    if let Some(text) = text_of(&tree(parts, &format!("{at}.content"))?)
                        && !text.is_empty()
                    {
                        system.push(Block::Built(json!({"type": "text", "text": text})));
                    }
                }
                None => {}
            },
            Some("user") => push(&mut messages, "user", content_blocks(message.content, i)?),
            Some("assistant") => {
                let mut content = content_blocks(message.content, i)?;
                if let Some(calls) = given(message.tool_calls) {
                    let at = at(i);
                    let calls = tree(calls, &format!("{at}.tool_calls"))?;
                    for (j, call) in calls
                        .as_array()
                        .map_or(&[][..], Vec::as_slice)
                        .iter()
                        .enumerate()
                    {
                        let input = super::call_arguments(call, &at, j)?;
                        content.push(Block::Built(json!({
                            "type": "tool_use",
                            "id": call["id"],
                            "name": call["function"]["name"],
                            "input": input,
                        })));
                    }
                }
                push(&mut messages, "assistant", content);
            }
            Some("tool") => {
                let at = at(i);
                let content = match given(message.content) {
                    Some(content) => text_of(&tree(content, &format!("{at}.content"))?),
                    None => None,
                };
                let id = match message.tool_call_id {
                    Some(id) => tree(id, &format!("{at}.tool_call_id"))?,
                    None => Value::Null,
                };
                let result = json!({
                    "type": "tool_result",
                    "tool_use_id": id,
                    "content": content.unwrap_or_default(),
                });
                push(&mut messages, "user", vec![Block::Built(result)]);
            }
            other => return Err(format!("{}.role {other:?} is not a chat role", at(i))),
        }
    }
    let tools = match given(chat.tools) {
        None => None,
        Some(tools) => {
            let tools: Vec<Tool<'_>> = serde_json::from_str(tools.get())
                .map_err(|e| format!("`tools` must be a list of function tools: {e}"))?;
            Some(
                tools
                    .into_iter()
                    .map(|tool| AnthropicTool {
                        name: tool.function.name,
                        description: given(tool.function.description)
                            .filter(|d| d.get().starts_with('"')),
                        input_schema: match given(tool.function.parameters) {
                            Some(schema) if schema.get().starts_with('{') => Block::Raw(schema),
                            _ => Block::Built(json!({"type": "object"})),
                        },
                    })
                    .collect::<Vec<_>>(),
            )
        }
    };
    let mut choice = match given(chat.tool_choice)
        .map(|c| tree(c, "`tool_choice`"))
        .transpose()?
    {
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
    if chat.parallel_tool_calls.is_some_and(|p| p.get() == "false") && tools.is_some() {
        let choice = choice.get_or_insert_with(|| json!({"type": "auto"}));
        choice["disable_parallel_tool_use"] = true.into();
    }
    let stop = given(chat.stop).map(|s| tree(s, "`stop`")).transpose()?;
    let stream = chat.stream.is_some_and(|s| s.get() == "true");
    let include_usage = given(chat.stream_options).is_some_and(|options| {
        #[derive(serde::Deserialize)]
        struct Options {
            include_usage: Option<bool>,
        }
        serde_json::from_str::<Options>(options.get())
            .ok()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    });
    let out = Messages {
        model: chat.model,
        max_tokens: number_in(chat.max_completion_tokens)
            .or_else(|| number_in(chat.max_tokens))
            .unwrap_or(settings.default_max_tokens),
        system,
        messages,
        stop_sequences: super::stop_list(stop.as_ref()),
        temperature: given(chat.temperature),
        top_p: given(chat.top_p),
        stream,
        metadata: chat
            .user
            .filter(|u| u.get().starts_with('"'))
            .map(|user| json!({"user_id": user})),
        tools,
        tool_choice: choice,
    };
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

/// Anthropic's usage counts; absent ones are 0.
#[derive(Debug, Default, Clone, Copy, serde::Deserialize)]
#[serde(default)]
pub struct Usage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

impl Usage {
    /// Counts a later report adds (`message_delta` after `message_start`):
    /// a field it carries replaces the earlier one.
    fn update(&mut self, later: Self) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_read_input_tokens = later
            .cache_read_input_tokens
            .or(self.cache_read_input_tokens);
        self.cache_creation_input_tokens = later
            .cache_creation_input_tokens
            .or(self.cache_creation_input_tokens);
    }

    /// OpenAI usage: `prompt_tokens` includes what Anthropic counts apart
    /// (cache reads and writes).
    fn write_openai(&self, out: &mut Vec<u8>) {
        let cached = self.cache_read_input_tokens.unwrap_or(0);
        let prompt = self
            .input_tokens
            .unwrap_or(0)
            .saturating_add(cached)
            .saturating_add(self.cache_creation_input_tokens.unwrap_or(0));
        let completion = self.output_tokens.unwrap_or(0);
        out.extend_from_slice(b"{\"prompt_tokens\":");
        number(prompt, out);
        out.extend_from_slice(b",\"completion_tokens\":");
        number(completion, out);
        out.extend_from_slice(b",\"total_tokens\":");
        number(prompt.saturating_add(completion), out);
        out.extend_from_slice(b",\"prompt_tokens_details\":{\"cached_tokens\":");
        number(cached, out);
        out.extend_from_slice(b"}}");
    }
}

fn number(n: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(crate::stream::decimal(n, &mut [0; 20]));
}

/// A JSON value as it was in the upstream's bytes (`null` when absent).
fn raw(value: Option<&RawValue>) -> &[u8] {
    value.map_or(b"null", |v| v.get().as_bytes())
}

/// The `chat.completion` for a Messages answer, or `None` when it is not
/// one. Parsed into borrowed pieces and written directly: strings the
/// answer keeps (text, ids, the model) are copied as the upstream encoded
/// them, never decoded and re-encoded.
pub fn response(body: &[u8], created: u64) -> Option<Bytes> {
    #[derive(serde::Deserialize)]
    struct Message<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
        #[serde(borrow)]
        id: Option<&'a RawValue>,
        #[serde(borrow)]
        model: Option<&'a RawValue>,
        #[serde(borrow)]
        content: Vec<Block<'a>>,
        #[serde(borrow)]
        stop_reason: Option<Cow<'a, str>>,
        #[serde(default)]
        usage: Usage,
    }
    #[derive(serde::Deserialize)]
    struct Block<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
        #[serde(borrow)]
        text: Option<&'a RawValue>,
        #[serde(borrow)]
        id: Option<&'a RawValue>,
        #[serde(borrow)]
        name: Option<&'a RawValue>,
        #[serde(borrow)]
        input: Option<&'a RawValue>,
    }
    let message: Message<'_> = serde_json::from_slice(body).ok()?;
    if message.kind != "message" {
        return None;
    }
    let texts: Vec<&RawValue> = message
        .content
        .iter()
        .filter(|b| b.kind == "text")
        .filter_map(|b| b.text)
        .collect();
    let calls = message.content.iter().filter(|b| b.kind == "tool_use");
    let mut out = Vec::with_capacity(body.len() + 256);
    out.extend_from_slice(b"{\"id\":");
    out.extend_from_slice(raw(message.id));
    out.extend_from_slice(b",\"object\":\"chat.completion\",\"created\":");
    number(created, &mut out);
    out.extend_from_slice(b",\"model\":");
    out.extend_from_slice(raw(message.model));
    out.extend_from_slice(
        b",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":",
    );
    match texts.as_slice() {
        [] if calls.clone().next().is_some() => out.extend_from_slice(b"null"),
        [] => out.extend_from_slice(b"\"\""),
        [one] => out.extend_from_slice(one.get().as_bytes()),
        many => {
            // Several text blocks (rare): decoded and joined.
            let joined: String = many
                .iter()
                .filter_map(|t| serde_json::from_str::<Cow<'_, str>>(t.get()).ok())
                .collect();
            serde_json::to_writer(&mut out, &joined).ok()?;
        }
    }
    let mut first = true;
    for call in calls {
        out.extend_from_slice(if first {
            b",\"tool_calls\":[{\"id\":"
        } else {
            b",{\"id\":"
        });
        first = false;
        out.extend_from_slice(raw(call.id));
        out.extend_from_slice(b",\"type\":\"function\",\"function\":{\"name\":");
        out.extend_from_slice(raw(call.name));
        out.extend_from_slice(b",\"arguments\":");
        // The input object, as a JSON string of itself.
        serde_json::to_writer(&mut out, call.input.map_or("{}", RawValue::get)).ok()?;
        out.extend_from_slice(b"}}");
    }
    if !first {
        out.push(b']');
    }
    out.extend_from_slice(b"},\"finish_reason\":\"");
    out.extend_from_slice(
        finish_reason(message.stop_reason.as_deref().unwrap_or("end_turn")).as_bytes(),
    );
    out.extend_from_slice(b"\"}],\"usage\":");
    message.usage.write_openai(&mut out);
    out.push(b'}');
    Some(Bytes::from(out))
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
/// Each event is parsed once into borrowed pieces, and what it carries
/// (text, arguments, ids) is copied as the upstream encoded it.
#[derive(Debug, Default)]
pub struct StreamTranslator {
    /// The client asked for the final usage chunk.
    include_usage: bool,
    created: u64,
    lines: crate::stream::lines::Lines,
    /// Anthropic content-block index → OpenAI tool-call index.
    tool_index: Vec<(u64, u64)>,
    next_tool: u64,
    usage: Usage,
    stopped: bool,
    /// `data: {"id":…,"object":…,"created":…,"model":…,"choices":[{"index":0,"delta":`,
    /// written once `message_start` names the message: each chunk is then
    /// this, its delta and a fixed tail.
    prefix: Vec<u8>,
}

/// One Anthropic stream event: the fields of every kind, borrowed.
#[derive(serde::Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    index: Option<u64>,
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
    #[serde(borrow)]
    message: Option<Started<'a>>,
    #[serde(borrow)]
    content_block: Option<Opened<'a>>,
    usage: Option<Usage>,
    #[serde(borrow)]
    error: Option<Failure<'a>>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    text: Option<&'a RawValue>,
    #[serde(borrow)]
    partial_json: Option<&'a RawValue>,
    #[serde(borrow)]
    stop_reason: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct Started<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    usage: Usage,
}

#[derive(serde::Deserialize)]
struct Opened<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(borrow)]
    text: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
struct Failure<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    message: Option<Cow<'a, str>>,
}

/// A delta event's payload: a JSON string token (quotes included).
enum Fast<'a> {
    Text(&'a [u8]),
    /// The content block's index and the partial JSON.
    Arguments(u64, &'a [u8]),
}

/// Nine events in ten are deltas, and Anthropic writes them in one shape
/// (`{"type":"content_block_delta","index":N,"delta":{"type":"text_delta","text":"…"}}`):
/// recognised by that shape, their string found by its closing quote, with
/// no JSON parse. Any other spelling (spaces, key order, more fields) is
/// `None` and takes the parser's path, which writes the same.
fn fast_delta(payload: &[u8]) -> Option<Fast<'_>> {
    let rest = payload.strip_prefix(b"{\"type\":\"content_block_delta\",\"index\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let (number, rest) = rest.split_at(digits);
    let index: u64 = std::str::from_utf8(number).ok()?.parse().ok()?;
    let rest = rest.strip_prefix(b",\"delta\":{\"type\":\"")?;
    let (text, rest) = if let Some(rest) = rest.strip_prefix(b"text_delta\",\"text\":") {
        (true, rest)
    } else {
        (
            false,
            rest.strip_prefix(b"input_json_delta\",\"partial_json\":")?,
        )
    };
    let end = string_end(rest)?;
    let (string, tail) = rest.split_at(end);
    if tail != b"}}" || std::str::from_utf8(string).is_err() {
        return None;
    }
    Some(if text {
        Fast::Text(string)
    } else {
        Fast::Arguments(index, string)
    })
}

/// The length of the JSON string token `bytes` starts with (its quotes
/// included), or `None` when it does not start with one or never ends.
fn string_end(bytes: &[u8]) -> Option<usize> {
    if bytes.first() != Some(&b'"') {
        return None;
    }
    let mut at = 1;
    loop {
        let found = at + memchr::memchr2(b'"', b'\\', bytes.get(at..)?)?;
        if bytes.get(found) == Some(&b'"') {
            return Some(found + 1);
        }
        // An escape: the next byte is part of it, whatever it is.
        at = found + 2;
    }
}

impl StreamTranslator {
    /// A translator for one stream; `include_usage` adds the usage chunk.
    pub fn new(include_usage: bool, created: u64) -> Self {
        Self {
            include_usage,
            created,
            ..Self::default()
        }
    }

    fn set_prefix(&mut self, id: Option<&RawValue>, model: Option<&RawValue>) {
        let mut prefix = b"data: {\"id\":".to_vec();
        prefix.extend_from_slice(raw(id));
        prefix.extend_from_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
        number(self.created, &mut prefix);
        prefix.extend_from_slice(b",\"model\":");
        prefix.extend_from_slice(raw(model));
        prefix.extend_from_slice(b",\"choices\":[");
        self.prefix = prefix;
    }

    /// A chunk whose delta is `parts` (pieces of one JSON object, written
    /// in order) and whose `finish_reason` is `finish`.
    fn chunk(&mut self, parts: &[&[u8]], finish: Option<&str>, out: &mut Vec<u8>) {
        if self.prefix.is_empty() {
            self.set_prefix(None, None);
        }
        super::write_chunk(&self.prefix, parts, finish, out);
    }

    fn tool(&self, block: u64) -> u64 {
        self.tool_index
            .iter()
            .find(|(b, _)| *b == block)
            .map_or(0, |(_, i)| *i)
    }

    /// A text or tool-argument delta: its JSON string copied as it came.
    fn delta(&mut self, delta: Fast<'_>, out: &mut Vec<u8>) {
        match delta {
            Fast::Text(text) => self.chunk(&[b"{\"content\":", text, b"}"], None, out),
            Fast::Arguments(block, partial) => {
                let mut digits = [0; 20];
                let index = crate::stream::decimal(self.tool(block), &mut digits);
                self.chunk(
                    &[
                        b"{\"tool_calls\":[{\"index\":",
                        index,
                        b",\"function\":{\"arguments\":",
                        partial,
                        b"}}]}",
                    ],
                    None,
                    out,
                );
            }
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
        if let Some(delta) = fast_delta(payload) {
            self.delta(delta, out);
            return Ok(());
        }
        let event: Event<'_> = serde_json::from_slice(payload)
            .map_err(|e| format!("the upstream sent an event that is not JSON: {e}"))?;
        match &*event.kind {
            "content_block_delta" => {
                let Some(delta) = event.delta else {
                    return Ok(());
                };
                let index = event.index.unwrap_or(0);
                match (delta.kind.as_deref(), delta.text, delta.partial_json) {
                    (Some("text_delta"), Some(text), _) => {
                        self.delta(Fast::Text(text.get().as_bytes()), out);
                    }
                    (Some("input_json_delta"), _, Some(partial)) => {
                        self.delta(Fast::Arguments(index, partial.get().as_bytes()), out);
                    }
                    // thinking and signature deltas have no Chat counterpart
                    _ => {}
                }
            }
            "message_start" => {
                let started = event.message;
                let (id, model) = started.as_ref().map_or((None, None), |m| (m.id, m.model));
                self.set_prefix(id, model);
                if let Some(started) = started {
                    self.usage.update(started.usage);
                }
                self.chunk(&[b"{\"role\":\"assistant\",\"content\":\"\"}"], None, out);
            }
            "content_block_start" => {
                let Some(block) = event.content_block else {
                    return Ok(());
                };
                if block.kind == "tool_use" {
                    let index = self.next_tool;
                    self.next_tool += 1;
                    self.tool_index.push((event.index.unwrap_or(0), index));
                    let index = crate::stream::decimal(index, &mut [0; 20]).to_vec();
                    self.chunk(
                        &[
                            b"{\"tool_calls\":[{\"index\":",
                            &index,
                            b",\"id\":",
                            raw(block.id),
                            b",\"type\":\"function\",\"function\":{\"name\":",
                            raw(block.name),
                            b",\"arguments\":\"\"}}]}",
                        ],
                        None,
                        out,
                    );
                } else if block.kind == "text"
                    && let Some(text) = block.text.filter(|t| t.get() != "\"\"")
                {
                    self.chunk(&[b"{\"content\":", text.get().as_bytes(), b"}"], None, out);
                }
            }
            "message_delta" => {
                if let Some(usage) = event.usage {
                    self.usage.update(usage);
                }
                let reason = event
                    .delta
                    .as_ref()
                    .and_then(|d| d.stop_reason.as_deref())
                    .unwrap_or("end_turn");
                self.chunk(&[b"{}"], Some(finish_reason(reason)), out);
            }
            "message_stop" => {
                if self.include_usage {
                    if self.prefix.is_empty() {
                        self.set_prefix(None, None);
                    }
                    out.extend_from_slice(&self.prefix);
                    out.extend_from_slice(b"],\"usage\":");
                    self.usage.write_openai(out);
                    out.extend_from_slice(b"}\n\n");
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                self.stopped = true;
            }
            "error" => {
                let error = event.error;
                return Err(format!(
                    "the upstream failed mid-stream: {} ({})",
                    error
                        .as_ref()
                        .and_then(|e| e.message.as_deref())
                        .unwrap_or("no message"),
                    error
                        .as_ref()
                        .and_then(|e| e.kind.as_deref())
                        .unwrap_or("error"),
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
    fn the_delta_shortcut_writes_what_the_parser_writes() {
        let start = "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude\",\"usage\":{\"input_tokens\":3}}}\n\n";
        let tool = "data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_9\",\"name\":\"f\",\"input\":{}}}\n\n";
        let compact = [
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Say \"hi\" \\ ☀️\n"}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\": 1}"}}"#,
        ];
        let spaced = [
            r#"{ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": "Say \"hi\" \\ ☀️\n" } }"#,
            r#"{"index":1,"type":"content_block_delta","delta":{"partial_json":"{\"a\": 1}","type":"input_json_delta"}}"#,
        ];
        assert!(
            compact
                .iter()
                .all(|event| fast_delta(event.as_bytes()).is_some())
        );
        assert!(
            spaced
                .iter()
                .all(|event| fast_delta(event.as_bytes()).is_none())
        );
        let translate = |events: [&str; 2]| {
            let mut translator = StreamTranslator::new(false, 1);
            let mut out = Vec::new();
            let text = format!(
                "{start}{tool}data: {}\n\ndata: {}\n\n",
                events[0], events[1]
            );
            translator.feed(text.as_bytes(), &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        let (fast, parsed) = (translate(compact), translate(spaced));
        assert_eq!(fast, parsed);
        let chunks = chunks(&fast);
        assert_eq!(
            chunks[2]["choices"][0]["delta"]["content"],
            "Say \"hi\" \\ ☀️\n"
        );
        assert_eq!(
            chunks[3]["choices"][0]["delta"]["tool_calls"][0],
            json!({"index": 0, "function": {"arguments": "{\"a\": 1}"}})
        );
        // Not the shape, or broken: the parser decides.
        for odd in [
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"},"more":1}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x}}"#,
            r#"{"type":"content_block_delta","index":,"delta":{"type":"text_delta","text":"x"}}"#,
        ] {
            assert!(fast_delta(odd.as_bytes()).is_none(), "{odd}");
        }
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
