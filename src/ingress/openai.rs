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
    fn facts_read_model_stream_and_the_token_cap() {
        let facts = facts(br#"{"model":"m","stream":true,"max_tokens":10,"max_completion_tokens":20}"#);
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
