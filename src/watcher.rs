//! The file watcher: tells the supervisor when the configuration file may have changed.
//! It only reports; the supervisor reads, validates and decides.
//!
//! It watches the file's *directory* (editors and Kubernetes ConfigMaps replace files by
//! rename or symlink swap, which a watch on the file's inode would miss) and, in addition,
//! the file itself (a single-file bind mount shows in-place writes only there). Bursts of
//! events are debounced into one report; reads (`Access` events) are ignored, or reading
//! the file would trigger the next reload forever.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use actix::{Actor, Addr, Context, Recipient};
use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

use crate::config::defaults::WATCH_DEBOUNCE;
use crate::supervisor::Reload;

pub struct FileWatcher {
    _debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
}

impl Actor for FileWatcher {
    type Context = Context<Self>;
}

/// Whether a change to `changed` can change the configuration file `name`: the file itself,
/// or the `..data` symlink a Kubernetes ConfigMap mount swaps on update.
fn concerns(changed: &Path, name: &OsString) -> bool {
    changed
        .file_name()
        .is_some_and(|n| n == name || n.to_string_lossy().starts_with("..data"))
}

impl FileWatcher {
    /// Starts watching `path` (its directory and the file), reporting to `supervisor`.
    pub fn start(path: &Path, supervisor: Recipient<Reload>) -> notify::Result<Addr<FileWatcher>> {
        let path: PathBuf = crate::config::absolute_path(path);
        let name = path.file_name().map(OsString::from).unwrap_or_default();
        let dir = path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let mut debouncer =
            new_debouncer(WATCH_DEBOUNCE, None, move |result: DebounceEventResult| {
                let Ok(events) = result else { return };
                let relevant = events.iter().any(|event| {
                    !matches!(event.kind, EventKind::Access(_))
                        && event.paths.iter().any(|p| concerns(p, &name))
                });
                if relevant {
                    supervisor.do_send(Reload {
                        trigger: "file watcher",
                    });
                }
            })?;
        debouncer.watch(&dir, RecursiveMode::NonRecursive)?;
        // Best effort: the directory watch is what matters; the file may not exist yet.
        let _ = debouncer.watch(&path, RecursiveMode::NonRecursive);
        tracing::info!(path = %path.display(), "watching the configuration file");
        Ok(FileWatcher {
            _debouncer: debouncer,
        }
        .start())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_file_and_configmap_swaps_concern_it() {
        let name = OsString::from("config.toml");
        assert!(concerns(Path::new("/etc/wsgate/config.toml"), &name));
        assert!(concerns(Path::new("/etc/wsgate/..data"), &name));
        assert!(concerns(Path::new("/etc/wsgate/..data_tmp"), &name));
        assert!(!concerns(Path::new("/etc/wsgate/other.toml"), &name));
        assert!(!concerns(Path::new("/etc/wsgate/.config.toml.swp"), &name));
    }
}
