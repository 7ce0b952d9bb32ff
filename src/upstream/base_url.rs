//! An upstream base URL, parsed and checked once at load, and joined to
//! each request path in the OpenAI SDK convention.

use http::uri::{Authority, PathAndQuery, Scheme, Uri};

/// An upstream base URL, split once so joining a request path is one allocation.
#[derive(Debug, Clone)]
pub struct BaseUrl {
    scheme: Scheme,
    authority: Authority,
    /// The path prefix without a trailing slash (`""` for a bare host).
    path: String,
}

impl BaseUrl {
    /// Parses and checks a base URL: http(s), a host, no credentials, no query.
    ///
    /// Messages never repeat the URL: it may have come from a `${VAR}` that
    /// holds a key, or carry one in its query.
    pub fn parse(text: &str) -> Result<Self, String> {
        const EXAMPLE: &str =
            "write it as http(s)://HOST[:PORT]/PATH, e.g. https://api.openai.com/v1";
        let uri: Uri = text.trim().parse().map_err(|_| {
            if text.trim().contains("://") {
                format!("is not a valid URL; {EXAMPLE}")
            } else {
                format!("is not a URL with a scheme; {EXAMPLE}")
            }
        })?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("has no scheme (http:// or https://); {EXAMPLE}"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!("has a scheme other than http or https; {EXAMPLE}"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("has no host; {EXAMPLE}"))?;
        if authority.as_str().contains('@') {
            return Err(
                "has credentials in it, which are not supported; put them in default_headers"
                    .into(),
            );
        }
        if authority.host().is_empty() {
            return Err(format!("has no host; {EXAMPLE}"));
        }
        if uri.query().is_some() {
            return Err(
                "has a query string, which is not supported; put keys in default_headers".into(),
            );
        }
        Ok(Self {
            scheme,
            authority,
            path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The upstream target for a client request, in the OpenAI SDK
    /// convention: the client's `/v1` prefix is replaced by the base URL's
    /// path, the rest of the path and the query are kept as sent (still
    /// percent-encoded).
    ///
    /// `https://api.openai.com/v1` + `/v1/chat/completions?x=1`
    /// → `/v1/chat/completions?x=1` (origin form, what HTTP/1.1 sends;
    /// [`BaseUrl::absolute`] makes the absolute form HTTP/2 needs).
    pub fn join(&self, request: &Uri) -> Result<PathAndQuery, http::uri::InvalidUri> {
        let path = request.path();
        let rest = path.strip_prefix("/v1").unwrap_or(path);
        let query = request.query();
        let mut joined = String::with_capacity(
            self.path.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 1,
        );
        joined.push_str(&self.path);
        joined.push_str(rest);
        if joined.is_empty() {
            joined.push('/');
        }
        if let Some(query) = query {
            joined.push('?');
            joined.push_str(query);
        }
        PathAndQuery::try_from(joined)
    }

    /// `path` on this upstream, in absolute form.
    pub fn absolute(&self, path: PathAndQuery) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path);
        // Scheme, authority and path were each valid on their own, and a
        // scheme with an authority is always a valid whole.
        Uri::from_parts(parts).unwrap_or_default()
    }

    /// `scheme://authority`: what a connection is made to.
    pub fn origin(&self) -> Uri {
        self.absolute(PathAndQuery::from_static("/"))
    }

    /// Whether requests go over TLS.
    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    /// Whether the path has a segment like `v1`, `v1beta` or `v2` (OpenAI-style
    /// APIs are versioned; a bare host is usually a forgotten `/v1`).
    pub fn has_version_segment(&self) -> bool {
        self.path.split('/').any(|segment| {
            segment
                .strip_prefix('v')
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
    }

    /// `host:port` as configured.
    pub fn authority(&self) -> &str {
        self.authority.as_str()
    }

    /// The URL as configured (it holds no credentials: `parse` refuses them).
    pub fn display(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.path)
    }
}
