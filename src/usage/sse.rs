//! An incremental scanner for OpenAI-style event streams: fed the bytes as
//! they pass (any split), it finds the `data:` lines, keeps the `usage` of
//! the chunk that carries one, and counts the content chunks (the estimate
//! of completion tokens when the usage never comes).
//!
//! Only a line that mentions `"usage"` is parsed as JSON, and only the
//! first chunk is parsed for its `model`; every other line costs a scan.

use super::{Answer, Tokens};

/// Longest line kept while waiting for its end; a longer one is skipped
/// (no usage chunk is anywhere near this size).
const MAX_LINE: usize = 1024 * 1024;

/// Scanner state between chunks.
#[derive(Debug, Default)]
pub struct Scanner {
    /// The current line's bytes so far, when it spans chunks.
    partial: Vec<u8>,
    /// The current line is over [`MAX_LINE`]: skipped to its end.
    skipping: bool,
    /// `data:` events other than `[DONE]` and the usage chunk.
    content: u64,
    usage: Option<Tokens>,
    model: Option<String>,
}

/// Built once: building a searcher costs more than searching a line.
static USAGE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));

impl Scanner {
    /// Feeds the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) {
        while let Some(end) = memchr::memchr(b'\n', data) {
            let (line, rest) = data.split_at(end);
            data = &rest[1..];
            if self.skipping {
                self.skipping = false;
                continue;
            }
            if self.partial.is_empty() {
                self.line(line);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.line(&whole);
                whole.clear();
                self.partial = whole;
            }
        }
        if !data.is_empty() && !self.skipping {
            if self.partial.len() + data.len() > MAX_LINE {
                self.partial.clear();
                self.skipping = true;
            } else {
                self.partial.extend_from_slice(data);
            }
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(payload) = line.strip_prefix(b"data:") else {
            return;
        };
        let payload = payload.trim_ascii();
        if payload.is_empty() || payload == b"[DONE]" {
            return;
        }
        if self.model.is_none() {
            self.model = Answer::model_in(payload);
        }
        if USAGE.find(payload).is_some()
            && let Some(usage) = Answer::usage_in(payload)
        {
            self.usage = Some(self.usage.map_or(usage, |earlier| earlier.merge(usage)));
            return;
        }
        self.content += 1;
    }

    /// Content chunks seen (usage and `[DONE]` excluded).
    pub fn content_events(&self) -> u64 {
        self.content
    }

    /// The stream's model and usage, if a chunk carried them.
    pub fn into_answer(self) -> Option<Answer> {
        Some(Answer {
            model: self.model,
            usage: self.usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn usage_is_found_at_every_split() {
        let bytes = STREAM.as_bytes();
        for split in 0..bytes.len() {
            let mut scanner = Scanner::default();
            scanner.feed(&bytes[..split]);
            scanner.feed(&bytes[split..]);
            assert_eq!(scanner.content_events(), 2, "split at {split}");
            let answer = scanner.into_answer().unwrap();
            assert_eq!(answer.model.as_deref(), Some("gpt-4o"));
            let usage = answer.usage.unwrap();
            assert_eq!((usage.prompt_tokens, usage.completion_tokens), (9, 2));
        }
    }

    #[test]
    fn a_stream_without_usage_counts_its_content_chunks() {
        let mut scanner = Scanner::default();
        for byte in STREAM
            .lines()
            .take(4)
            .collect::<Vec<_>>()
            .join("\n")
            .bytes()
        {
            scanner.feed(&[byte]);
        }
        scanner.feed(b"\n");
        assert_eq!(scanner.content_events(), 2);
        assert!(scanner.into_answer().unwrap().usage.is_none());
    }

    #[test]
    fn an_overlong_line_is_skipped_not_kept() {
        let mut scanner = Scanner::default();
        scanner.feed(b"data: ");
        scanner.feed(&vec![b'x'; MAX_LINE + 1]);
        assert!(scanner.partial.is_empty());
        scanner.feed(b"\ndata: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n");
        assert_eq!(
            scanner.into_answer().unwrap().usage.unwrap().prompt_tokens,
            1
        );
    }
}
