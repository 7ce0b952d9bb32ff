//! Test harness: the real proxy and scripted upstream servers, all on
//! `127.0.0.1:0`, talking over real sockets.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "each test crate uses part of the harness; a test fails loudly and spawns freely"
)]

pub mod bin;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use llmproxy::config::{self, FileConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};

/// A running proxy.
pub struct Proxy {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Proxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Triggers graceful shutdown (as SIGTERM would).
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The YAML of a config whose upstream is `base_url`.
pub fn config_for(base_url: &str) -> FileConfig {
    config::parse(&format!("upstream:\n  base_url: {base_url}\n"), "test").unwrap()
}

/// Starts the proxy in-process with `file` (the `listen` field is ignored:
/// the proxy binds 127.0.0.1:0).
pub async fn spawn_proxy_with(file: FileConfig) -> Proxy {
    spawn_proxy_env(file, &|_: &str| None).await
}

/// Like [`spawn_proxy_with`], with `${VAR}` looked up in `env`.
pub async fn spawn_proxy_env(file: FileConfig, env: &dyn config::Lookup) -> Proxy {
    let config = config::resolve(file, "test", env).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(llmproxy::run(listener, config, async {
        let _ = rx.await;
    }));
    Proxy {
        addr,
        shutdown: Some(tx),
        task,
    }
}

/// Starts the proxy in front of `upstream` with default settings.
pub async fn spawn_proxy(upstream: &Upstream) -> Proxy {
    spawn_proxy_with(config_for(&upstream.base_url())).await
}

// ---------------------------------------------------------------------------
// Scripted upstream
// ---------------------------------------------------------------------------

/// What the upstream received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub version: http::Version,
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// How a scripted body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Cleanly.
    Clean,
    /// The upstream connection fails mid-body.
    Abort,
    /// The upstream goes silent, keeping the connection open.
    Hang,
}

/// A scripted upstream answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Wait this long before sending response headers.
    pub head_delay: Duration,
    /// Each chunk is sent after its delay.
    pub chunks: Vec<(Duration, Bytes)>,
    pub end: End,
    /// Send `content-length` of the whole body instead of chunked encoding.
    pub sized: bool,
    /// Bytes added to the declared `content-length` that are never sent.
    pub missing: usize,
}

impl Reply {
    pub fn json(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            head_delay: Duration::ZERO,
            chunks: vec![(Duration::ZERO, Bytes::copy_from_slice(body.as_bytes()))],
            end: End::Clean,
            sized: true,
            missing: 0,
        }
    }

    pub fn sse(chunks: Vec<(Duration, Bytes)>) -> Self {
        Self {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            head_delay: Duration::ZERO,
            chunks,
            end: End::Clean,
            sized: false,
            missing: 0,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// A scripted HTTP/1.1 upstream that records what it received.
pub struct Upstream {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    /// Connections accepted / closed so far.
    pub opened: Arc<AtomicUsize>,
    pub closed: Arc<AtomicUsize>,
    pub closed_notify: Arc<Notify>,
    /// Bytes of body the upstream managed to hand to its socket layer.
    pub sent_bytes: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Drop for Upstream {
    /// Stops accepting and kills every open connection, as a crashed server would.
    fn drop(&mut self) {
        self.task.abort();
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Upstream {
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until `n` upstream connections have closed, or fails after `limit`.
    pub async fn wait_closed(&self, n: usize, limit: Duration) -> Result<Duration, String> {
        let start = tokio::time::Instant::now();
        let wait = async {
            loop {
                let notified = self.closed_notify.notified();
                if self.closed.load(Ordering::SeqCst) >= n {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.map_err(|_| {
            format!(
                "only {} of {n} upstream connections closed within {limit:?}",
                self.closed.load(Ordering::SeqCst)
            )
        })?;
        Ok(start.elapsed())
    }
}

/// An upstream that sends one SSE event, then dies mid-stream.
pub async fn spawn_dying_upstream() -> Upstream {
    spawn_upstream(|_| {
        let mut reply = Reply::sse(vec![(Duration::ZERO, event("partial"))]);
        reply.end = End::Abort;
        reply
    })
    .await
}

/// POSTs `body` as JSON and reads the answer: its status, and whether the
/// body failed (ended abnormally) instead of ending cleanly.
pub async fn post_expecting_abort(url: &str, body: &'static str) -> (StatusCode, bool) {
    let response = client()
        .request(
            Request::post(url)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    (status, response.into_body().collect().await.is_err())
}

/// Starts a scripted upstream; `handler` picks the reply for each request.
pub async fn spawn_upstream(
    handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
) -> Upstream {
    spawn_upstream_speaking(None, handler).await
}

/// Like [`spawn_upstream`], speaking HTTP/1.1 or cleartext HTTP/2 (prior
/// knowledge), with at most `max_streams` streams per HTTP/2 connection.
pub async fn spawn_h2_upstream(
    max_streams: u32,
    handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
) -> Upstream {
    spawn_upstream_speaking(Some(max_streams), handler).await
}

async fn spawn_upstream_speaking(
    h2_streams: Option<u32>,
    handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
) -> Upstream {
    let handler: Handler = Arc::new(handler);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let opened = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let closed_notify = Arc::new(Notify::new());
    let sent_bytes = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(Mutex::new(Vec::new()));
    let task = {
        let connections = connections.clone();
        let (requests, opened, closed, closed_notify, sent_bytes) = (
            requests.clone(),
            opened.clone(),
            closed.clone(),
            closed_notify.clone(),
            sent_bytes.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                stream.set_nodelay(true).unwrap();
                opened.fetch_add(1, Ordering::SeqCst);
                let (handler, requests, closed, closed_notify, sent_bytes) = (
                    handler.clone(),
                    requests.clone(),
                    closed.clone(),
                    closed_notify.clone(),
                    sent_bytes.clone(),
                );
                let connection = tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (handler, requests, sent_bytes) =
                            (handler.clone(), requests.clone(), sent_bytes.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            let recorded = Recorded {
                                version: parts.version,
                                method: parts.method,
                                uri: parts.uri,
                                headers: parts.headers,
                                body,
                            };
                            let reply = handler(&recorded);
                            requests.lock().unwrap().push(recorded);
                            Ok::<_, Infallible>(respond(reply, sent_bytes).await)
                        }
                    });
                    if let Some(max_streams) = h2_streams {
                        let mut builder =
                            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        builder.http2().max_concurrent_streams(max_streams);
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                    closed.fetch_add(1, Ordering::SeqCst);
                    closed_notify.notify_waiters();
                });
                connections.lock().unwrap().push(connection.abort_handle());
            }
        })
    };
    Upstream {
        addr,
        requests,
        opened,
        closed,
        closed_notify,
        sent_bytes,
        task,
        connections,
    }
}

type ReplyBody = http_body_util::channel::Channel<Bytes, std::io::Error>;

async fn respond(reply: Reply, sent_bytes: Arc<AtomicUsize>) -> Response<ReplyBody> {
    tokio::time::sleep(reply.head_delay).await;
    let (mut tx, body) = ReplyBody::new(1);
    let mut builder = Response::builder().status(StatusCode::from_u16(reply.status).unwrap());
    for (name, value) in &reply.headers {
        builder = builder.header(name, value);
    }
    if reply.sized {
        let total: usize = reply.chunks.iter().map(|(_, c)| c.len()).sum::<usize>() + reply.missing;
        builder = builder.header("content-length", total);
    }
    tokio::spawn(async move {
        for (delay, chunk) in reply.chunks {
            tokio::time::sleep(delay).await;
            let len = chunk.len();
            if tx.send_data(chunk).await.is_err() {
                return;
            }
            sent_bytes.fetch_add(len, Ordering::SeqCst);
        }
        match reply.end {
            End::Clean => {}
            End::Abort => {
                // The channel reports an abort before frames still queued in it:
                // give the last chunk time to leave first.
                tokio::time::sleep(Duration::from_millis(50)).await;
                tx.abort(std::io::Error::other("scripted upstream failure"));
            }
            End::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(tx);
            }
        }
    });
    builder.body(body).unwrap()
}

// ---------------------------------------------------------------------------
// Raw upstream: for answers a well-behaved server would never send
// ---------------------------------------------------------------------------

/// Starts a TCP server that reads each request head and writes `answer`
/// (raw bytes, written as given), then closes the socket or holds it open.
pub async fn spawn_raw_upstream(answer: &'static [u8], close_after: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                read_head(&mut stream).await;
                let _ = stream.write_all(answer).await;
                if close_after {
                    let _ = stream.shutdown().await;
                } else {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
            });
        }
    });
    addr
}

/// Reads until the end of an HTTP head (`\r\n\r\n`); returns it.
pub async fn read_head(stream: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    head
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// A finished response.
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// Sends a request and reads the whole answer.
pub async fn send(request: Request<Full<Bytes>>) -> Got {
    let response = client().request(request).await.expect("request failed");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body failed").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// POSTs `{"stream":true}` and returns the answer with its body unread.
pub async fn open_stream(url: &str) -> Response<Incoming> {
    client()
        .request(
            Request::post(url)
                .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))
                .unwrap(),
        )
        .await
        .unwrap()
}

pub async fn post(url: &str, body: impl Into<Bytes>) -> Got {
    send(
        Request::post(url)
            .header("content-type", "application/json")
            .body(Full::new(body.into()))
            .unwrap(),
    )
    .await
}

pub async fn get(url: &str) -> Got {
    send(Request::get(url).body(Full::default()).unwrap()).await
}

/// Writes a raw request and reads until the server closes or `limit` passes.
/// Returns the bytes read and whether the read ended in an error/timeout.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> (Vec<u8>, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let result = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    let failed = !matches!(result, Ok(Ok(_)));
    (out, failed)
}

/// An SSE event line with a `data:` payload.
pub fn event(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// Initializes test logging once (honours RUST_LOG).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
