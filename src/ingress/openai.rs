//! The OpenAI API as clients speak it: what routing needs to read from a
//! request (its `model`), the one edit it makes (renaming that model, every
//! other byte kept), and `GET /v1/models` for the routed names.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, header};
use serde_json::value::RawValue;

use crate::error::ProxyError;

/// Whether the request says its body is JSON.
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
}

/// Only the top-level `model`, borrowed raw so its position in the body is known.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
}

/// The requested model and the byte range of its JSON string in `body`;
/// `None` when the body has no `model`.
pub fn requested_model(
    body: &[u8],
) -> Result<Option<(String, std::ops::Range<usize>)>, ProxyError> {
    let head: Head<'_> = serde_json::from_slice(body)
        .map_err(|e| ProxyError::BadRequest(format!("the request body is not valid JSON: {e}")))?;
    let Some(raw) = head.model else {
        return Ok(None);
    };
    let model: String = serde_json::from_str(raw.get())
        .map_err(|_| ProxyError::BadRequest("`model` must be a string".into()))?;
    // `raw` borrows from `body`: its offset is where the value starts.
    let start = (raw.get().as_ptr() as usize).saturating_sub(body.as_ptr() as usize);
    Ok(Some((model, start..start + raw.get().len())))
}

/// Who the request says sent it: `user` (Chat Completions, Responses) or
/// `metadata.user_id` (Messages); `None` when it says neither.
pub fn user(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Metadata {
        user_id: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Wire {
        user: Option<String>,
        metadata: Option<Metadata>,
    }
    let wire: Wire = serde_json::from_slice(body).ok()?;
    wire.user
        .or_else(|| wire.metadata.and_then(|m| m.user_id))
        .filter(|user| !user.is_empty())
}

/// What accounting reads from a request body: the model, whether it
/// streams, and the most it may generate (for the token-limit estimate).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// `model`.
    pub model: Option<String>,
    /// `stream: true`.
    pub stream: bool,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u64>,
}

/// Reads [`Facts`] from a JSON request body; a body that is not a JSON
/// object has none (the upstream will say what is wrong with it).
pub fn facts(body: &[u8]) -> Facts {
    #[derive(serde::Deserialize)]
    struct Wire {
        #[serde(default)]
        model: Option<serde_json::Value>,
        #[serde(default)]
        stream: Option<serde_json::Value>,
        #[serde(default)]
        max_tokens: Option<serde_json::Value>,
        #[serde(default)]
        max_completion_tokens: Option<serde_json::Value>,
    }
    let Ok(wire) = serde_json::from_slice::<Wire>(body) else {
        return Facts::default();
    };
    Facts {
        model: wire.model.and_then(|m| m.as_str().map(str::to_owned)),
        stream: wire.stream.and_then(|s| s.as_bool()).unwrap_or(false),
        max_tokens: wire
            .max_completion_tokens
            .and_then(|n| n.as_u64())
            .or_else(|| wire.max_tokens.and_then(|n| n.as_u64())),
    }
}

/// The body with `stream_options.include_usage` set to `true`, for a
/// streamed request that did not ask for usage; `None` when it already
/// asked (or is not a JSON object). Every other byte is kept.
pub fn with_usage_requested(body: &Bytes) -> Option<Bytes> {
    #[derive(serde::Deserialize)]
    struct Options<'a> {
        #[serde(borrow, default)]
        stream_options: Option<&'a RawValue>,
    }
    let options: Options<'_> = serde_json::from_slice(body).ok()?;
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[start] != b'{' {
        return None;
    }
    match options.stream_options {
        None => {
            let rest = &body[start + 1..];
            let empty = rest.iter().all(|b| b.is_ascii_whitespace() || *b == b'}');
            let mut out = Vec::with_capacity(body.len() + 40);
            out.extend_from_slice(&body[..=start]);
            out.extend_from_slice(br#""stream_options":{"include_usage":true}"#);
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(rest);
            Some(Bytes::from(out))
        }
        Some(raw) => {
            let mut map: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(raw.get()).unwrap_or_default();
            if map
                .get("include_usage")
                .and_then(serde_json::Value::as_bool)
                == Some(true)
            {
                return None;
            }
            map.insert("include_usage".into(), serde_json::Value::Bool(true));
            let at = (raw.get().as_ptr() as usize).saturating_sub(body.as_ptr() as usize);
            let replaced = serde_json::Value::Object(map).to_string();
            let mut out = Vec::with_capacity(body.len() + replaced.len());
            out.extend_from_slice(&body[..at]);
            out.extend_from_slice(replaced.as_bytes());
            out.extend_from_slice(&body[at + raw.get().len()..]);
            Some(Bytes::from(out))
        }
    }
}

/// `body` with the `model` value at `span` replaced by `name`, byte for byte otherwise.
pub fn rename_model(body: &Bytes, span: std::ops::Range<usize>, name: &str) -> Bytes {
    let quoted = serde_json::Value::from(name).to_string();
    let mut out = Vec::with_capacity(body.len() + quoted.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(&body[span.end..]);
    Bytes::from(out)
}

/// `GET /v1/models` when routing: the configured public names, in the OpenAI list shape.
pub fn list_models<'a>(names: impl Iterator<Item = &'a str>) -> Response {
    let data: Vec<serde_json::Value> = names
        .map(|id| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "llmproxy"}))
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_is_found_and_renamed_without_touching_other_bytes() {
        let body = Bytes::from_static(
            br#"{ "messages" : [{"role":"user","content":"model: \"x\""}], "model":"gpt-4o" ,"n":1}"#,
        );
        let (model, span) = requested_model(&body).unwrap().unwrap();
        assert_eq!(model, "gpt-4o");
        assert_eq!(&body[span.clone()], br#""gpt-4o""#);
        let renamed = rename_model(&body, span, "gpt-4o-2024-08-06");
        assert_eq!(
            &renamed[..],
            br#"{ "messages" : [{"role":"user","content":"model: \"x\""}], "model":"gpt-4o-2024-08-06" ,"n":1}"#
        );
    }

    #[test]
    fn the_user_is_read_from_chat_responses_and_messages_bodies() {
        assert_eq!(
            user(br#"{"model":"m","user":"alice"}"#).as_deref(),
            Some("alice")
        );
        assert_eq!(
            user(br#"{"metadata":{"user_id":"bob"},"messages":[]}"#).as_deref(),
            Some("bob")
        );
        assert_eq!(user(br#"{"metadata":{"team":"x"}}"#), None);
        assert_eq!(user(br#"{"user":""}"#), None);
        assert_eq!(user(b"not json"), None);
    }

    #[test]
    fn facts_read_model_stream_and_the_token_cap() {
        let facts =
            facts(br#"{"model":"m","stream":true,"max_tokens":10,"max_completion_tokens":20}"#);
        assert_eq!(
            facts,
            Facts {
                model: Some("m".into()),
                stream: true,
                max_tokens: Some(20)
            }
        );
        assert_eq!(super::facts(b"[1]"), Facts::default());
    }

    #[test]
    fn usage_is_requested_without_touching_other_bytes() {
        let body = Bytes::from_static(br#"{"model":"m","stream":true}"#);
        assert_eq!(
            &with_usage_requested(&body).unwrap()[..],
            br#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#
        );
        let body =
            Bytes::from_static(br#"{"stream":true,"stream_options":{"include_usage":false}}"#);
        assert_eq!(
            &with_usage_requested(&body).unwrap()[..],
            br#"{"stream":true,"stream_options":{"include_usage":true}}"#
        );
        let asked = Bytes::from_static(br#"{"stream_options":{"include_usage":true}}"#);
        assert!(with_usage_requested(&asked).is_none());
        assert_eq!(
            &with_usage_requested(&Bytes::from_static(b" {}")).unwrap()[..],
            br#" {"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn bodies_without_a_string_model_are_named_problems() {
        assert!(requested_model(br#"{"input":"x"}"#).unwrap().is_none());
        let err = requested_model(br#"{"model": 5}"#).unwrap_err().to_string();
        assert!(err.contains("`model` must be a string"), "{err}");
        let err = requested_model(br#"{"model": "a""#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }
}
