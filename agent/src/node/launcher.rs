//! Carrying out a reload's launch: install a pushed config (staged beside the live file, checked
//! with a bounded `haproxy -c`, renamed into place with the previous file kept as last good), then
//! start the worker. A pushed config whose worker fails to start is renamed back on disk.

use crate::haproxy::install;
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
) -> Result<Launched, ReloadError> {
    let Some(pushed) = pushed else {
        return Ok(launch::launch(spec, takeover, draining).await?);
    };
    let config = spec.config.clone();
    let staged = blocking(move || install::stage(&config, pushed.text.as_bytes())).await?;
    if let Err(e) = launch::check_config(&spec.binary, &staged, &spec.env, spec.check_timeout).await
    {
        let config = spec.config.clone();
        let _ = tokio::task::spawn_blocking(move || install::discard(&config)).await;
        return Err(ReloadError::ConfigInvalid(e));
    }
    let config = spec.config.clone();
    blocking(move || install::install(&config)).await?;
    match launch::launch(spec, takeover, draining).await {
        Ok(l) => Ok(l),
        Err(e) => {
            // Leave the config that the running worker was started from, so a crash restart
            // does not pick up a config that cannot start.
            let config = spec.config.clone();
            if let Err(re) = blocking(move || install::restore(&config)).await {
                tracing::error!("{re}; the pushed config that failed to start is still in place");
            }
            Err(e.into())
        }
    }
}

/// Runs file I/O on the blocking pool.
async fn blocking<T>(
    f: impl FnOnce() -> Result<T, install::InstallError> + Send + 'static,
) -> Result<T, ReloadError>
where
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ReloadError::Install(format!("the install task failed: {e}")))?
        .map_err(|e| ReloadError::Install(e.to_string()))
}
