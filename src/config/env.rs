//! `${VAR}` interpolation through an injectable [`Lookup`], and the
//! [`Secrets`] every config error is scrubbed of.

use super::*;

/// Where configuration values that name `${VAR}` are looked up.
pub trait Lookup {
    /// The variable's value, or `None` when it is not set.
    fn get(&self, name: &str) -> Option<String>;

    /// Whether values are stand-ins (`check-config --no-env`): then a value
    /// built from `${VAR}` is not checked beyond its structure.
    fn placeholder(&self) -> bool {
        false
    }
}

/// `check-config --no-env`: every variable is "set" to a stand-in, so a
/// config's structure can be checked in CI without its real keys.
pub struct NoEnv;

impl Lookup for NoEnv {
    fn get(&self, _name: &str) -> Option<String> {
        Some("no-env-placeholder-value".to_owned())
    }

    fn placeholder(&self) -> bool {
        true
    }
}

/// The process environment.
pub struct Env;

impl Lookup for Env {
    fn get(&self, name: &str) -> Option<String> {
        #[expect(
            clippy::disallowed_methods,
            reason = "this is the one place the process environment is read"
        )]
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Lookup for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// Values that must never appear in an error: what `${VAR}` resolved to,
/// and header values as written. Values shorter than four characters are
/// not scrubbed (they would garble messages, and are no keys).
#[derive(Default)]
pub struct Secrets(std::cell::RefCell<Vec<String>>);

impl Secrets {
    pub(super) fn add(&self, value: &str) {
        let value = value.trim();
        if value.len() >= 4 {
            self.0.borrow_mut().push(value.to_owned());
        }
    }

    pub(super) fn scrub(&self, mut text: String) -> String {
        // Longest first, so a secret containing another is replaced whole.
        let mut secrets = self.0.borrow().clone();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for secret in &secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "*****");
            }
        }
        text
    }
}

/// A [`Lookup`] that remembers every value it hands out, for scrubbing.
pub(super) struct Recording<'a> {
    pub(super) env: &'a dyn Lookup,
    pub(super) secrets: &'a Secrets,
}

impl Lookup for Recording<'_> {
    fn get(&self, name: &str) -> Option<String> {
        let value = self.env.get(name)?;
        self.secrets.add(&value);
        Some(value)
    }

    fn placeholder(&self) -> bool {
        self.env.placeholder()
    }
}

/// Every `${NAME}` a value refers to (`$$` is an escaped `$`, not a reference).
fn variables(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            match tail.find('}') {
                Some(end) => {
                    found.push(&tail[..end]);
                    rest = &tail[end + 1..];
                }
                None => break,
            }
        } else {
            rest = after;
        }
    }
    found
}

/// All the variables the config needs that are not set, in one error, so a
/// user fixes them in one go rather than one `check-config` run each.
pub(super) fn check_variables(
    file: &FileConfig,
    origin: &str,
    env: &dyn Lookup,
) -> Result<(), ConfigError> {
    let mut fields: Vec<(String, &str)> = Vec::new();
    let upstreams = std::iter::once(("upstream".to_owned(), &file.upstream)).chain(
        file.upstreams
            .0
            .iter()
            .map(|(name, u)| (format!("upstreams.{name}"), u)),
    );
    for (field, upstream) in upstreams {
        fields.push((format!("{field}.base_url"), &upstream.base_url));
        for (name, value) in &upstream.default_headers.0 {
            fields.push((format!("{field}.default_headers.{name}"), value));
        }
    }
    if let Some(token) = &file.admin.token {
        fields.push(("admin.token".to_owned(), token));
    }
    if let Some(url) = &file.store.url {
        fields.push(("store.url".to_owned(), url));
    }
    if let Some(redis) = &file.redis {
        fields.push(("redis.url".to_owned(), &redis.url));
    }
    let mut missing: Vec<(String, &str)> = Vec::new();
    for (field, text) in &fields {
        for name in variables(text) {
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if valid && env.get(name).is_none() {
                missing.push((field.clone(), name));
            }
        }
    }
    match missing.as_slice() {
        [] => Ok(()),
        [(field, name)] => Err(invalid(
            origin,
            field,
            format!("environment variable {name} is not set"),
        )),
        several => Err(invalid(
            origin,
            "(environment)",
            format!(
                "{} environment variables are not set: {}",
                several.len(),
                several
                    .iter()
                    .map(|(field, name)| format!("{name} (for {field})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Replaces `${NAME}` with the variable's value; `$$` is a literal `$`.
///
/// Errors name the variable, never its value.
pub fn interpolate(text: &str, env: &dyn Lookup) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail
                .find('}')
                .ok_or_else(|| "`${` is not closed by `}`".to_owned())?;
            let name = &tail[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`${{{name}}}` is not a valid variable name (letters, digits and _)"
                ));
            }
            let value = env
                .get(name)
                .ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}
