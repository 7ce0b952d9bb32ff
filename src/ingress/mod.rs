//! The API dialects clients speak to llmproxy. Today: OpenAI's.

pub mod openai;
