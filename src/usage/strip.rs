//! The client's stream as it would have been without the usage llmproxy
//! asked for: when a streamed request did not set
//! `stream_options.include_usage`, llmproxy sets it upstream (to account
//! exactly) and this body takes its traces back out — the final chunk that
//! carries `usage` (with `"choices":[]`) and the `"usage":null` field that
//! OpenAI adds to every other chunk — so the client gets the bytes it would
//! have got.
//!
//! The same rewriting adds the request's cost to the final usage chunk
//! (`"usage":{…,"cost_usd":0.000016000}`) for a client or key that opted
//! in; every other byte stays as the upstream sent it.
//!
//! Events are rewritten whole: bytes up to the last event boundary in hand
//! go out at once, and only an event split across reads waits for its end.
//! A chunk without `"usage"` in it passes through as the same buffer. The
//! field is matched as JSON structure: inside a JSON string every quote is
//! escaped, so the text `"usage":null` cannot come from content.

use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use memchr::memmem::Finder;

/// A byte-string search built once: building a searcher costs more than
/// searching a chunk.
struct Needle(LazyLock<Finder<'static>>);

impl Needle {
    const fn new(make: fn() -> Finder<'static>) -> Self {
        Self(LazyLock::new(make))
    }

    fn find(&self, haystack: &[u8]) -> Option<usize> {
        self.0.find(haystack)
    }
}

static USAGE: Needle = Needle::new(|| Finder::new(b"\"usage\""));
static USAGE_OBJECT: Needle = Needle::new(|| Finder::new(b"\"usage\":{"));
static USAGE_OBJECT_SPACED: Needle = Needle::new(|| Finder::new(b"\"usage\": {"));

/// Where the last complete event in `data` ends (after its blank line).
fn last_boundary(data: &[u8]) -> Option<usize> {
    // A read usually ends on an event's end.
    if data.ends_with(b"\n\n") || data.ends_with(b"\n\r\n") {
        return Some(data.len());
    }
    for at in memchr::memrchr_iter(b'\n', data) {
        if at > 0 && data[at - 1] == b'\n' {
            return Some(at + 1);
        }
        if at > 1 && data[at - 1] == b'\r' && data[at - 2] == b'\n' {
            return Some(at + 1);
        }
    }
    None
}

/// What is done to the usage in a stream.
#[derive(Debug, Clone, Copy)]
pub enum Edit {
    /// The usage chunk and `"usage":null` fields are removed.
    Strip,
    /// The cost at this price is added to the usage object.
    AddCost(crate::config::Price),
}

/// Where the usage object in `event` starts and ends (inclusive).
fn usage_object(event: &[u8]) -> Option<(usize, usize)> {
    let start = USAGE_OBJECT
        .find(event)
        .map(|at| at + 8)
        .or_else(|| USAGE_OBJECT_SPACED.find(event).map(|at| at + 9))?;
    super::object_end(event, start).map(|end| (start, end))
}

/// `event` with the cost of its usage added (unchanged without usage).
fn add_cost(event: &[u8], price: &crate::config::Price) -> Vec<u8> {
    let Some((start, end)) = usage_object(event) else {
        return event.to_vec();
    };
    let Ok(tokens) = serde_json::from_slice::<super::Tokens>(&event[start..=end]) else {
        return event.to_vec();
    };
    let nano = super::cost_nano_usd(&tokens, price);
    let field = format!(
        "{}\"cost_usd\":{}.{:09}",
        if end == start + 1 { "" } else { "," },
        nano / 1_000_000_000,
        nano % 1_000_000_000
    );
    let mut out = Vec::with_capacity(event.len() + field.len());
    out.extend_from_slice(&event[..end]);
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(&event[end..]);
    out
}

/// One event as `edit` says; `None` when it goes entirely.
fn rewrite_event(event: &[u8], edit: Edit) -> Option<Vec<u8>> {
    if let Edit::AddCost(price) = edit {
        return Some(add_cost(event, &price));
    }
    // One pass over the `"usage"` keys: an object drops the event, a
    // `null` goes with the comma that separates it.
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    for at in USAGE.0.find_iter(event) {
        let mut value = at + 7;
        if event.get(value) != Some(&b':') {
            continue;
        }
        value += 1;
        if event.get(value) == Some(&b' ') {
            value += 1;
        }
        match event.get(value) {
            Some(b'{') => return None,
            Some(b'n') if event[value..].starts_with(b"null") => {
                let end = value + 4;
                let before = event[..at].iter().rposition(|&b| b != b' ');
                let after = event[end..]
                    .iter()
                    .position(|&b| b != b' ')
                    .map(|n| end + n);
                if let Some(comma) = before.filter(|&i| event[i] == b',') {
                    cuts.push((comma, end));
                } else if let Some(comma) = after.filter(|&i| event[i] == b',') {
                    cuts.push((at, comma + 1));
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::with_capacity(event.len());
    let mut from = 0;
    for (start, end) in cuts {
        out.extend_from_slice(&event[from..start]);
        from = end;
    }
    out.extend_from_slice(&event[from..]);
    Some(out)
}

/// Where the first event in `data` ends (after its blank line), or its length.
fn next_boundary(data: &[u8]) -> usize {
    for at in memchr::memchr_iter(b'\n', data) {
        match data.get(at + 1) {
            Some(b'\n') => return at + 2,
            Some(b'\r') if data.get(at + 2) == Some(&b'\n') => return at + 3,
            _ => {}
        }
    }
    data.len()
}

/// Complete events, rewritten; the same buffer when nothing changes.
fn rewrite(events: Bytes, edit: Edit) -> Bytes {
    if USAGE.find(&events).is_none() {
        return events;
    }
    let mut out = Vec::with_capacity(events.len());
    let mut rest = &events[..];
    while !rest.is_empty() {
        let end = next_boundary(rest);
        let (event, tail) = rest.split_at(end);
        if let Some(kept) = rewrite_event(event, edit) {
            out.extend_from_slice(&kept);
        }
        rest = tail;
    }
    Bytes::from(out)
}

pin_project_lite::pin_project! {
    /// `inner` with its usage edited.
    pub struct EditUsage<B> {
        #[pin]
        inner: B,
        pending: BytesMut,
        edit: Edit,
    }
}

impl<B> EditUsage<B> {
    /// `inner` as `edit` says.
    pub fn new(inner: B, edit: Edit) -> Self {
        Self {
            inner,
            pending: BytesMut::new(),
            edit,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for EditUsage<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        loop {
            match std::task::ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    let complete = if this.pending.is_empty() {
                        match last_boundary(&data) {
                            Some(end) if end == data.len() => data,
                            Some(end) => {
                                this.pending.extend_from_slice(&data[end..]);
                                data.slice(..end)
                            }
                            None => {
                                this.pending.extend_from_slice(&data);
                                continue;
                            }
                        }
                    } else {
                        this.pending.extend_from_slice(&data);
                        match last_boundary(this.pending) {
                            Some(end) => this.pending.split_to(end).freeze(),
                            None => continue,
                        }
                    };
                    let out = rewrite(complete, *this.edit);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None if this.pending.is_empty() => return Poll::Ready(None),
                None => {
                    let rest = rewrite(this.pending.split().freeze(), *this.edit);
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // The length changes: never the upstream's.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const WITH: &str = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"say \\\"usage\\\":null\"}}],\"id\":\"c\",\"usage\":null}\n\n",
        "data: {\"usage\":null,\"choices\":[{\"delta\":{}}],\"id\":\"c\"}\n\n",
        "data: {\"choices\":[],\"id\":\"c\",\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n",
    );
    const WITHOUT: &str = concat!(
        "data: {\"choices\":[{\"delta\":{\"content\":\"say \\\"usage\\\":null\"}}],\"id\":\"c\"}\n\n",
        "data: {\"choices\":[{\"delta\":{}}],\"id\":\"c\"}\n\n",
        "data: [DONE]\n\n",
    );

    async fn strip(pieces: Vec<&[u8]>) -> Vec<u8> {
        let (mut tx, channel) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(64);
        for piece in pieces {
            tx.send_data(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        drop(tx);
        EditUsage::new(channel, Edit::Strip)
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    #[tokio::test]
    async fn the_stream_is_what_it_would_have_been_at_every_split() {
        let bytes = WITH.as_bytes();
        for split in 0..bytes.len() {
            let out = strip(vec![&bytes[..split], &bytes[split..]]).await;
            assert_eq!(String::from_utf8(out).unwrap(), WITHOUT, "split at {split}");
        }
        let crlf = WITH.replace("\n\n", "\r\n\r\n");
        let out = strip(vec![crlf.as_bytes()]).await;
        assert_eq!(
            String::from_utf8(out).unwrap(),
            WITHOUT.replace("\n\n", "\r\n\r\n")
        );
    }

    #[test]
    fn spaced_and_leading_usage_fields_go_too() {
        let event =
            b"data: {\"usage\": null, \"id\":\"c\", \"usage\" : 1,\"x\":2, \"usage\": null}\n\n";
        // `"usage" : 1` is not a form OpenAI writes: left alone.
        assert_eq!(
            String::from_utf8(rewrite_event(event, Edit::Strip).unwrap()).unwrap(),
            "data: { \"id\":\"c\", \"usage\" : 1,\"x\":2}\n\n"
        );
        assert_eq!(
            rewrite_event(b"data: {\"usage\": {\"a\":1}}\n\n", Edit::Strip),
            None
        );
    }

    #[tokio::test]
    async fn a_stream_without_usage_passes_unchanged() {
        let out = strip(vec![WITHOUT.as_bytes()]).await;
        assert_eq!(String::from_utf8(out).unwrap(), WITHOUT);
    }

    #[tokio::test]
    async fn the_cost_goes_into_the_usage_object_and_nothing_else_changes() {
        let price = crate::config::Price {
            input: 1000.0,
            output: 2000.0,
            cached_input: None,
        };
        let (mut tx, channel) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(8);
        let bytes = WITH.as_bytes();
        tx.send_data(Bytes::copy_from_slice(&bytes[..100]))
            .await
            .unwrap();
        tx.send_data(Bytes::copy_from_slice(&bytes[100..]))
            .await
            .unwrap();
        drop(tx);
        let out = EditUsage::new(channel, Edit::AddCost(price))
            .collect()
            .await
            .unwrap()
            .to_bytes();
        // 8 × 1000 + 2 × 2000 USD per million tokens.
        let expected = WITH.replace(
            "\"completion_tokens\":2}",
            "\"completion_tokens\":2,\"cost_usd\":0.012000000}",
        );
        assert_eq!(String::from_utf8(out.to_vec()).unwrap(), expected);
        let nested = br#"data: {"usage":{"prompt_tokens":8,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens":2}}"#;
        let edited = add_cost(nested, &price);
        assert!(edited.ends_with(br#""completion_tokens":2,"cost_usd":0.012000000}}"#));
    }
}
