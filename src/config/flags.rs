//! The quick start without a file: `--upstream URL` and `--header` flags.

use super::*;

/// The quick-start configuration: `--upstream URL` and `--header 'Name: value'` flags.
pub fn from_flags(
    upstream: &str,
    headers: &[String],
    env: &dyn Lookup,
) -> Result<Config, ConfigError> {
    let origin = "command line";
    let mut default_headers = Vec::with_capacity(headers.len());
    for (i, flag) in headers.iter().enumerate() {
        // Never shown: a malformed flag is most likely a key typed without its name.
        let Some((name, value)) = flag.split_once(':') else {
            return Err(invalid(
                origin,
                "--header",
                format!(
                    "header flag #{} is not `Name: value` (e.g. -H 'Authorization: Bearer ${{OPENAI_API_KEY}}')",
                    i + 1
                ),
            ));
        };
        default_headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let file = FileConfig {
        listen: default_listen(),
        upstream: UpstreamFile {
            base_url: upstream.to_owned(),
            default_headers: Ordered(default_headers),
            timeouts: TimeoutsFile::default(),
            max_concurrent: None,
            http2: false,
            provider: Default::default(),
            anthropic_version: None,
            default_max_tokens: None,
            api_version: None,
        },
        upstreams: Ordered::default(),
        models: Ordered::default(),
        admin: AdminFile::default(),
        limits: LimitsFile::default(),
        shutdown_timeout: default_shutdown_timeout(),
        log: LogFile::default(),
        store: StoreFile::default(),
        keys: KeysFile::default(),
        prices: Ordered::default(),
        redis: None,
    };
    resolve(file, origin, env).map_err(|err| {
        // The URL typed on the command line may carry a key in its query.
        let secrets = Secrets::default();
        secrets.add(upstream);
        if let Some((_, query)) = upstream.split_once('?') {
            secrets.add(query);
        }
        err.scrubbed(&secrets)
    })
}
