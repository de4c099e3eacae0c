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
    /// master-worker mode: the master refused the reload, or did not answer.
    #[error("{0}")]
    Master(String),
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
    install_pushed(spec, pushed).await?;
    match launch::launch(spec, takeover, draining).await {
        Ok(l) => Ok(l),
        Err(e) => {
            restore(spec).await;
            Err(e.into())
        }
    }
}

/// Stages a pushed config beside the live file, checks it with a bounded `haproxy -c`, and renames
/// it into place, keeping the previous file as the last good one.
pub async fn install_pushed(spec: &LaunchSpec, pushed: PushedConfig) -> Result<(), ReloadError> {
    let config = spec.config.clone();
    let staged = blocking(move || install::stage(&config, pushed.text.as_bytes())).await?;
    if let Err(e) = launch::check_config(&spec.binary, &staged, &spec.env, spec.check_timeout).await
    {
        let config = spec.config.clone();
        let _ = tokio::task::spawn_blocking(move || install::discard(&config)).await;
        return Err(ReloadError::ConfigInvalid(e));
    }
    let config = spec.config.clone();
    blocking(move || install::install(&config)).await
}

/// Puts back the config the running worker was started from, so a crash restart does not pick
/// up a pushed config that cannot start.
pub async fn restore(spec: &LaunchSpec) {
    let config = spec.config.clone();
    if let Err(re) = blocking(move || install::restore(&config)).await {
        tracing::error!("{re}; the pushed config that failed to start is still in place");
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
