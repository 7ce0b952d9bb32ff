//! The client's stream as it would have been without the usage llmproxy
//! asked for: when a streamed request did not set
//! `stream_options.include_usage`, llmproxy sets it upstream (to account
//! exactly) and this body takes its traces back out — the final chunk that
//! carries `usage` (with `"choices":[]`) and the `"usage":null` field that
//! OpenAI adds to every other chunk — so the client gets the bytes it would
//! have got.
//!
//! Events are rewritten whole: bytes up to the last event boundary in hand
//! go out at once, and only an event split across reads waits for its end.
//! A chunk without `"usage"` in it passes through as the same buffer. The
//! field is matched as JSON structure: inside a JSON string every quote is
//! escaped, so the text `"usage":null` cannot come from content.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

/// The field forms removed, each with its separating comma.
const NULL_FIELDS: [&[u8]; 4] = [
    b",\"usage\":null",
    b",\"usage\": null",
    b"\"usage\":null,",
    b"\"usage\": null,",
];

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Where the last complete event in `data` ends (after its blank line).
fn last_boundary(data: &[u8]) -> Option<usize> {
    let lf = data.windows(2).rposition(|w| w == b"\n\n").map(|at| at + 2);
    let crlf = data
        .windows(3)
        .rposition(|w| w == b"\n\r\n")
        .map(|at| at + 3);
    lf.max(crlf)
}

/// One event without the usage traces; `None` for the usage chunk itself.
fn rewrite_event(event: &[u8]) -> Option<Vec<u8>> {
    if find(event, b"\"usage\":{").is_some() || find(event, b"\"usage\": {").is_some() {
        return None;
    }
    let mut out = event.to_vec();
    for field in NULL_FIELDS {
        while let Some(at) = find(&out, field) {
            out.drain(at..at + field.len());
        }
    }
    Some(out)
}

/// Complete events, rewritten; the same buffer when nothing changes.
fn rewrite(events: Bytes) -> Bytes {
    if find(&events, b"\"usage\"").is_none() {
        return events;
    }
    let mut out = Vec::with_capacity(events.len());
    let mut rest = &events[..];
    while !rest.is_empty() {
        let end = rest
            .windows(2)
            .position(|w| w == b"\n\n")
            .map_or(rest.len(), |at| at + 2);
        let end = match rest.windows(3).position(|w| w == b"\n\r\n") {
            Some(at) if at + 3 < end => at + 3,
            _ => end,
        };
        let (event, tail) = rest.split_at(end);
        if let Some(kept) = rewrite_event(event) {
            out.extend_from_slice(&kept);
        }
        rest = tail;
    }
    Bytes::from(out)
}

pin_project_lite::pin_project! {
    /// `inner` without the usage llmproxy added.
    pub struct StripUsage<B> {
        #[pin]
        inner: B,
        pending: BytesMut,
    }
}

impl<B> StripUsage<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            pending: BytesMut::new(),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for StripUsage<B> {
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
                    let out = rewrite(complete);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None if this.pending.is_empty() => return Poll::Ready(None),
                None => {
                    let rest = rewrite(this.pending.split().freeze());
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
        StripUsage::new(channel)
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

    #[tokio::test]
    async fn a_stream_without_usage_passes_unchanged() {
        let out = strip(vec![WITHOUT.as_bytes()]).await;
        assert_eq!(String::from_utf8(out).unwrap(), WITHOUT);
    }
}
