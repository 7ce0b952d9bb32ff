//! llmproxy's own request ids: unique, unguessable-looking, made without a
//! lock, a syscall or an allocation.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

/// llmproxy's id for one request: 32 hex digits, kept inline (no allocation).
#[derive(Clone, Copy)]
pub struct RequestId(pub(super) [u8; 32]);

impl RequestId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only hex digits are ever written into it.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Makes unique, unguessable-looking request ids without a lock or a syscall.
///
/// An id is 32 hex digits: the Unix time in milliseconds (12 digits), a
/// per-process random part (4), and a counter pushed through a bijective
/// mixer (16; so ids never repeat within a process and do not reveal the
/// request count). Ids sort by time, so the usage store's index on them
/// grows at its end instead of at random pages (a random key made SQLite's
/// inserts slow down as the table grew).
pub struct RequestIds {
    prefix: u64,
    key: u64,
    counter: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let random = std::collections::hash_map::RandomState::new();
        Self {
            prefix: random.hash_one(0x5eed_u64),
            key: random.hash_one(0xfeed_u64),
            counter: AtomicU64::new(0),
        }
    }
}

impl RequestIds {
    /// The next id.
    pub fn next_id(&self) -> RequestId {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mixed = splitmix64(n.wrapping_add(self.key));
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut text = [0u8; 32];
        hex(ms << 16 | (self.prefix & 0xffff), &mut text[..16]);
        hex(mixed, &mut text[16..]);
        RequestId(text)
    }
}

/// splitmix64's finalizer: a bijection on u64, so distinct inputs stay distinct.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn hex(value: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in out.iter_mut().enumerate() {
        let shift = 60 - 4 * i;
        *byte = DIGITS[((value >> shift) & 0xf) as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique_hex_of_fixed_length() {
        let ids = RequestIds::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = ids.next_id();
            let text = id.as_str().to_owned();
            assert_eq!(text.len(), 32);
            assert!(text.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(seen.insert(text), "duplicate id");
        }
    }

    #[test]
    fn ids_sort_by_time() {
        let ids = RequestIds::default();
        let first = ids.next_id().as_str().to_owned();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = ids.next_id().as_str().to_owned();
        assert!(first[..12] < later[..12], "{first} {later}");
    }

    #[test]
    fn two_processes_get_different_prefixes() {
        let a = RequestIds::default().next_id();
        let b = RequestIds::default().next_id();
        assert_ne!(a.as_str(), b.as_str());
    }
}
