//! Everything about talking to an upstream: its base URL, the pooled client
//! and the mapping of its failures.

pub mod attempt;
mod base_url;
mod client;

pub use base_url::BaseUrl;
pub use client::{RequestBody, UpstreamClient, classify, client};
