//! What the admin API shows about config reloads: the files in force, the
//! reload generation, and the last refused reload's error. The reloader
//! writes it; the admin API reads it.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use crate::config::Source;

/// What the admin API shows about reloads.
#[derive(Debug, Default)]
pub struct ReloadState {
    inner: Mutex<StateInner>,
}

#[derive(Debug, Default, Clone)]
pub struct StateInner {
    /// Reloads applied since start.
    pub generation: u64,
    pub last_applied: Option<SystemTime>,
    /// The last refused reload's error, until a reload succeeds.
    pub last_error: Option<String>,
    /// The files of the config in force, as read.
    pub files: Vec<(PathBuf, Arc<str>)>,
}

impl ReloadState {
    pub fn snapshot(&self) -> StateInner {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut StateInner)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Records `sources` as the files of the config in force.
    pub fn record_files(&self, sources: &[Source]) {
        let files = sources
            .iter()
            .map(|s| (s.path.clone(), s.text.clone()))
            .collect();
        self.update(|s| s.files = files);
    }
}
