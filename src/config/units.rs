//! Value types of the file format: sizes, ordered mappings, and the
//! ceilings durations are checked against.

use super::*;

/// A size in bytes, written as a number or with a unit: `32MiB`, `512 KB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `1024`, `64KiB`, `32 MiB`, `1GB` (KB = 1000, KiB = 1024).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let number: u64 = digits
            .parse()
            .map_err(|_| "is not a size (e.g. 1048576, 512KiB, 32MiB)".to_owned())?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1000,
            "KiB" => 1 << 10,
            "MB" => 1000 * 1000,
            "MiB" => 1 << 20,
            "GB" => 1000 * 1000 * 1000,
            "GiB" => 1 << 30,
            _ => {
                return Err("unknown size unit (use B, KB, KiB, MB, MiB, GB or GiB)".to_owned());
            }
        };
        number
            .checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| "is too large".to_owned())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(text) => ByteSize::parse(&text).map_err(serde::de::Error::custom),
        }
    }
}

/// A YAML mapping of header name to value, kept in the order written.
pub type HeaderList = Ordered<String>;

/// A YAML mapping of names to values, kept in the order written (the order
/// of upstreams and models is meaningful: the first upstream is the default).
#[derive(Debug)]
pub struct Ordered<T>(pub Vec<(String, T)>);

impl<T> Default for Ordered<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a mapping of names to values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Ordered<T>, A::Error> {
                let mut list: Vec<(String, T)> = Vec::new();
                // A set beside the list: a linear check, even for 50,000 models.
                let mut seen = std::collections::HashSet::new();
                while let Some((key, value)) = map.next_entry::<String, T>()? {
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!("`{key}` is given twice")));
                    }
                    list.push((key, value));
                }
                Ok(Ordered(list))
            }
        }
        deserializer.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

/// The longest each duration may be: generous for any real deployment, and
/// far from where adding it to a clock could overflow.
pub(super) mod max {
    use std::time::Duration;
    pub const HOUR: Duration = Duration::from_secs(60 * 60);
    pub const DAY: Duration = Duration::from_secs(24 * 60 * 60);
    pub const WEEK: Duration = Duration::from_secs(7 * 24 * 60 * 60);
}

/// Checks that a duration is within `(0, max]`, naming the field.
pub(super) fn duration(
    origin: &str,
    field: &str,
    value: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    if value.is_zero() {
        return Err(invalid(origin, field, "must be greater than zero"));
    }
    if value > max {
        return Err(invalid(
            origin,
            field,
            format!(
                "is longer than the maximum of {}",
                humantime_serde::re::humantime::format_duration(max)
            ),
        ));
    }
    Ok(value)
}
