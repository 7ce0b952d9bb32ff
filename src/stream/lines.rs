//! Lines of an event stream as they arrive: every complete line handed on
//! at once (from the read's own bytes when it holds it whole), only a line
//! split across reads kept until its end.

/// The part of a line not yet ended.
#[derive(Debug, Default)]
pub struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    /// Calls `each` with every line `data` completes (its `\n` included).
    pub fn feed<E>(
        &mut self,
        mut data: &[u8],
        mut each: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Some(end) = memchr::memchr(b'\n', data) {
            let (line, rest) = data.split_at(end + 1);
            data = rest;
            if self.partial.is_empty() {
                each(line)?;
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                each(&whole)?;
            }
        }
        self.partial.extend_from_slice(data);
        Ok(())
    }

    /// What is left when the stream ends without a last `\n`.
    pub fn rest(&mut self) -> Option<Vec<u8>> {
        (!self.partial.is_empty()).then(|| std::mem::take(&mut self.partial))
    }
}
