//! One Chat Completions stream chunk (`data: {...}`), parsed into borrowed
//! pieces for the translations that turn Chat streams into another API's
//! (Messages, Responses). Strings the client will see (text, arguments,
//! ids) stay the upstream's JSON tokens, copied out as they came: nothing
//! is decoded and re-encoded, and no JSON tree is built per chunk.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The fields of a chunk the translations read.
#[derive(Deserialize)]
pub struct Chunk<'a> {
    #[serde(borrow)]
    pub id: Option<&'a RawValue>,
    #[serde(borrow)]
    pub model: Option<&'a RawValue>,
    #[serde(borrow)]
    pub created: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub choices: Vec<Choice<'a>>,
    pub usage: Option<Usage>,
    #[serde(borrow)]
    pub error: Option<Failure<'a>>,
}

#[derive(Deserialize)]
pub struct Choice<'a> {
    #[serde(borrow)]
    pub delta: Option<Delta<'a>>,
    #[serde(borrow)]
    pub finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
pub struct Delta<'a> {
    #[serde(borrow)]
    pub content: Option<&'a RawValue>,
    #[serde(borrow)]
    pub tool_calls: Option<Vec<CallDelta<'a>>>,
}

#[derive(Deserialize)]
pub struct CallDelta<'a> {
    pub index: Option<u64>,
    #[serde(borrow)]
    pub id: Option<&'a RawValue>,
    #[serde(borrow)]
    pub function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
pub struct FunctionDelta<'a> {
    #[serde(borrow)]
    pub name: Option<&'a RawValue>,
    #[serde(borrow)]
    pub arguments: Option<&'a RawValue>,
}

/// Chat usage; absent counts are 0.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: Option<u64>,
    #[serde(default)]
    pub completion_tokens: Option<u64>,
    #[serde(default)]
    pub prompt_tokens_details: Option<Details>,
    #[serde(default)]
    pub completion_tokens_details: Option<Details>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub struct Details {
    #[serde(default)]
    pub cached_tokens: Option<u64>,
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
}

impl Usage {
    pub fn prompt(&self) -> u64 {
        self.prompt_tokens.unwrap_or(0)
    }

    pub fn completion(&self) -> u64 {
        self.completion_tokens.unwrap_or(0)
    }

    pub fn cached(&self) -> u64 {
        self.prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0)
    }

    pub fn reasoning(&self) -> u64 {
        self.completion_tokens_details
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0)
    }
}

#[derive(Deserialize)]
pub struct Failure<'a> {
    #[serde(borrow)]
    pub message: Option<Cow<'a, str>>,
}

impl<'a> Chunk<'a> {
    /// The `data:` payload parsed; an error names what is wrong with it.
    pub fn parse(payload: &'a [u8]) -> Result<Self, String> {
        serde_json::from_slice(payload)
            .map_err(|e| format!("the upstream sent a chunk that is not JSON: {e}"))
    }

    /// An in-band error: the stream failed.
    pub fn failure(&self) -> Option<String> {
        self.error.as_ref().map(|error| {
            format!(
                "the upstream failed mid-stream: {}",
                error.message.as_deref().unwrap_or("no message")
            )
        })
    }
}

/// A text token worth sending: a string, and not empty.
pub fn text(content: Option<&RawValue>) -> Option<&RawValue> {
    content.filter(|c| c.get().starts_with('"') && c.get() != "\"\"")
}

/// A JSON value as it came (`null` when absent).
pub fn raw(value: Option<&RawValue>) -> &[u8] {
    value.map_or(b"null", |v| v.get().as_bytes())
}
