//! The API dialects clients speak to llmproxy: OpenAI's, and Anthropic's
//! Messages API (translated to Chat Completions for OpenAI-compatible
//! upstreams).

pub mod anthropic;
pub mod openai;
