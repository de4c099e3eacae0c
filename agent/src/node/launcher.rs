//! Carrying out a reload's launch: install a pushed config (checked with `haproxy -c` first, the
//! previous file kept as last good), then start the worker. A pushed config whose worker fails
//! to start is rolled back on disk.

use std::path::Path;

use crate::haproxy::launch::{self, LaunchError, LaunchSpec, Launched};
use crate::reload::PushedConfig;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("pushed config rejected by haproxy -c: {0}")]
    ConfigInvalid(String),
    #[error("cannot install the pushed config: {0}")]
    Install(String),
    #[error(transparent)]
    Launch(#[from] LaunchError),
}

pub async fn launch_with(
    spec: &LaunchSpec,
    takeover: bool,
    draining: bool,
    pushed: Option<PushedConfig>,
    backup: &Path,
) -> Result<Launched, ReloadError> {
    let Some(pushed) = pushed else {
        return Ok(launch::launch(spec, takeover, draining).await?);
    };
    let install = |e: std::io::Error| ReloadError::Install(e.to_string());
    let dir = spec.config.parent().unwrap_or(Path::new("."));
    let candidate = dir.join(format!(
        ".ebb-pushed-{}.cfg",
        &pushed.sha256[..12.min(pushed.sha256.len())]
    ));
    tokio::fs::write(&candidate, pushed.text.as_bytes())
        .await
        .map_err(install)?;
    if let Err(e) = launch::check_config(&spec.binary, &candidate, &spec.env).await {
        let _ = tokio::fs::remove_file(&candidate).await;
        return Err(ReloadError::ConfigInvalid(e));
    }
    tokio::fs::copy(&spec.config, backup)
        .await
        .map_err(install)?;
    tokio::fs::rename(&candidate, &spec.config)
        .await
        .map_err(install)?;
    match launch::launch(spec, takeover, draining).await {
        Ok(l) => Ok(l),
        Err(e) => {
            // Leave the config that the running worker was started from, so a crash restart
            // does not pick up a config that cannot start.
            if let Err(re) = tokio::fs::copy(backup, &spec.config).await {
                tracing::error!(
                    "cannot restore {} from {}: {re}",
                    spec.config.display(),
                    backup.display()
                );
            }
            Err(e.into())
        }
    }
}
