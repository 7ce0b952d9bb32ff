//! `upstream` / `upstreams.NAME`: base URL, default headers, timeouts.

use super::*;

/// One upstream provider.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// Base URL in the OpenAI SDK convention, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Headers set on every upstream request, replacing the client's.
    #[serde(default)]
    pub default_headers: HeaderList,
    /// Upstream timeouts.
    #[serde(default)]
    pub timeouts: TimeoutsFile,
    /// Most requests in flight to it at once, over every model routed to it.
    #[serde(default)]
    pub max_concurrent: Option<usize>,
    /// Speak HTTP/2 to an `http://` upstream without asking first (prior
    /// knowledge, h2c): many streams share one connection. `https://`
    /// upstreams negotiate HTTP/2 by ALPN whatever this says.
    #[serde(default)]
    pub http2: bool,
    /// The API it speaks: `openai` (the default; passed through byte-exact),
    /// `anthropic` (the Messages API) or `gemini` (`generateContent`), both
    /// translated to and from Chat Completions.
    #[serde(default)]
    pub provider: ProviderName,
    /// `anthropic-version` sent to an `anthropic` upstream (`2023-06-01`
    /// unless set).
    #[serde(default)]
    pub anthropic_version: Option<String>,
    /// `max_tokens` for an `anthropic` upstream when the client sets none
    /// (Anthropic requires one; 4096 unless set).
    #[serde(default)]
    pub default_max_tokens: Option<u64>,
    /// `api-version` for an `azure` upstream (`2024-10-21` unless set).
    #[serde(default)]
    pub api_version: Option<String>,
}

/// `provider`: the wire format an upstream speaks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderName {
    /// The OpenAI API.
    #[default]
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
    /// Google's Gemini API (`generateContent`).
    Gemini,
    /// Azure OpenAI's classic deployments
    /// (`/openai/deployments/{deployment}/…?api-version=…`).
    Azure,
}

/// The validated provider of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provider {
    /// The OpenAI API: passed through.
    OpenAi,
    /// Anthropic's Messages API: translated.
    Anthropic(AnthropicSettings),
    /// Google's Gemini API: translated.
    Gemini,
    /// Azure OpenAI deployments: the path rewritten, the bytes passed through.
    Azure {
        /// `api-version` on every request.
        api_version: String,
    },
}

/// Settings of an `anthropic` upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnthropicSettings {
    /// `anthropic-version` sent upstream.
    pub version: HeaderValue,
    /// `max_tokens` when the client sets none.
    pub default_max_tokens: u64,
}

/// Upstream timeouts. LLM answers can take minutes, so the defaults are long.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsFile {
    /// TCP + TLS connect.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// From sending the request to receiving response headers (a non-streamed
    /// completion only answers when it is finished).
    #[serde(with = "humantime_serde")]
    pub response_headers: Duration,
    /// Longest silence between two body chunks.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// The whole exchange, from sending to the last byte (none by default:
    /// long generations are legitimate).
    #[serde(with = "humantime_serde")]
    pub total: Option<Duration>,
}

impl Default for TimeoutsFile {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            response_headers: Duration::from_secs(600),
            idle: Duration::from_secs(300),
            total: None,
        }
    }
}

/// A validated upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Its name: `default` for the single-upstream shape.
    pub name: String,
    /// Where requests are sent.
    pub base_url: BaseUrl,
    /// The `Host` header for it, made once.
    pub host: HeaderValue,
    /// Headers set on every request, values marked sensitive.
    pub default_headers: DefaultHeaders,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Most routed requests in flight at once.
    pub max_concurrent: Option<usize>,
    /// HTTP/2 with prior knowledge (`http://` only).
    pub http2: bool,
    /// The API it speaks.
    pub provider: Provider,
}

impl Upstream {
    /// Whether connections start in HTTP/2 without negotiating it.
    pub fn http2_prior_knowledge(&self) -> bool {
        self.http2 && !self.base_url.is_https()
    }
}

/// Validated upstream timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP + TLS connect.
    pub connect: Duration,
    /// Until response headers arrive.
    pub response_headers: Duration,
    /// Longest gap between two body chunks.
    pub idle: Duration,
    /// The whole exchange, if bounded.
    pub total: Option<Duration>,
}

impl Timeouts {
    /// These timeouts with a model's overrides applied.
    pub fn with(self, model: ModelTimeouts) -> Self {
        Self {
            connect: self.connect,
            response_headers: model.response_headers.unwrap_or(self.response_headers),
            idle: model.idle.unwrap_or(self.idle),
            total: model.total.or(self.total),
        }
    }
}

/// Validates one upstream; `field` is its path in the file (`upstream`, `upstreams.NAME`).
pub(super) fn resolve_upstream(
    name: &str,
    field: &str,
    upstream: UpstreamFile,
    origin: &str,
    env: &dyn Lookup,
    warnings: &mut Vec<String>,
) -> Result<Upstream, ConfigError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(invalid(
            origin,
            field,
            "upstream names use letters, digits, `-`, `_` and `.` (they are sent in x-llmproxy-upstream)",
        ));
    }
    let url_field = format!("{field}.base_url");
    let base_url = if env.placeholder() && upstream.base_url.contains("${") {
        // --no-env: the URL comes from a variable; only its shape is known.
        BaseUrl::parse("http://no-env.invalid/v1")
    } else {
        interpolate(&upstream.base_url, env).and_then(|url| BaseUrl::parse(&url))
    }
    .map_err(|m| invalid(origin, &url_field, m))?;
    if !base_url.has_version_segment() && upstream.provider != ProviderName::Azure {
        warnings.push(format!(
            "{url_field}: has no version segment such as /v1, so /v1/chat/completions is sent to \
             its path + /chat/completions; OpenAI-compatible servers usually want a base URL ending in /v1"
        ));
    }

    let mut headers: Vec<(HeaderName, HeaderValue)> =
        Vec::with_capacity(upstream.default_headers.0.len());
    for (header, value) in &upstream.default_headers.0 {
        let header_field = format!("{field}.default_headers.{header}");
        let header_name = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
            invalid(
                origin,
                &format!("{field}.default_headers"),
                format!(
                    "entry #{} does not have a valid header name (letters, digits, `-`)",
                    headers.len() + 1
                ),
            )
        })?;
        if !crate::headers::may_be_default(&header_name) {
            return Err(invalid(
                origin,
                &header_field,
                "describes the connection or the message framing (hop-by-hop, Host, \
                 Content-Length, Expect) and cannot be set for the upstream",
            ));
        }
        if headers.iter().any(|(n, _)| *n == header_name) {
            return Err(invalid(
                origin,
                &header_field,
                "is given twice (header names are case-insensitive)",
            ));
        }
        let value = interpolate(value, env).map_err(|m| invalid(origin, &header_field, m))?;
        let bare = value.trim();
        if bare.is_empty()
            || ["bearer", "basic", "token"].contains(&bare.to_ascii_lowercase().as_str())
        {
            warnings.push(format!(
                "{header_field}: the value is empty or only an auth scheme; if it names a variable, \
                 check it is set (a flag in double quotes is expanded by the shell: use single quotes)"
            ));
        }
        // Never echo the value: it is usually a key.
        let header_value = HeaderValue::from_str(&value).map_err(|_| {
            invalid(
                origin,
                &header_field,
                "the value contains characters not allowed in a header (control characters or newlines)",
            )
        })?;
        headers.push((header_name, header_value));
    }

    let timeouts = upstream.timeouts;
    for (name, value, longest) in [
        ("connect", Some(timeouts.connect), max::HOUR),
        (
            "response_headers",
            Some(timeouts.response_headers),
            max::DAY,
        ),
        ("idle", Some(timeouts.idle), max::DAY),
        ("total", timeouts.total, max::WEEK),
    ] {
        if let Some(value) = value {
            duration(origin, &format!("{field}.timeouts.{name}"), value, longest)?;
        }
    }
    if upstream.max_concurrent == Some(0) {
        return Err(invalid(
            origin,
            &format!("{field}.max_concurrent"),
            "must be at least 1",
        ));
    }
    if upstream.http2 && base_url.is_https() {
        return Err(invalid(
            origin,
            &format!("{field}.http2"),
            "is for http:// upstreams; https:// ones negotiate HTTP/2 by ALPN already",
        ));
    }
    let host = HeaderValue::from_str(base_url.authority())
        .map_err(|_| invalid(origin, &url_field, "the host is not a valid Host header"))?;
    let anthropic_only = |set: bool, what: &str| {
        if set && upstream.provider != ProviderName::Anthropic {
            Err(invalid(
                origin,
                &format!("{field}.{what}"),
                "applies to `provider: anthropic` upstreams only",
            ))
        } else {
            Ok(())
        }
    };
    anthropic_only(upstream.anthropic_version.is_some(), "anthropic_version")?;
    anthropic_only(upstream.default_max_tokens.is_some(), "default_max_tokens")?;
    if upstream.api_version.is_some() && upstream.provider != ProviderName::Azure {
        return Err(invalid(
            origin,
            &format!("{field}.api_version"),
            "applies to `provider: azure` upstreams only",
        ));
    }
    let provider = match upstream.provider {
        ProviderName::Openai => Provider::OpenAi,
        ProviderName::Gemini => Provider::Gemini,
        ProviderName::Azure => {
            let api_version = upstream
                .api_version
                .clone()
                .unwrap_or_else(|| "2024-10-21".to_owned());
            if api_version.is_empty()
                || !api_version
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return Err(invalid(
                    origin,
                    &format!("{field}.api_version"),
                    "must be an Azure API version such as 2024-10-21",
                ));
            }
            Provider::Azure { api_version }
        }
        ProviderName::Anthropic => {
            let version = upstream
                .anthropic_version
                .as_deref()
                .unwrap_or("2023-06-01");
            let version = HeaderValue::from_str(version).map_err(|_| {
                invalid(
                    origin,
                    &format!("{field}.anthropic_version"),
                    "is not a valid header value (e.g. 2023-06-01)",
                )
            })?;
            let default_max_tokens = upstream.default_max_tokens.unwrap_or(4096);
            if default_max_tokens == 0 {
                return Err(invalid(
                    origin,
                    &format!("{field}.default_max_tokens"),
                    "must be at least 1",
                ));
            }
            Provider::Anthropic(AnthropicSettings {
                version,
                default_max_tokens,
            })
        }
    };
    Ok(Upstream {
        provider,
        max_concurrent: upstream.max_concurrent,
        http2: upstream.http2,
        name: name.to_owned(),
        host,
        base_url,
        default_headers: DefaultHeaders::new(headers),
        timeouts: Timeouts {
            connect: timeouts.connect,
            response_headers: timeouts.response_headers,
            idle: timeouts.idle,
            total: timeouts.total,
        },
    })
}
