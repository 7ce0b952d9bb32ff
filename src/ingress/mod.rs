//! The API dialects clients speak to llmproxy: OpenAI's (Chat Completions,
//! and the Responses API translated for deployments that lack it), and Anthropic's
//! Messages API (translated to Chat Completions for OpenAI-compatible
//! upstreams).

pub mod anthropic;
pub mod chunk;
pub mod openai;
pub mod responses;
