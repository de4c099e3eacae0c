//! One worker's CLI, however it is reached: through the admin socket every worker shares (direct
//! mode: the answer's `Pid:` proves which worker ran the command), or through the master CLI's
//! `@!<pid>` prefix (master-worker mode: the master forwards the command to that worker).

use super::admin::{AdminError, AdminSocket, StatRow};
use super::master::{MasterCli, MasterError};

#[derive(Debug, Clone)]
pub enum WorkerCli {
    Admin(AdminSocket),
    Master(MasterCli),
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Master(#[from] MasterError),
}

impl CliError {
    /// HAProxy answered and refused the command: retrying cannot help.
    pub fn is_refused(&self) -> bool {
        matches!(
            self,
            CliError::Admin(AdminError::Refused { .. })
                | CliError::Master(MasterError::Refused { .. })
                | CliError::Master(MasterError::NoSuchWorker { .. })
        )
    }
}

impl WorkerCli {
    /// Runs `line` in worker `pid`.
    pub async fn command_on(&self, pid: u32, line: &str) -> Result<String, CliError> {
        Ok(match self {
            WorkerCli::Admin(admin) => admin.command_on_retrying(pid, line).await?,
            WorkerCli::Master(master) => master.command_on(pid, line).await?,
        })
    }

    /// `show info` and `show stat` of worker `pid`.
    pub async fn sample(&self, pid: u32) -> Result<(String, Vec<StatRow>), CliError> {
        Ok(match self {
            WorkerCli::Admin(admin) => admin.sample(pid).await?,
            WorkerCli::Master(master) => master.sample(pid).await?,
        })
    }
}
