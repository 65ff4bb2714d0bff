//! The SkyWalking OAP side of the agent: what the OAP sends (task commands) turned into typed
//! values the task runner can act on.

pub mod task_command;
