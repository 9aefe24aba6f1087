//! The file watcher: tells the supervisor when the configuration file may have changed.
//! It only reports; the supervisor reads, validates and decides.
//!
//! It watches the file's *directory* (editors and Kubernetes ConfigMaps replace files by
//! rename or symlink swap, which a watch on the file's inode would miss) and, in addition,
//! the file itself (a single-file bind mount shows in-place writes only there). Bursts of
//! events are debounced into one report; reads (`Access` events) are ignored, or reading
//! the file would trigger the next reload forever. (notify-debouncer-full was tried and
//! dropped: with the file itself watched as a root it lost rename-replace events.)

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use actix::{Actor, Addr, AsyncContext, Context, Handler, Message, Recipient, SpawnHandle};
use notify::event::ModifyKind;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::config::defaults::WATCH_DEBOUNCE;
use crate::supervisor::Reload;

pub struct FileWatcher {
    path: PathBuf,
    watcher: RecommendedWatcher,
    /// File names whose change concerns the configuration (the file and the certificates
    /// it names), read by notify's thread.
    names: Arc<ArcSwap<HashSet<OsString>>>,
    /// Directories watched for the certificates.
    extra_dirs: HashSet<PathBuf>,
    supervisor: Recipient<Reload>,
    /// The pending report, pushed back by every new event (the debounce).
    pending: Option<SpawnHandle>,
}

/// Something happened to the file or its directory (from notify's thread).
#[derive(Message)]
#[rtype(result = "()")]
struct Touched;

/// Watch these files too (the certificates the configuration names).
#[derive(Message)]
#[rtype(result = "()")]
pub struct WatchAlso(pub Vec<PathBuf>);

/// Whether a change to `changed` concerns one of the watched file `names`, or is the
/// `..data` symlink a Kubernetes ConfigMap mount swaps on update.
fn concerns(changed: &Path, names: &HashSet<OsString>) -> bool {
    changed
        .file_name()
        .is_some_and(|n| names.contains(n) || n.to_string_lossy().starts_with("..data"))
}

impl FileWatcher {
    /// Starts watching `path` (its directory and the file), reporting to `supervisor`.
    /// The watches are in place when this returns.
    pub fn start(path: &Path, supervisor: Recipient<Reload>) -> notify::Result<Addr<FileWatcher>> {
        let path: PathBuf = crate::config::absolute_path(path);
        let name = path.file_name().map(OsString::from).unwrap_or_default();
        let names = Arc::new(ArcSwap::from_pointee(HashSet::from([name.clone()])));
        let seen = Arc::clone(&names);
        let dir = path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        // The context first, so notify's callback can hold the actor's address.
        let ctx = Context::<FileWatcher>::new();
        let me = ctx.address();
        let handler = move |result: notify::Result<notify::Event>| {
            let Ok(event) = result else { return };
            // Reads (ours included) and metadata changes (atime, chmod) change no content.
            let content = !matches!(
                event.kind,
                EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_))
            );
            let names = seen.load();
            if content && event.paths.iter().any(|p| concerns(p, &names)) {
                me.do_send(Touched);
            }
        };
        let mut watcher = notify::recommended_watcher(handler)?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        // The file too: a single-file bind mount shows in-place writes only there. It may
        // not exist yet; it is watched again after every change.
        let _ = watcher.watch(&path, RecursiveMode::NonRecursive);
        tracing::info!(path = %path.display(), "watching the configuration file");
        Ok(ctx.run(FileWatcher {
            path,
            watcher,
            names,
            extra_dirs: HashSet::new(),
            supervisor,
            pending: None,
        }))
    }
}

impl Actor for FileWatcher {
    type Context = Context<Self>;
}

impl Handler<WatchAlso> for FileWatcher {
    type Result = ();

    fn handle(&mut self, msg: WatchAlso, _: &mut Self::Context) {
        let mut names: HashSet<OsString> = self
            .path
            .file_name()
            .map(OsString::from)
            .into_iter()
            .collect();
        for file in &msg.0 {
            let file = crate::config::absolute_path(file);
            if let Some(name) = file.file_name() {
                names.insert(name.to_os_string());
            }
            if let Some(dir) = file.parent()
                && self.extra_dirs.insert(dir.to_path_buf())
                && let Err(err) = self.watcher.watch(dir, RecursiveMode::NonRecursive)
            {
                tracing::warn!("not watching {}: {err}", dir.display());
            }
        }
        self.names.store(Arc::new(names));
    }
}

impl Handler<Touched> for FileWatcher {
    type Result = ();

    fn handle(&mut self, _: Touched, ctx: &mut Self::Context) {
        if let Some(pending) = self.pending.take() {
            ctx.cancel_future(pending);
        }
        self.pending = Some(ctx.run_later(WATCH_DEBOUNCE, |act, _| {
            act.pending = None;
            // A rename-replace drops the watch on the old file: watch the new one.
            let _ = act.watcher.unwatch(&act.path);
            let _ = act.watcher.watch(&act.path, RecursiveMode::NonRecursive);
            act.supervisor.do_send(Reload {
                trigger: "file watcher",
            });
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_file_and_configmap_swaps_concern_it() {
        let names = HashSet::from([OsString::from("config.toml"), OsString::from("site.pem")]);
        assert!(concerns(Path::new("/etc/wsgate/config.toml"), &names));
        assert!(concerns(Path::new("/etc/wsgate/certs/site.pem"), &names));
        assert!(concerns(Path::new("/etc/wsgate/..data"), &names));
        assert!(concerns(Path::new("/etc/wsgate/..data_tmp"), &names));
        assert!(!concerns(Path::new("/etc/wsgate/other.toml"), &names));
        assert!(!concerns(Path::new("/etc/wsgate/.config.toml.swp"), &names));
    }
}

#[cfg(test)]
mod live_tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counter(Arc<AtomicUsize>);
    impl Actor for Counter {
        type Context = Context<Self>;
    }
    impl actix::Handler<Reload> for Counter {
        type Result = ();
        fn handle(&mut self, _: Reload, _: &mut Self::Context) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[actix_rt::test]
    async fn reports_in_place_writes_and_renames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "a").unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let counter = Counter(Arc::clone(&count)).start();
        let _watcher = FileWatcher::start(&path, counter.recipient()).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        std::fs::write(&path, "b").unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        assert_eq!(count.load(Ordering::SeqCst), 1, "in-place write");
        let tmp = dir.path().join(".config.toml.tmp");
        std::fs::write(&tmp, "c").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        assert_eq!(count.load(Ordering::SeqCst), 2, "rename over");
        std::fs::write(&path, "d").unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        assert_eq!(
            count.load(Ordering::SeqCst),
            3,
            "in-place write after a rename"
        );
    }
}
