//! One worker's CLI, however it is reached: through the admin socket every worker shares (direct
//! mode: the answer's `Pid:` proves which worker ran the command), or through the master CLI's
//! `@!<pid>` prefix (master-worker mode: the master forwards the command to that worker).

use super::admin::{AdminError, AdminSocket, StatRow, StatRows};
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

    /// `show info` of worker `pid`, and the `show stat` rows `rows` asks for (`None` when none
    /// were asked for or the answer had none ebb can read).
    pub async fn sample(
        &self,
        pid: u32,
        rows: StatRows,
    ) -> Result<(String, Option<Vec<StatRow>>), CliError> {
        Ok(match self {
            WorkerCli::Admin(admin) => admin.sample(pid, rows).await?,
            WorkerCli::Master(master) => master.sample(pid, rows).await?,
        })
    }
}
