//! Connecting to NATS with the auth form `[nats]` sets (creds file, nkey seed, token, or user
//! and password; TLS with a CA and a client certificate on top), retrying forever.

use std::time::Duration;

use anyhow::Context;
use async_nats::{Client, ConnectOptions};

use super::refusals::Refusals;
use crate::config::NatsConfig;

/// How often the agent pings its server. The client drops a connection with more than two pings
/// unanswered, so a server that died without closing the socket (its host gone, a partition) is
/// noticed within about three intervals, 6 s, where the default 60 s took three minutes; the
/// client then reconnects to another server of `nats.url` (or one the cluster told it of). A
/// PING is a few bytes: 10,000 agents make 5,000 a second across the cluster, next to nothing.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);

/// Builds the connect options shared by the agent and `ebb ctl`.
pub async fn options(cfg: &NatsConfig, name: &str) -> anyhow::Result<ConnectOptions> {
    let mut opts = ConnectOptions::new().name(name);
    if let Some(path) = &cfg.creds {
        opts = opts.credentials_file(path).await.with_context(|| {
            format!(
                "cannot read nats.creds {}; check the path and its permissions",
                path.display()
            )
        })?;
    }
    if let Some(path) = &cfg.nkey_seed {
        let seed = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read nats.nkey_seed {}; check the path and its permissions",
                path.display()
            )
        })?;
        opts = opts.nkey(seed.trim().to_string());
    }
    if let Some(token) = &cfg.token {
        opts = opts.token(token.clone());
    }
    if let (Some(user), Some(password)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(ca) = &cfg.tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if cfg.tls_required || cfg.tls_ca.is_some() || cfg.url.contains("tls://") {
        opts = opts.require_tls(true);
    }
    Ok(opts.connection_timeout(Duration::from_secs(5)))
}

/// Connects the agent: it retries the first connection in the background and reconnects forever,
/// logging each change of connection state once. Publishes the server refuses are recorded in
/// `refusals` for the publisher.
pub async fn connect_agent(
    cfg: &NatsConfig,
    node: &str,
    refusals: Refusals,
) -> anyhow::Result<Client> {
    let url = cfg.url.clone();
    let events = format!("{}.event.", cfg.prefix);
    let opts = options(cfg, &format!("ebb-agent {node}"))
        .await?
        .retry_on_initial_connect()
        .max_reconnects(None)
        .ping_interval(PING_INTERVAL)
        .event_callback(move |event| {
            let url = url.clone();
            let refusals = refusals.clone();
            let events = events.clone();
            async move {
                match event {
                    async_nats::Event::ServerError(async_nats::ServerError::Other(text)) => {
                        match refusals.note(&text) {
                            // The publisher reports refused events, with the event concerned.
                            Some(r) if r.subject.starts_with(&events) || !r.first => {
                                tracing::debug!("nats: {text}")
                            }
                            Some(r) => tracing::warn!(
                                "nats: the server refuses the agent's publishes to {}: {text}; \
                                 grant its user publish permission there (reported once)",
                                r.subject
                            ),
                            None => tracing::warn!("nats: server error: {text}"),
                        }
                    }
                    async_nats::Event::Connected => tracing::info!("nats: connected to {url}"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!("nats: disconnected from {url}; reconnecting, events wait in the outbox")
                    }
                    other => tracing::warn!("nats: {other}"),
                }
            }
        });
    opts.connect(servers(&cfg.url))
        .await
        .with_context(|| format!("cannot connect to NATS at {}", cfg.url))
}

/// `nats.url` may list several servers, comma-separated (an array in the TOML file is joined so at
/// load). The client picks among them at random and reconnects to another when one goes.
pub fn servers(url: &str) -> Vec<String> {
    url.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}
