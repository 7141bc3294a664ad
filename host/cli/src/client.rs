//! Calls to a running server's API, with the admin token when one is given.

use anyhow::{Context, Result, bail};

/// Where the server is and how to authenticate to it.
#[derive(clap::Args, Clone)]
pub(crate) struct ServerArgs {
    /// The server's address.
    #[arg(long, default_value = "http://127.0.0.1:8080", global = true)]
    pub server: String,
    /// The admin token (default: `STARLING_ADMIN_TOKEN` from the environment).
    #[arg(long, env = "STARLING_ADMIN_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

pub(crate) struct Client {
    base: reqwest::Url,
    token: Option<String>,
    pub http: reqwest::Client,
}

impl Client {
    pub(crate) fn new(args: &ServerArgs) -> Result<Client> {
        let base =
            reqwest::Url::parse(&args.server).with_context(|| format!("--server: `{}` is not a URL", args.server))?;
        if base.cannot_be_a_base() {
            bail!("--server: `{}` cannot take a path", args.server);
        }
        Ok(Client { base, token: args.token.clone().filter(|t| !t.is_empty()), http: reqwest::Client::new() })
    }

    /// The URL of the API path made of `segments` (each escaped).
    pub(crate) fn url<'a>(&self, segments: impl IntoIterator<Item = &'a str>) -> reqwest::Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("checked in new").pop_if_empty().extend(segments);
        url
    }

    pub(crate) fn request(&self, method: reqwest::Method, url: reqwest::Url) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends `request` and reads its JSON answer; an error status becomes an error with the
    /// server's message.
    pub(crate) async fn json(&self, request: reqwest::RequestBuilder) -> Result<serde_json::Value> {
        let request = request.build()?;
        let url = request.url().clone();
        let response = self.http.execute(request).await.with_context(|| format!("calling {url}"))?;
        let status = response.status();
        // A cluster node answering from its own copy while no node serves says so: the answer
        // may lack the latest writes.
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        if header("x-starling-answered-from") == "copy" {
            eprintln!(
                "note: answered from node {}'s copy of the state, through stream position {} ({})",
                header("x-starling-node"),
                header("x-starling-copy-position"),
                header("x-starling-copy-reason")
            );
        }
        let text = response.text().await.with_context(|| format!("reading the answer of {url}"))?;
        let body: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        if !status.is_success() {
            let reason = body["error"].as_str().map_or_else(|| body.to_string(), str::to_string);
            bail!("{status}: {reason}");
        }
        Ok(body)
    }
}
