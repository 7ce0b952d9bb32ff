//! A lean HTTP/1.1 client exchange, driven by the request's own task.
//!
//! Why not hyper's client connection: it runs every connection as a task of
//! its own and hands each request to it through a channel, the answer back
//! through a oneshot and the body through another channel — four hand-offs
//! and two task switches per request, about a quarter of the proxy's
//! instructions (bench/HISTORY.md). Here the request's task writes the
//! request, reads and parses the answer's head (`httparse`, the parser hyper
//! uses), and the answer's body reads the socket itself when the client side
//! polls it. An idle connection is held by nobody but the pool.
//!
//! Framing follows RFC 9112 §6: a response to HEAD, a 1xx (skipped, except
//! 101), 204 or 304 has no body; `Transfer-Encoding` ending in `chunked` is
//! decoded (and wins over `Content-Length`); otherwise a valid
//! `Content-Length` bounds the body; otherwise it runs to the connection's
//! close. A connection is reused only after a body that ended by its own
//! framing, on a keep-alive HTTP/1.1 answer.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWriteExt};

use super::UpstreamBody;
use super::pool::Pool;

/// The transport: TCP, or TLS over it.
pub type Stream = TokioIo<hyper_rustls::MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>>;

/// Most bytes of a response head (status line and headers), and of a
/// trailer block.
const MAX_HEAD: usize = 64 * 1024;
/// Most response headers.
const MAX_HEADERS: usize = 128;
/// Bytes asked of the socket per read.
const READ_SIZE: usize = 16 * 1024;

thread_local! {
    /// Where reads land before what came is copied out (see `poll_fill`).
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_SIZE].into_boxed_slice());
}
/// A request body this small is copied behind the head and written in one
/// go; larger ones are written frame by frame.
const COALESCE: usize = 16 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// Reading or writing the socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The upstream closed the connection before the answer was complete.
    #[error("the upstream closed the connection {0}")]
    Closed(&'static str),
    /// The upstream's answer is not valid HTTP/1.1.
    #[error("invalid HTTP/1.1 answer: {0}")]
    Protocol(&'static str),
    /// The client's request body failed (too large, too slow, or the client left).
    #[error("the request body failed")]
    RequestBody(#[source] super::client::BoxError),
}

impl H1Error {
    /// As the body's error: an `io::Error` whose kind says the cause
    /// (`UnexpectedEof`: cut short, `InvalidData`: bad framing), which
    /// `stream::failure_kind` names for the access log.
    fn into_io(self) -> std::io::Error {
        match self {
            Self::Io(err) => err,
            Self::Closed(_) => std::io::Error::new(std::io::ErrorKind::UnexpectedEof, self),
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}

/// A request written whole in one piece, kept so it can be written again
/// on a fresh connection when a reused one turns out to have been closed by
/// the upstream before it answered a byte.
pub struct Replay {
    wire: Vec<u8>,
    head_only: bool,
}

/// A failed exchange, and the request to write again when that is safe.
pub struct Failed {
    /// Why.
    pub error: H1Error,
    /// The whole request, when nothing of an answer arrived and the request
    /// went out in one piece.
    pub replay: Option<Replay>,
}

/// An open connection and what has been read from it but not used yet.
///
/// Boxed: a TLS session makes the transport large, and a connection moves
/// through the pool, a request's future and a body; each move is then a
/// pointer, not a copy (and no request's future carries its size).
pub struct Conn(Box<Inner>);

struct Inner {
    io: Stream,
    buf: BytesMut,
}

impl Conn {
    /// A fresh connection.
    pub fn new(io: Stream) -> Self {
        Self(Box::new(Inner {
            io,
            buf: BytesMut::new(),
        }))
    }

    /// Whether an idle connection can carry another exchange: the upstream
    /// has neither closed it nor sent anything unasked for. Checked without
    /// waiting: a socket with nothing to read is alive.
    pub fn is_reusable(&mut self) -> bool {
        if !self.0.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut read = tokio::io::ReadBuf::new(&mut byte);
        // Ready means closed (0 bytes), failed, or stray bytes: not reusable.
        Pin::new(&mut self.0.io)
            .poll_read(&mut cx, &mut read)
            .is_pending()
    }

    /// Sends `request` and reads the answer's head. The body, when there is
    /// one, owns the connection and reads it as it is polled; the connection
    /// goes back to `home` when the body ended and it can be reused.
    pub async fn send(
        mut self,
        request: http::Request<UpstreamBody>,
        home: &Arc<Pool>,
    ) -> Result<http::Response<ResponseBody>, Failed> {
        let (parts, body) = request.into_parts();
        let head_only = parts.method == Method::HEAD;
        let written = match self.write_request(&parts, body).await {
            Ok(written) => written,
            // An upstream may answer before it has read the whole body (a
            // 413, say) and close; its answer is still worth reading.
            Err(H1Error::Io(error)) => {
                return self.receive(head_only, home).await.map_err(|_| Failed {
                    error: H1Error::Io(error),
                    replay: None,
                });
            }
            Err(error) => {
                return Err(Failed {
                    error,
                    replay: None,
                });
            }
        };
        self.receive(head_only, home).await.map_err(|error| Failed {
            replay: written
                .filter(|_| is_closed_before_answer(&error))
                .map(|wire| Replay { wire, head_only }),
            error,
        })
    }

    /// Writes a request kept from a failed exchange again, and reads its answer.
    pub async fn resend(
        mut self,
        replay: Replay,
        home: &Arc<Pool>,
    ) -> Result<http::Response<ResponseBody>, H1Error> {
        self.0.io.write_all(&replay.wire).await?;
        self.0.io.flush().await?;
        self.receive(replay.head_only, home).await
    }

    async fn receive(
        mut self,
        head_only: bool,
        home: &Arc<Pool>,
    ) -> Result<http::Response<ResponseBody>, H1Error> {
        let (head, framing) = loop {
            let (head, framing) = self.read_head(head_only).await?;
            // Interim answers (100 Continue, 103 Early Hints) are not
            // forwarded: hyper writes its own 100 to the client.
            if head.status().is_informational() && head.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                continue;
            }
            break (head, framing);
        };
        let keep_alive = framing.reusable && wants_keep_alive(&head);
        let mut body = ResponseBody {
            conn: Some(self),
            decoder: framing.decoder,
            home: keep_alive.then(|| Arc::clone(home)),
            failed: None,
        };
        body.finish_if_empty();
        Ok(head.map(|()| body))
    }

    /// Writes the request; returns its bytes when it went out in one piece.
    async fn write_request(
        &mut self,
        parts: &http::request::Parts,
        body: UpstreamBody,
    ) -> Result<Option<Vec<u8>>, H1Error> {
        let mut body = std::pin::pin!(body);
        let exact = body.size_hint().exact();
        let mut head = Vec::with_capacity(512);
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &parts.headers {
            // The framing is ours to write: the client's described the
            // client's own message (hop-by-hop ones are already gone).
            if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
                continue;
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        let chunked = match exact {
            Some(0) if !method_has_body(&parts.method) => false,
            Some(len) => {
                head.extend_from_slice(b"content-length: ");
                push_decimal(&mut head, len);
                head.extend_from_slice(b"\r\n");
                false
            }
            None => {
                head.extend_from_slice(b"transfer-encoding: chunked\r\n");
                true
            }
        };
        head.extend_from_slice(b"\r\n");

        // Most API calls: the whole JSON body came with the headers; one
        // write carries head and body. Larger bodies go out as they come.
        let mut out = head;
        let mut whole = true;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(H1Error::RequestBody)?;
            let Ok(data) = frame.into_data() else {
                continue; // request trailers are not forwarded
            };
            if data.is_empty() {
                continue;
            }
            if chunked {
                push_hex(&mut out, data.len() as u64);
                out.extend_from_slice(b"\r\n");
            }
            if out.len() + data.len() <= COALESCE {
                out.extend_from_slice(&data);
            } else {
                whole = false;
                self.0.io.write_all(&out).await?;
                out.clear();
                self.0.io.write_all(&data).await?;
            }
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
        }
        if chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        self.0.io.write_all(&out).await?;
        self.0.io.flush().await?;
        Ok(whole.then_some(out))
    }

    /// Reads and parses one response head.
    async fn read_head(
        &mut self,
        head_only: bool,
    ) -> Result<(http::Response<()>, Framing), H1Error> {
        loop {
            if !self.0.buf.is_empty()
                && let Some(parsed) = self.parse_head(head_only)?
            {
                return Ok(parsed);
            }
            if self.0.buf.len() >= MAX_HEAD {
                return Err(H1Error::Protocol("the response head is larger than 64 KiB"));
            }
            if self.fill().await? == 0 {
                return Err(H1Error::Closed("before sending a response"));
            }
        }
    }

    fn parse_head(
        &mut self,
        head_only: bool,
    ) -> Result<Option<(http::Response<()>, Framing)>, H1Error> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut headers);
        let len = match parsed.parse(&self.0.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error::Protocol("more than 128 response headers"));
            }
            Err(_) => return Err(H1Error::Protocol("malformed status line or header")),
        };
        let status = parsed
            .code
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or(H1Error::Protocol("invalid status code"))?;
        let version = if parsed.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // The head's bytes are frozen once; each value is a slice of them.
        let base = self.0.buf.as_ptr() as usize;
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let count = parsed.headers.len();
        for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
            // Offsets within a head of at most MAX_HEAD bytes fit in u32.
            let at = |p: *const u8| (p as usize - base) as u32;
            *span = (
                at(h.name.as_ptr()),
                h.name.len() as u32,
                at(h.value.as_ptr()),
                h.value.len() as u32,
            );
        }
        let bytes = self.0.buf.split_to(len).freeze();
        // Room for what the proxy adds on the way out (request id,
        // Server-Timing, routing headers): growing a full map rehashes it.
        let mut map = HeaderMap::with_capacity(count + 4);
        for &(name, name_len, value, value_len) in &spans[..count] {
            let (name, value) = (name as usize, value as usize);
            let name = HeaderName::from_bytes(&bytes[name..name + name_len as usize])
                .map_err(|_| H1Error::Protocol("invalid header name"))?;
            let value =
                HeaderValue::from_maybe_shared(bytes.slice(value..value + value_len as usize))
                    .map_err(|_| H1Error::Protocol("invalid header value"))?;
            map.append(name, value);
        }
        let framing = framing(status, head_only, &map)?;
        let mut head = http::Response::new(());
        *head.status_mut() = status;
        *head.version_mut() = version;
        *head.headers_mut() = map;
        Ok(Some((head, framing)))
    }

    /// Reads what the socket has into the buffer; 0 at the end of the stream.
    async fn fill(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Reads more of a body whose framing says more is coming: the end of
    /// the stream here is a cut-short body.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), H1Error>> {
        match ready!(self.poll_fill(cx)) {
            Ok(0) => Poll::Ready(Err(H1Error::Closed("before the end of the body"))),
            Ok(_) => Poll::Ready(Ok(())),
            Err(err) => Poll::Ready(Err(err.into())),
        }
    }

    /// Reads into the thread's scratch space and keeps exactly what came.
    ///
    /// A connection holds no read buffer of its own between reads: a held
    /// stream of small events (thousands at once) would otherwise keep a
    /// mostly empty 8 KiB buffer each — most of its memory. What a read
    /// brings is copied out once, into an allocation of its own size, which
    /// the data frame then carries to the client without another copy.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let inner = &mut *self.0;
        SCRATCH.with_borrow_mut(|scratch| {
            let mut read = tokio::io::ReadBuf::new(&mut scratch[..]);
            ready!(Pin::new(&mut inner.io).poll_read(cx, &mut read))?;
            let got = read.filled();
            inner.buf.extend_from_slice(got);
            Poll::Ready(Ok(got.len()))
        })
    }
}

fn method_has_body(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
    )
}

/// Whether an exchange failed because the connection was closed before a
/// byte of an answer came: what a reused connection does when the upstream
/// closed it as we wrote.
fn is_closed_before_answer(error: &H1Error) -> bool {
    match error {
        H1Error::Closed(_) => true,
        H1Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
        ),
        _ => false,
    }
}

fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(crate::stream::decimal(n, &mut [0; 20]));
}

fn push_hex(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(n % 16) as usize];
        n /= 16;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

fn wants_keep_alive(head: &http::Response<()>) -> bool {
    let mut close = head.version() == Version::HTTP_10;
    for value in head.headers().get_all(http::header::CONNECTION) {
        for token in value.as_bytes().split(|b| *b == b',') {
            let token = token.trim_ascii();
            if token.eq_ignore_ascii_case(b"close") {
                return false;
            }
            if token.eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        }
    }
    !close
}

/// How the body of an answer ends, and whether the connection survives it.
#[derive(Clone, Copy)]
struct Framing {
    decoder: Decoder,
    reusable: bool,
}

/// RFC 9112 §6.3, in its order.
fn framing(status: StatusCode, head_only: bool, headers: &HeaderMap) -> Result<Framing, H1Error> {
    if head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing {
            decoder: Decoder::Done,
            // After a 101 the connection speaks something else.
            reusable: status != StatusCode::SWITCHING_PROTOCOLS,
        });
    }
    let mut codings = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .peekable();
    if codings.peek().is_some() {
        let last = codings
            .last()
            .and_then(|v| v.as_bytes().rsplit(|b| *b == b',').next())
            .map(<[u8]>::trim_ascii);
        if last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")) {
            return Ok(Framing {
                decoder: Decoder::Chunked(Chunked::Size),
                reusable: true,
            });
        }
        // Not chunked last: the body runs to the close.
        return Ok(Framing {
            decoder: Decoder::Eof,
            reusable: false,
        });
    }
    let mut length: Option<u64> = None;
    for value in headers.get_all(http::header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|b| *b == b',') {
            let part = part.trim_ascii();
            let parsed = std::str::from_utf8(part)
                .ok()
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u64>().ok())
                .ok_or(H1Error::Protocol("invalid content-length"))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(H1Error::Protocol("conflicting content-length values"));
            }
            length = Some(parsed);
        }
    }
    Ok(match length {
        Some(len) => Framing {
            decoder: Decoder::Length(len),
            reusable: true,
        },
        None => Framing {
            decoder: Decoder::Eof,
            reusable: false,
        },
    })
}

#[derive(Clone, Copy, Debug)]
enum Decoder {
    /// Bytes left of a `Content-Length` body.
    Length(u64),
    Chunked(Chunked),
    /// Until the upstream closes.
    Eof,
    Done,
    /// Failed; the error is yet to be reported (never an end of stream).
    Failed,
}

#[derive(Clone, Copy, Debug)]
enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Bytes left of the current chunk.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields up to an empty line.
    Trailers,
}

/// An upstream answer's body, read from the socket as it is polled.
pub struct ResponseBody {
    conn: Option<Conn>,
    decoder: Decoder,
    /// Where the connection goes when the body ends by its framing; `None`
    /// when it cannot be reused (`Connection: close`, HTTP/1.0, read to EOF).
    home: Option<Arc<Pool>>,
    /// A failure found while data was still on its way out, reported on
    /// the next poll (see `fail`).
    failed: Option<std::io::Error>,
}

impl ResponseBody {
    /// Ends a body that has nothing to read (HEAD, 204, 304, `Content-Length: 0`).
    fn finish_if_empty(&mut self) {
        if matches!(self.decoder, Decoder::Length(0)) {
            self.decoder = Decoder::Done;
        }
        if matches!(self.decoder, Decoder::Done) {
            self.finish();
        }
    }

    /// The body ended by its own framing: the connection goes back.
    fn finish(&mut self) {
        self.decoder = Decoder::Done;
        if let (Some(conn), Some(home)) = (self.conn.take(), self.home.take())
            && conn.0.buf.is_empty()
        {
            home.put_back(conn);
        }
    }

    /// The connection is dropped (closed) at once; the error is reported on
    /// the next poll, after a wake-up. Reported now, it would reach hyper
    /// before it has flushed what this body already gave it (a head and
    /// data read in the same gulp as a broken chunk), and the client would
    /// get no answer at all instead of an aborted one.
    fn fail(
        &mut self,
        error: H1Error,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.decoder = Decoder::Failed;
        self.conn = None;
        self.failed = Some(error.into_io());
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if let Some(error) = this.failed.take() {
            return Poll::Ready(Some(Err(error)));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder {
                Decoder::Done | Decoder::Failed => return Poll::Ready(None),
                Decoder::Length(left) => {
                    if conn.0.buf.is_empty()
                        && let Err(err) = ready!(conn.poll_more(cx))
                    {
                        return this.fail(err, cx);
                    }
                    let take = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(conn.0.buf.len());
                    let data = conn.0.buf.split_to(take).freeze();
                    let left = left - take as u64;
                    this.decoder = Decoder::Length(left);
                    if left == 0 {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoder::Eof => {
                    if conn.0.buf.is_empty() {
                        match ready!(conn.poll_fill(cx)) {
                            Ok(0) => {
                                this.decoder = Decoder::Done;
                                this.conn = None;
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(err) => return this.fail(err.into(), cx),
                        }
                    }
                    let data = conn.0.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decoder::Chunked(state) => match step_chunked(state, &mut conn.0.buf) {
                    Ok(Step::Data(data, next)) => {
                        this.decoder = Decoder::Chunked(next);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Step::Next(next)) => this.decoder = Decoder::Chunked(next),
                    Ok(Step::End(trailers)) => {
                        this.finish();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Ok(Step::NeedMore) => {
                        if conn.0.buf.len() >= MAX_HEAD {
                            return this.fail(
                                H1Error::Protocol("a chunk header or trailer block is too large"),
                                cx,
                            );
                        }
                        if let Err(err) = ready!(conn.poll_more(cx)) {
                            return this.fail(err, cx);
                        }
                    }
                    Err(err) => return this.fail(err, cx),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decoder, Decoder::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Length(left) => SizeHint::with_exact(left),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

enum Step {
    Data(Bytes, Chunked),
    Next(Chunked),
    End(Option<HeaderMap>),
    NeedMore,
}

/// One step of the chunked decoder over what is buffered.
fn step_chunked(state: Chunked, buf: &mut BytesMut) -> Result<Step, H1Error> {
    match state {
        Chunked::Size => {
            let Some(line_end) = find_crlf(buf) else {
                return Ok(Step::NeedMore);
            };
            let line = &buf[..line_end];
            // chunk-size [ chunk-ext ]: the extensions are ignored.
            let digits = line
                .split(|b| *b == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            if digits.is_empty() || digits.len() > 16 {
                return Err(H1Error::Protocol("invalid chunk size"));
            }
            let mut size: u64 = 0;
            for digit in digits {
                let value = (*digit as char)
                    .to_digit(16)
                    .ok_or(H1Error::Protocol("invalid chunk size"))?;
                size = size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(u64::from(value)))
                    .ok_or(H1Error::Protocol("chunk size overflows"))?;
            }
            buf.advance(line_end + 2);
            Ok(Step::Next(if size == 0 {
                Chunked::Trailers
            } else {
                Chunked::Data(size)
            }))
        }
        Chunked::Data(left) => {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            let data = buf.split_to(take).freeze();
            let left = left - take as u64;
            Ok(Step::Data(
                data,
                if left == 0 {
                    Chunked::DataEnd
                } else {
                    Chunked::Data(left)
                },
            ))
        }
        Chunked::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err(H1Error::Protocol("chunk data not followed by CRLF"));
            }
            buf.advance(2);
            Ok(Step::Next(Chunked::Size))
        }
        Chunked::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(Step::End(None));
            }
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(buf, &mut headers) {
                Ok(httparse::Status::Complete((len, fields))) => {
                    let mut map = HeaderMap::with_capacity(fields.len());
                    for field in fields {
                        if let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(field.name.as_bytes()),
                            HeaderValue::from_bytes(field.value),
                        ) {
                            map.append(name, value);
                        }
                    }
                    buf.advance(len);
                    Ok(Step::End(Some(map)))
                }
                Ok(httparse::Status::Partial) => Ok(Step::NeedMore),
                Err(_) => Err(H1Error::Protocol("malformed trailer")),
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` fed in pieces of `step` bytes.
    fn decode(wire: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>), H1Error> {
        let mut buf = BytesMut::new();
        let mut state = Chunked::Size;
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match step_chunked(state, &mut buf)? {
                Step::Data(data, next) => {
                    out.extend_from_slice(&data);
                    state = next;
                }
                Step::Next(next) => state = next,
                Step::End(trailers) => return Ok((out, trailers)),
                Step::NeedMore => {
                    if fed >= wire.len() {
                        return Err(H1Error::Closed("test"));
                    }
                    let end = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_at_any_split() {
        let wire = b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-sum: 9\r\n\r\n";
        for step in 1..wire.len() {
            let (body, trailers) = decode(wire, step).unwrap();
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            assert_eq!(trailers.unwrap()["x-sum"], "9", "step {step}");
        }
        let (body, trailers) = decode(b"0\r\n\r\n", 1).unwrap();
        assert!(body.is_empty() && trailers.is_none());
    }

    #[test]
    fn bad_chunk_framing_is_a_protocol_error() {
        for wire in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"fffffffffffffffff\r\n",
            b"\r\n",
        ] {
            assert!(
                matches!(decode(wire, 3), Err(H1Error::Protocol(_))),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (n, v) in pairs {
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let ok = StatusCode::OK;
        let f = |status, head_only, pairs: &[(&str, &str)]| {
            framing(status, head_only, &head(pairs))
                .map(|f| Some((format!("{:?}", f.decoder), f.reusable)))
        };
        assert_eq!(
            f(ok, true, &[("content-length", "5")]).unwrap().unwrap().0,
            "Done"
        );
        assert_eq!(
            f(StatusCode::NO_CONTENT, false, &[]).unwrap().unwrap().0,
            "Done"
        );
        assert_eq!(
            f(
                ok,
                false,
                &[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "5")
                ]
            )
            .unwrap()
            .unwrap()
            .0,
            "Chunked(Size)"
        );
        assert_eq!(
            f(ok, false, &[("transfer-encoding", "gzip")])
                .unwrap()
                .unwrap(),
            ("Eof".into(), false)
        );
        assert_eq!(
            f(ok, false, &[("content-length", "7, 7")])
                .unwrap()
                .unwrap()
                .0,
            "Length(7)"
        );
        assert_eq!(f(ok, false, &[]).unwrap().unwrap(), ("Eof".into(), false));
        for bad in ["7, 8", "-1", "", "1e3", "99999999999999999999999"] {
            assert!(f(ok, false, &[("content-length", bad)]).is_err(), "{bad}");
        }
    }
}
