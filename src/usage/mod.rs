//! Usage accounting: the tokens of every answer, read from the upstream's
//! own `usage` as the body streams through, priced, charged to the key, and
//! written to the store in batches.
//!
//! - [`Meter`] watches an answer's body (the observed-body wrapper: frames
//!   pass through unchanged, the meter sees the same bytes). A JSON answer
//!   is kept (reference-counted chunks, no copy) up to [`MAX_JSON`] and its
//!   `usage` read at the end; an SSE stream is scanned line by line for the
//!   chunk that carries `usage`.
//! - When the answer ends, fails or the client leaves, the meter settles the
//!   key's token bucket, charges its budget and hands one record to the
//!   [`Writer`] — at once, so a disconnect is accounted within the writer's
//!   flush interval. Without the upstream's final usage the record is marked
//!   `estimated`: prompt tokens from the request's size, completion tokens
//!   one per streamed content chunk.
//! - The [`Writer`] batches records through a bounded channel into the
//!   store every second; on a graceful shutdown it drains the channel
//!   before the process exits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;

use crate::auth::Key;
use crate::config::Price;
use crate::limits::Slot;
use crate::store::{Store, UsageRecord, unix_ms};
use crate::stream::Observer;

pub mod sse;
pub mod strip;

/// Largest JSON answer kept to read its `usage` (longer ones are estimated).
pub const MAX_JSON: usize = 8 * 1024 * 1024;

/// Records waiting for the writer at most; past it, senders spill into an
/// overflow list rather than drop a record.
const CHANNEL: usize = 65_536;

/// Records per store transaction at most.
const BATCH: usize = 2_000;

/// Token counts, read from OpenAI's usage (`prompt_tokens`,
/// `completion_tokens`, `prompt_tokens_details.cached_tokens`) or
/// Anthropic's (`input_tokens`, which excludes the cache, plus
/// `cache_read_input_tokens` and `cache_creation_input_tokens`;
/// `output_tokens`), so Messages traffic passed through is billed right too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "RawUsage")]
pub struct Tokens {
    /// Input tokens, the cached ones included.
    pub prompt_tokens: u64,
    /// Output tokens.
    pub completion_tokens: u64,
    /// Input tokens served from the provider's cache.
    pub cached_tokens: u64,
}

#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    /// The Responses API's name for `prompt_tokens_details`.
    input_tokens_details: Option<Details>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

impl From<RawUsage> for Tokens {
    fn from(raw: RawUsage) -> Self {
        let read = raw.cache_read_input_tokens.unwrap_or(0);
        let anthropic_input = raw.input_tokens.map(|input| {
            input
                .saturating_add(read)
                .saturating_add(raw.cache_creation_input_tokens.unwrap_or(0))
        });
        Self {
            prompt_tokens: raw.prompt_tokens.or(anthropic_input).unwrap_or(0),
            completion_tokens: raw.completion_tokens.or(raw.output_tokens).unwrap_or(0),
            cached_tokens: raw
                .prompt_tokens_details
                .or(raw.input_tokens_details)
                .and_then(|d| d.cached_tokens)
                .unwrap_or(read),
        }
    }
}

impl Tokens {
    /// Field by field the larger: usage counts only grow during a stream
    /// (Anthropic reports input at the start, output at the end).
    pub fn merge(self, later: Self) -> Self {
        Self {
            prompt_tokens: self.prompt_tokens.max(later.prompt_tokens),
            completion_tokens: self.completion_tokens.max(later.completion_tokens),
            cached_tokens: self.cached_tokens.max(later.cached_tokens),
        }
    }
}

/// What an answer (or one streamed chunk) says about itself.
#[derive(Debug, Default, Deserialize)]
pub struct Answer {
    /// The model that served it.
    #[serde(default)]
    pub model: Option<String>,
    /// Its token counts, when present and not `null`.
    #[serde(default)]
    pub usage: Option<Tokens>,
}

/// Built once: building a searcher costs more than searching a chunk.
static USAGE_KEY_REV: std::sync::LazyLock<memchr::memmem::FinderRev<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::FinderRev::new(b"\"usage\""));
static MODEL_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"model\""));

impl Answer {
    /// The model and usage of a JSON answer or chunk, found without
    /// parsing the rest of it (the content can be most of the bytes): the
    /// last `"usage"` key's object and the first `"model"` key's string.
    /// Inside a JSON string every quote is escaped, so content cannot fake
    /// either key.
    pub fn scan(json: &[u8]) -> Self {
        Self {
            model: Self::model_in(json),
            usage: Self::usage_in(json),
        }
    }

    /// The last `"usage"` key's object, when it is one (not `null`).
    pub fn usage_in(json: &[u8]) -> Option<Tokens> {
        USAGE_KEY_REV
            .rfind(json)
            .and_then(|at| value_after_key(json, at + 7))
            .filter(|&start| json[start] == b'{')
            .and_then(|start| object_end(json, start).map(|end| &json[start..=end]))
            .and_then(|object| serde_json::from_slice::<Tokens>(object).ok())
    }

    /// The first `"model"` key's string.
    pub fn model_in(json: &[u8]) -> Option<String> {
        MODEL_KEY
            .find(json)
            .and_then(|at| value_after_key(json, at + 7))
            .filter(|&start| json[start] == b'"')
            .and_then(|start| {
                serde_json::Deserializer::from_slice(&json[start..])
                    .into_iter::<String>()
                    .next()?
                    .ok()
            })
    }
}

/// Where the value of a key whose closing quote is just before `after`
/// starts: past `:` and any whitespace.
fn value_after_key(json: &[u8], after: usize) -> Option<usize> {
    let rest = json.get(after..)?;
    let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    if rest[colon] != b':' {
        return None;
    }
    let value = colon
        + 1
        + rest[colon + 1..]
            .iter()
            .position(|b| !b.is_ascii_whitespace())?;
    Some(after + value)
}

/// Where the JSON object starting at `start` (a `{`) ends (its `}`),
/// strings and nested objects skipped.
pub fn object_end(json: &[u8], start: usize) -> Option<usize> {
    let (mut depth, mut in_string, mut escaped) = (0u32, false, false);
    for (offset, &byte) in json.get(start..)?.iter().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(start + offset);
                }
            }
            _ => {}
        }
    }
    None
}

/// The cost of `tokens` at `price`, nano-USD (USD per million tokens ×
/// tokens × 1000), rounded to the nearest nano-dollar.
pub fn cost_nano_usd(tokens: &Tokens, price: &Price) -> u64 {
    let cached = tokens.cached_tokens.min(tokens.prompt_tokens);
    let uncached = tokens.prompt_tokens - cached;
    let nano = (uncached as f64 * price.input
        + cached as f64 * price.cached_input.unwrap_or(price.input)
        + tokens.completion_tokens as f64 * price.output)
        * 1000.0;
    if nano.is_finite() && nano > 0.0 {
        // Saturating: an absurd price cannot wrap the sum.
        nano.round().min(u64::MAX as f64) as u64
    } else {
        0
    }
}

/// Where records go: a bounded channel to the batch writer.
#[derive(Clone)]
pub struct Sink {
    tx: tokio::sync::mpsc::Sender<UsageRecord>,
    overflow: Arc<std::sync::Mutex<Vec<UsageRecord>>>,
}

impl Sink {
    /// Hands `record` to the writer; never blocks and never drops it (a full
    /// channel spills into the overflow list the writer also drains).
    pub fn send(&self, record: UsageRecord) {
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(record)) => {
                if let Ok(mut overflow) = self.overflow.lock() {
                    overflow.push(record);
                }
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(record)) => {
                tracing::error!(
                    request_id = %record.request_id,
                    "usage record arrived after the writer stopped; not stored"
                );
            }
        }
    }
}

/// The batch writer's handle: [`Writer::finish`] waits for every sender to
/// be gone, then for the last batch.
pub struct Writer {
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// Starts the writer on `store`.
    pub fn start(store: Store, interval: Duration) -> (Sink, Self) {
        let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL);
        let overflow = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Sink {
            tx,
            overflow: Arc::clone(&overflow),
        };
        #[expect(
            clippy::disallowed_methods,
            reason = "the writer must outlive the server's drain: Writer::finish awaits it after the tracker is done"
        )]
        let task = tokio::spawn(write_loop(store, rx, overflow, interval));
        (sink, Self { task })
    }

    /// Waits up to `deadline` for the last records (once every [`Sink`] is
    /// dropped, the writer stores what is left and ends).
    pub async fn finish(self, deadline: Duration) {
        if tokio::time::timeout(deadline, self.task).await.is_err() {
            tracing::error!(
                "usage writer did not finish within {deadline:?}; records still in flight may be lost"
            );
        }
    }
}

async fn write_loop(
    store: Store,
    mut rx: tokio::sync::mpsc::Receiver<UsageRecord>,
    overflow: Arc<std::sync::Mutex<Vec<UsageRecord>>>,
    interval: Duration,
) {
    let mut pending: Vec<UsageRecord> = Vec::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    while open || !pending.is_empty() {
        if open {
            tokio::select! {
                received = rx.recv_many(&mut pending, BATCH) => {
                    if received == 0 {
                        open = false;
                    } else if pending.len() < BATCH {
                        continue;
                    }
                }
                _ = tick.tick() => {}
            }
        }
        if let Ok(mut spilled) = overflow.lock() {
            pending.append(&mut spilled);
        }
        while !pending.is_empty() {
            let take = pending.len().min(BATCH);
            match store.insert_usage(&pending[..take]).await {
                Ok(_) => {
                    pending.drain(..take);
                }
                Err(err) => {
                    // Kept and retried: the records are the money.
                    tracing::error!(%err, waiting = pending.len(), "writing usage records failed; retrying");
                    if !open {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    break;
                }
            }
        }
    }
}

/// Tokens a request reserved in one TPM bucket, settled when it ends.
pub struct Reservation {
    /// The bucket's owner (a key or a model).
    pub state: Arc<crate::limits::KeyState>,
    /// Its tokens per minute.
    pub limit: u64,
    /// Reserved from a shared (Redis) lease.
    pub shared: bool,
    /// How many.
    pub reserved: u64,
}

/// What the pipeline knows about a metered request when its answer starts.
pub struct Metered {
    /// Where the record goes.
    pub sink: Sink,
    /// The key, when keys are required.
    pub key: Option<Arc<Key>>,
    /// The model's price, if configured.
    pub price: Option<Price>,
    /// llmproxy's request id.
    pub request_id: String,
    /// The model the client asked for.
    pub model: String,
    /// The upstream's name (the first upstream's unless routed).
    pub upstream: String,
    /// Estimated prompt tokens (the request's size).
    pub prompt_estimate: u64,
    /// Tokens reserved in TPM buckets (the key's, the model's).
    pub reservations: [Option<Reservation>; 2],
    /// The key's concurrency slot, freed with the answer.
    pub slot: Option<Slot>,
    /// When the request arrived.
    pub start: Instant,
}

/// How the body is read for usage.
enum Reading {
    /// A JSON answer, kept whole (chunks are reference-counted).
    Json { chunks: Vec<Bytes>, len: usize },
    /// An event stream, scanned as it passes.
    Sse(sse::Scanner),
    /// Anything else: no usage to read.
    Other,
}

/// Watches one answer and accounts for it when it is over.
pub struct Meter {
    request: Option<Metered>,
    status: u16,
    attempt: u32,
    reading: Reading,
    first_byte: Option<Instant>,
}

impl Meter {
    /// A meter for an answer with `status` and `content_type`.
    pub fn new(request: Metered, status: u16, attempt: u32, content_type: &[u8]) -> Self {
        let reading = if starts_with_ignore_case(content_type, b"text/event-stream") {
            Reading::Sse(sse::Scanner::default())
        } else if starts_with_ignore_case(content_type, b"application/json") {
            Reading::Json {
                chunks: Vec::new(),
                len: 0,
            }
        } else {
            Reading::Other
        };
        Self {
            request: Some(request),
            status,
            attempt,
            reading,
            first_byte: None,
        }
    }

    /// Whether the answer is an event stream.
    pub fn reads_sse(&self) -> bool {
        matches!(self.reading, Reading::Sse(_))
    }

    /// Whether the answer is JSON (read whole for its cost headers).
    pub fn reads_json(&self) -> bool {
        matches!(self.reading, Reading::Json { .. })
    }

    /// Accounts for the answer (`complete` when its body ended cleanly):
    /// settles the key's limits, charges its budget and sends the record.
    /// Returns the tokens and cost the first time, `None` after.
    pub fn settle(&mut self, complete: bool) -> Option<(Tokens, u64)> {
        let request = self.request.take()?;
        let (answer, streamed) = match std::mem::replace(&mut self.reading, Reading::Other) {
            Reading::Json { chunks, len } if complete && len <= MAX_JSON => {
                let mut whole = Vec::with_capacity(len);
                for chunk in &chunks {
                    whole.extend_from_slice(chunk);
                }
                (Some(Answer::scan(&whole)), 0)
            }
            Reading::Sse(scanner) => {
                let events = scanner.content_events();
                (scanner.into_answer(), events)
            }
            _ => (None, 0),
        };
        let success = (200..300).contains(&self.status);
        let (tokens, source, model_served) = match answer {
            Some(Answer {
                usage: Some(tokens),
                model,
            }) => (tokens, "reported", model),
            // An error answer generated nothing: nothing to estimate.
            other if !success => (Tokens::default(), "reported", other.and_then(|a| a.model)),
            other => (
                Tokens {
                    prompt_tokens: request.prompt_estimate,
                    completion_tokens: streamed,
                    cached_tokens: 0,
                },
                "estimated",
                other.and_then(|a| a.model),
            ),
        };
        let cost = request
            .price
            .as_ref()
            .map_or(0, |price| cost_nano_usd(&tokens, price));
        let now = unix_ms();
        let used = tokens
            .prompt_tokens
            .saturating_add(tokens.completion_tokens);
        for reservation in request.reservations.iter().flatten() {
            reservation.state.settle(
                crate::limits::Dimension::Tokens,
                reservation.shared,
                reservation.reserved,
                used,
                reservation.limit,
            );
        }
        if let Some(key) = &request.key
            && cost > 0
        {
            key.state.charge(&key.record, now, cost);
        }
        let elapsed = |t: Instant| {
            u64::try_from(t.duration_since(request.start).as_millis()).unwrap_or(u64::MAX)
        };
        let record = UsageRecord {
            request_id: request.request_id,
            attempt: self.attempt,
            at: now,
            key_id: request
                .key
                .as_ref()
                .map_or_else(String::new, |key| key.record.id.clone()),
            model_served: model_served.unwrap_or_else(|| request.model.clone()),
            model_requested: request.model,
            upstream: request.upstream,
            status: self.status,
            prompt_tokens: tokens.prompt_tokens,
            completion_tokens: tokens.completion_tokens,
            cached_tokens: tokens.cached_tokens,
            cost_nano_usd: cost,
            latency_ms: elapsed(Instant::now()),
            ttft_ms: self.first_byte.map(elapsed),
            source,
        };
        request.sink.send(record);
        // The slot (if any) is freed here, with the request.
        drop(request.slot);
        Some((tokens, cost))
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        // A meter dropped unsettled (the client left while a JSON answer was
        // read) still accounts for the request.
        let _ = self.settle(false);
    }
}

/// `cost` (nano-USD) as the `x-llmproxy-cost-usd` value, in USD with all
/// nine decimals (exact).
pub fn usd_header(nano: u64) -> http::HeaderValue {
    // Written by hand: this runs on every priced answer, and `format!` costs
    // more than the rest of the header.
    let mut digits = [b'0'; 30];
    let mut at = digits.len();
    let mut rest = nano;
    let mut written = 0;
    while rest > 0 || written < 10 {
        if written == 9 {
            at -= 1;
            digits[at] = b'.';
        }
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        written += 1;
    }
    http::HeaderValue::from_bytes(&digits[at..]).unwrap_or(http::HeaderValue::from_static("0"))
}

pin_project_lite::pin_project! {
    /// `head`, then the rest of a body: an answer that was being read whole
    /// and turned out too big to hold.
    pub struct Prefixed<B> {
        head: Option<Bytes>,
        #[pin]
        rest: B,
    }
}

impl<B> Prefixed<B> {
    /// `head` first, then `rest`.
    pub fn new(head: Bytes, rest: B) -> Self {
        Self {
            head: Some(head),
            rest,
        }
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(head) = this.head.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(head))));
        }
        this.rest.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.rest.is_end_stream()
    }
}

fn starts_with_ignore_case(value: &[u8], prefix: &[u8]) -> bool {
    value
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

impl Observer for Meter {
    fn on_data(&mut self, data: &Bytes, _last: bool) {
        if self.first_byte.is_none() {
            self.first_byte = Some(Instant::now());
        }
        match &mut self.reading {
            Reading::Json { chunks, len } => {
                *len = len.saturating_add(data.len());
                if *len <= MAX_JSON {
                    chunks.push(data.clone());
                } else {
                    chunks.clear();
                }
            }
            Reading::Sse(scanner) => scanner.feed(data),
            Reading::Other => {}
        }
    }

    fn on_end(&mut self) {
        let _ = self.settle(true);
    }

    fn on_error(&mut self, _error: &(dyn std::error::Error + 'static)) {
        let _ = self.settle(false);
    }

    fn on_cancel(&mut self) {
        let _ = self.settle(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_usage_is_read_with_the_cache_in_the_prompt() {
        let tokens: Tokens = serde_json::from_str(
            r#"{"input_tokens":472,"output_tokens":89,"cache_read_input_tokens":100,"cache_creation_input_tokens":10}"#,
        )
        .unwrap();
        assert_eq!(
            tokens,
            Tokens {
                prompt_tokens: 582,
                completion_tokens: 89,
                cached_tokens: 100
            }
        );
        let start = Tokens {
            prompt_tokens: 582,
            completion_tokens: 2,
            cached_tokens: 100,
        };
        let end = Tokens {
            prompt_tokens: 0,
            completion_tokens: 89,
            cached_tokens: 0,
        };
        assert_eq!(start.merge(end), tokens);
    }

    #[test]
    fn responses_usage_counts_cached_input_inside_the_input() {
        let tokens: Tokens = serde_json::from_str(
            r#"{"input_tokens":300,"input_tokens_details":{"cached_tokens":200},"output_tokens":12,"output_tokens_details":{"reasoning_tokens":4},"total_tokens":312}"#,
        )
        .unwrap();
        assert_eq!(
            tokens,
            Tokens {
                prompt_tokens: 300,
                completion_tokens: 12,
                cached_tokens: 200
            }
        );
    }

    #[test]
    fn usd_headers_have_nine_decimals() {
        for (nano, text) in [
            (0, "0.000000000"),
            (16_000_000, "0.016000000"),
            (1_000_000_000, "1.000000000"),
            (u64::MAX, "18446744073.709551615"),
        ] {
            assert_eq!(usd_header(nano), text);
        }
    }

    #[test]
    fn a_scan_finds_model_and_usage_and_is_not_fooled_by_content() {
        let answer = br#"{"id":"c","model" : "gpt-4o-2024","choices":[{"message":{"content":"say \"usage\":{\"prompt_tokens\":99} and \"model\":\"x\""}}],
            "usage": {"prompt_tokens":10,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":4},"note":"}{"}}"#;
        let found = Answer::scan(answer);
        assert_eq!(found.model.as_deref(), Some("gpt-4o-2024"));
        assert_eq!(
            found.usage,
            Some(Tokens {
                prompt_tokens: 10,
                completion_tokens: 3,
                cached_tokens: 4
            })
        );
        assert_eq!(Answer::usage_in(br#"{"choices":[],"usage":null}"#), None);
        assert_eq!(
            Answer::usage_in(br#"{"usage":{"prompt_tokens":1"#),
            None,
            "cut short"
        );
        assert_eq!(Answer::model_in(br#"{"model":7}"#), None);
        assert_eq!(Answer::scan(b"not json").usage, None);
    }

    #[test]
    fn usage_is_read_with_cached_tokens_and_priced_exactly() {
        let answer: Answer = serde_json::from_str(
            r#"{"id":"x","model":"gpt-4o-2024","choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":200,"total_tokens":1200,"prompt_tokens_details":{"cached_tokens":400}}}"#,
        )
        .unwrap();
        let tokens = answer.usage.unwrap();
        assert_eq!(tokens.cached_tokens, 400);
        let price = Price {
            input: 2.5,
            output: 10.0,
            cached_input: Some(1.25),
        };
        // 600 × 2.5 + 400 × 1.25 + 200 × 10 = 4,000 USD per million = 4,000,000 nano-USD.
        assert_eq!(cost_nano_usd(&tokens, &price), 4_000_000);
        let null: Answer = serde_json::from_str(r#"{"usage":null}"#).unwrap();
        assert_eq!(null.usage, None);
    }
}
