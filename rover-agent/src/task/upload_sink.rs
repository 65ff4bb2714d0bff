//! The sink of backend tasks: each window encoded for SkyWalking into the upload buffer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{ProfileWindow, WindowSink};
use crate::backend::{UploadBuffer, UploadTask, encode_window};

pub(super) struct UploadSink {
    /// Shared with the run, which moves the task's end when the OAP extends it.
    pub task: Arc<Mutex<UploadTask>>,
    /// Local pid → the OAP's process id.
    pub process_ids: HashMap<u32, String>,
    pub buffer: Arc<UploadBuffer>,
}

impl WindowSink for UploadSink {
    fn window(&mut self, window: ProfileWindow) -> anyhow::Result<()> {
        let task = self
            .task
            .lock()
            .map_err(|_| anyhow::anyhow!("the task's run panicked"))?
            .clone();
        self.buffer
            .push(encode_window(&task, &self.process_ids, &window.profile));
        if window.last {
            // A task's last window goes out now, not a flush interval later.
            self.buffer.flush_soon();
        }
        Ok(())
    }
}
