//! The access line written straight into the batched log buffer, in the
//! same text and JSON shapes `tracing-subscriber` gives every other line.
//!
//! Going through `tracing`'s formatter cost about 17,000 instructions per
//! request (22 % of the whole proxy path, `bench/callgrind.sh` with
//! `LOG_LEVEL=info`): a field visitor and `fmt` per field. Here each field is
//! appended to a reused per-thread buffer by hand. The binary installs a
//! sink at start ([`install`]); without one (the library used on its own, as
//! in the in-process tests) the rendered line is the message of a `tracing`
//! event, so it still reaches whatever subscriber is set.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use super::log_writer::BatchedStderr;

/// Where access lines go, decided once at start.
pub struct AccessSink {
    json: bool,
    ansi: bool,
    /// Whether the log filter lets `llmproxy::access` lines through at info.
    enabled: bool,
    writer: BatchedStderr,
}

static SINK: OnceLock<AccessSink> = OnceLock::new();

/// Sends access lines to `writer` from now on; `enabled` is what the log
/// filter says of `llmproxy::access` at info (filters do not change at run
/// time). A second call is ignored.
pub fn install(json: bool, ansi: bool, enabled: bool, writer: BatchedStderr) {
    let _ = SINK.set(AccessSink {
        json,
        ansi,
        enabled,
        writer,
    });
}

/// Writes one access line with `fields` (name, value; `None` values left
/// out): to the installed sink, or, without one (the library used without
/// the binary, as in the in-process tests), as a `tracing` event whose
/// message is the rendered text line.
pub(super) fn write(fields: &[(&str, Option<Value<'_>>)]) {
    match SINK.get() {
        Some(sink) => sink.write(fields),
        None => {
            let mut line = Vec::new();
            fields_text(&mut line, fields, false);
            tracing::info!(target: "llmproxy::access", "{}", String::from_utf8_lossy(&line));
        }
    }
}

/// A field's value.
pub(super) enum Value<'a> {
    Text(&'a str),
    Number(u64),
}

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

impl AccessSink {
    /// Writes one line with `fields` (name, value), `None` values left out.
    pub(super) fn write(&self, fields: &[(&str, Option<Value<'_>>)]) {
        if !self.enabled {
            return;
        }
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            if self.json {
                self.json_line(&mut line, fields);
            } else {
                self.text_line(&mut line, fields);
            }
            self.writer.write_line(&line);
        });
    }

    fn text_line(&self, out: &mut Vec<u8>, fields: &[(&str, Option<Value<'_>>)]) {
        if self.ansi {
            out.extend_from_slice(b"\x1b[2m");
        }
        timestamp(out);
        if self.ansi {
            out.extend_from_slice(
                b"\x1b[0m \x1b[32m INFO\x1b[0m \x1b[2mllmproxy::access\x1b[0m\x1b[2m:\x1b[0m",
            );
        } else {
            out.extend_from_slice(b"  INFO llmproxy::access:");
        }
        fields_text(out, fields, self.ansi);
        out.push(b'\n');
    }

    fn json_line(&self, out: &mut Vec<u8>, fields: &[(&str, Option<Value<'_>>)]) {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(out);
        out.extend_from_slice(b"\",\"level\":\"INFO\"");
        for (name, value) in fields {
            let Some(value) = value else { continue };
            out.extend_from_slice(b",\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            match value {
                Value::Number(n) => number(out, *n),
                Value::Text(text) => json_quoted(out, text),
            }
        }
        out.extend_from_slice(b",\"target\":\"llmproxy::access\"}\n");
    }
}

/// ` name=value` for each present field, as tracing's text format writes them.
fn fields_text(out: &mut Vec<u8>, fields: &[(&str, Option<Value<'_>>)], ansi: bool) {
    for (name, value) in fields {
        let Some(value) = value else { continue };
        out.push(b' ');
        if ansi {
            out.extend_from_slice(b"\x1b[3m");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\x1b[0m\x1b[2m=\x1b[0m");
        } else {
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
        }
        match value {
            Value::Number(n) => number(out, *n),
            Value::Text(text) => debug_quoted(out, text),
        }
    }
}

/// Whether `text` can be written between quotes as it is (no quote,
/// backslash or control character): the common case, checked in one pass.
fn plain(text: &str) -> bool {
    text.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b != 0x7f)
}

/// `text` as Rust's `{:?}` writes a string (what tracing's text format does).
fn debug_quoted(out: &mut Vec<u8>, text: &str) {
    if plain(text) {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        use std::io::Write;
        let _ = write!(out, "{text:?}");
    }
}

/// `text` as a JSON string.
fn json_quoted(out: &mut Vec<u8>, text: &str) {
    if plain(text) {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, text);
    }
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(crate::stream::decimal(n, &mut [0; 20]));
}

/// `n` in at least `width` digits.
fn padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut rest = n;
    let mut i = digits.len();
    while rest > 0 && i > 0 {
        i -= 1;
        digits[i] = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    let start = i.min(digits.len() - width);
    out.extend_from_slice(&digits[start..]);
}

/// Now, as RFC 3339 UTC with microseconds: `2026-11-30T03:13:31.183862Z`
/// (the civil date from days since the epoch, by Howard Hinnant's algorithm).
fn timestamp(out: &mut Vec<u8>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let days = secs / 86_400;
    let of_day = secs % 86_400;
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    padded(out, u64::try_from(year).unwrap_or(0), 4);
    out.push(b'-');
    padded(out, month as u64, 2);
    out.push(b'-');
    padded(out, day as u64, 2);
    out.push(b'T');
    padded(out, of_day / 3600, 2);
    out.push(b':');
    padded(out, of_day / 60 % 60, 2);
    out.push(b':');
    padded(out, of_day % 60, 2);
    out.push(b'.');
    padded(out, u64::from(now.subsec_micros()), 6);
    out.push(b'Z');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let mut out = Vec::new();
        timestamp(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.len(), 27, "{text}");
        let parsed: Vec<&str> = text.split(['-', 'T', ':', '.', 'Z']).collect();
        assert!(parsed[0].parse::<u32>().unwrap() >= 2024, "{text}");
        assert!(
            (1..=12).contains(&parsed[1].parse::<u32>().unwrap()),
            "{text}"
        );
        assert!(
            (1..=31).contains(&parsed[2].parse::<u32>().unwrap()),
            "{text}"
        );
    }

    #[test]
    fn strings_are_quoted_like_debug_and_json() {
        for text in [
            "plain",
            "with \"quote\"",
            "back\\slash",
            "new\nline",
            "tab\t",
            "ünï",
        ] {
            let mut out = Vec::new();
            debug_quoted(&mut out, text);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{text:?}"));
            let mut out = Vec::new();
            json_quoted(&mut out, text);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(text).unwrap()
            );
        }
    }

    #[test]
    fn numbers_and_padding() {
        let mut out = Vec::new();
        number(&mut out, 0);
        out.push(b' ');
        number(&mut out, 18_446_744_073_709_551_615);
        out.push(b' ');
        padded(&mut out, 7, 2);
        out.push(b' ');
        padded(&mut out, 42, 6);
        assert_eq!(out, b"0 18446744073709551615 07 000042");
    }
}
