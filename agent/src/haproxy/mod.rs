//! Everything that touches HAProxy directly: its config file, its admin socket, its processes.
//! `master` is the master CLI (`-S` socket) of `haproxy -W`, for master-worker mode.

pub mod admin;
pub mod adopt;
pub mod cfg_syntax;
pub mod config_file;
pub mod drain_map;
pub mod install;
pub mod launch;
pub mod master;
pub mod procfs;
pub mod push_policy;
pub mod worker;
pub mod worker_cli;
