//! Streaming probe for `bench/run.sh`: opens SSE chat-completion streams
//! against a target (the mock upstream directly, nginx, or llmproxy) and
//! measures time to first byte and each chunk's delay.
//!
//! The mock upstream stamps every chunk with its send time
//! (`x-mock-timestamps`), so a chunk's delay is its arrival time minus its
//! send time: what the path between the two added. Prints one JSON line.
//! Against a `provider: anthropic` llmproxy the mock stamps the words
//! themselves, so the delay includes the translation.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a benchmark client: prints its result, fails loudly, spawns its streams"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};

#[derive(Parser)]
struct Args {
    /// Target address, e.g. 127.0.0.1:8080.
    #[arg(long)]
    addr: std::net::SocketAddr,
    /// Request path.
    #[arg(long, default_value = "/v1/chat/completions")]
    path: String,
    /// Streams in all.
    #[arg(long, default_value_t = 200)]
    streams: usize,
    /// Streams open at once.
    #[arg(long, default_value_t = 20)]
    concurrency: usize,
    /// Content chunks per stream.
    #[arg(long, default_value_t = 50)]
    chunks: usize,
    /// Milliseconds between chunks.
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// New streams started per second at most (0: no limit).
    #[arg(long, default_value_t = 0)]
    ramp_per_sec: u64,
    /// Give up on a stream after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// A virtual key, sent as `Authorization: Bearer KEY`.
    #[arg(long)]
    key: Option<String>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[derive(Default)]
struct Samples {
    ttfb: Vec<u64>,
    delays: Vec<u64>,
}

const MARKER: &[u8] = b"\"llmproxy_mock_sent_us\":";
/// The same stamp as the text of a word (the mock's Anthropic dialect), as
/// it arrives translated into a chunk's content.
const TEXT_MARKER: &[u8] = b"llmproxy_mock_sent_us=";

/// Runs one stream; pushes its samples, or returns why it failed.
async fn one_stream(
    args: &Args,
    samples: &Mutex<Samples>,
    peak_open: &AtomicUsize,
    open: &AtomicUsize,
) -> Result<(), String> {
    let tcp = TcpStream::connect(args.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    let mut request = http::Request::post(&args.path);
    if let Some(key) = &args.key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let request = request
        .header("host", args.addr.to_string())
        .header("content-type", "application/json")
        .header("x-mock-chunks", args.chunks)
        .header("x-mock-delay-ms", args.delay_ms)
        .header("x-mock-timestamps", "1")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap();
    let start = now_us();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if response.status() != 200 {
        return Err(format!("status {}", response.status()));
    }
    let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
    peak_open.fetch_max(now_open, Ordering::SeqCst);
    let mut body = response.into_body();
    let mut ttfb = None;
    let mut delays = Vec::with_capacity(args.chunks + 2);
    let mut pending: Vec<u8> = Vec::new();
    let mut done = false;
    let result = loop {
        let Some(frame) = body.frame().await else {
            break Ok(());
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => break Err(format!("body: {e}")),
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let arrived = now_us();
        ttfb.get_or_insert(arrived.saturating_sub(start));
        pending.extend_from_slice(data);
        // Complete events only: an event split across frames waits for its end.
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            if event.starts_with(b"data: [DONE]") {
                done = true;
            }
            let stamp = [MARKER, TEXT_MARKER].into_iter().find_map(|marker| {
                let at = event.windows(marker.len()).position(|w| w == marker)?;
                Some(at + marker.len())
            });
            if let Some(at) = stamp {
                let digits: String = event[at..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .map(|&b| b as char)
                    .collect();
                if let Ok(sent) = digits.parse::<u64>() {
                    delays.push(arrived.saturating_sub(sent));
                }
            }
        }
    };
    open.fetch_sub(1, Ordering::SeqCst);
    result?;
    if !done {
        return Err("stream ended without [DONE]".into());
    }
    let mut samples = samples.lock().await;
    samples.ttfb.push(ttfb.unwrap_or_default());
    samples.delays.extend(delays);
    Ok(())
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let args = Arc::new(Args::parse());
    let samples = Arc::new(Mutex::new(Samples::default()));
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let peak_open = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let mut tasks = Vec::with_capacity(args.streams);
    let started = std::time::Instant::now();
    for i in 0..args.streams {
        if args.ramp_per_sec > 0 {
            let due = Duration::from_secs_f64(i as f64 / args.ramp_per_sec as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let permit = permits.clone().acquire_owned().await.unwrap();
        let (args, samples, ok, errors, open, peak_open, first_error) = (
            args.clone(),
            samples.clone(),
            ok.clone(),
            errors.clone(),
            open.clone(),
            peak_open.clone(),
            first_error.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let limit = Duration::from_secs(args.timeout_secs);
            let outcome =
                tokio::time::timeout(limit, one_stream(&args, &samples, &peak_open, &open)).await;
            match outcome {
                Ok(Ok(())) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().await.get_or_insert(e);
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().await.get_or_insert("timed out".into());
                }
            }
            drop(permit);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut samples = samples.lock().await;
    samples.ttfb.sort_unstable();
    samples.delays.sort_unstable();
    let report = serde_json::json!({
        "ok": ok.load(Ordering::Relaxed),
        "errors": errors.load(Ordering::Relaxed),
        "first_error": *first_error.lock().await,
        "peak_open": peak_open.load(Ordering::Relaxed),
        "ttfb_us": {"p50": percentile(&samples.ttfb, 50.0), "p99": percentile(&samples.ttfb, 99.0)},
        "chunk_delay_us": {
            "p50": percentile(&samples.delays, 50.0),
            "p99": percentile(&samples.delays, 99.0),
            "max": samples.delays.last().copied().unwrap_or_default(),
            "count": samples.delays.len(),
        },
        "seconds": started.elapsed().as_secs_f64(),
    });
    println!("{report}");
}
