//! Crash-safe file replacement: a file is written whole to a temporary file in the same folder,
//! flushed and fsynced, renamed over the old one, and the folder fsynced. A crash at any moment
//! leaves either the old file or the new one under the name, never a torn one.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use candle_core::Result;

/// With the feature `test-hooks` (this crate's own tests only): when set to a number of
/// milliseconds, every atomic write pauses that long in the middle of writing its temporary file
/// (half of it written and flushed), so that a test can kill the process during a save. It changes
/// nothing else. Without the feature it is not read.
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
pub(crate) const PAUSE_ENV: &str = "CANDLE_GRAD_CLIP_TEST_SAVE_PAUSE_MS";

/// Temporary files of one process get distinct names.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The temporary files this process is writing now, which the stale-file cleanup of another
/// thread's save to the same path must leave alone. (Saves to one path from several processes
/// at once are not supported: one may remove the other's temporary file, and that save fails.)
static IN_FLIGHT: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// A temporary file's path, marked as being written until it is dropped.
struct InFlight(PathBuf);

impl InFlight {
    fn new(temp: PathBuf) -> Self {
        if let Ok(mut set) = IN_FLIGHT.lock() {
            set.insert(temp.clone());
        }
        Self(temp)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut set) = IN_FLIGHT.lock() {
            set.remove(&self.0);
        }
    }
}

/// How many names [`create_temp`] tries before it gives up.
const TEMP_NAME_TRIES: u32 = 16;

/// The prefix of the temporary files of saves to `path` (in its folder).
fn temp_prefix(path: &Path) -> Result<String> {
    let Some(name) = path.file_name() else {
        candle_core::bail!("cannot save to `{}`: it names no file", path.display())
    };
    Ok(format!(".{}.tmp-", name.to_string_lossy()))
}

/// Whether `file_name` is a temporary file of a save with this `prefix`: the prefix followed by
/// two or three groups of digits joined by `-` (process id, clock, counter), nothing else.
fn is_temp_name(file_name: &str, prefix: &str) -> bool {
    let Some(rest) = file_name.strip_prefix(prefix) else {
        return false;
    };
    let groups: Vec<&str> = rest.split('-').collect();
    (2..=3).contains(&groups.len())
        && groups
            .iter()
            .all(|g| !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()))
}

fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what} `{}`: {e}", path.display()))
}

/// The write buffer between a streamed file and the disk: large writes (a tensor's bytes) go
/// through without a copy; this bounds the memory a save adds for the small ones.
const WRITE_BUFFER: usize = 1 << 20;

/// Replaces the file at `path` by the `len` bytes that `write` streams, atomically and durably:
/// they go to a new temporary file in the same folder (through a bounded buffer), which is
/// flushed and fsynced, then renamed over `path`, and the folder is fsynced (on Unix) so that
/// the rename itself survives a power loss.
///
/// If writing or renaming fails, the old file is left as it was and the temporary file this call
/// created is removed (no other file is). If only the final fsync of the folder fails, the new
/// file is already in place under `path` and the error says so: it may not survive a power loss.
/// After a successful save, the temporary files that earlier, crashed saves to the same path left
/// behind are removed (only names of the form this function writes, and none that another
/// thread of this process is writing).
pub(crate) fn write_atomically(
    path: &Path,
    len: u64,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let folder = folder_of(path);
    let prefix = temp_prefix(path)?;
    let (temp, file) = create_temp(&folder, &prefix)?;
    let written = write_and_sync(file, &temp.0, len, write).and_then(|()| {
        fs::rename(&temp.0, path)
            .map_err(|e| io_error("cannot rename the temporary file to", path, e))
    });
    if let Err(e) = written {
        // This call created `temp` (create_new), so removing it touches no one else's file.
        let _ = fs::remove_file(&temp.0);
        return Err(e);
    }
    sync_folder(&folder).map_err(|e| {
        candle_core::Error::Msg(format!(
            "saved `{}`, but cannot fsync its folder afterwards ({e}): the new file is in place \
             but the rename may not survive a power loss",
            path.display()
        ))
    })?;
    drop(temp);
    remove_stale_temps(&folder, &prefix);
    Ok(())
}

/// Creates a new temporary file `<prefix><pid>-<nanoseconds>-<counter>` in `folder`. The clock
/// keeps a restarted process that got the same process id from colliding with a temporary file
/// its crashed predecessor left; a name that exists anyway is skipped, never opened.
///
/// The name is marked in flight before the file exists, so that no other thread's cleanup can
/// see the file unmarked.
fn create_temp(folder: &Path, prefix: &str) -> Result<(InFlight, File)> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut tries = 1;
    loop {
        let temp = InFlight::new(folder.join(format!(
            "{prefix}{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp.0)
        {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries < TEMP_NAME_TRIES => {
                tries += 1
            }
            Err(e) => return Err(io_error("cannot create the temporary file", &temp.0, e)),
        }
    }
}

fn write_and_sync(
    file: File,
    temp: &Path,
    len: u64,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let fail = |e| io_error("cannot write the temporary file", temp, e);
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, PauseHalfway::new(file, len));
    write(&mut out).map_err(fail)?;
    let file = out.into_inner().map_err(|e| fail(e.into_error()))?.file;
    let written = file.metadata().map_err(fail)?.len();
    if written != len {
        candle_core::bail!(
            "cannot write the temporary file `{}`: {written} bytes written, {len} expected",
            temp.display()
        )
    }
    file.sync_all()
        .map_err(|e| io_error("cannot fsync the temporary file", temp, e))
}

/// The temporary file, which pauses once half of it is written and flushed when the test hook
/// asks for it (a test kills the process then), and passes every write through otherwise.
struct PauseHalfway {
    file: File,
    /// Bytes before the pause, and the pause; `None` once paused, or without the hook.
    pause: Option<(u64, std::time::Duration)>,
}

impl PauseHalfway {
    fn new(file: File, len: u64) -> Self {
        Self {
            file,
            pause: test_pause().map(|p| (len / 2, p)),
        }
    }
}

impl Write for PauseHalfway {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some((before, pause)) = self.pause else {
            return self.file.write(buf);
        };
        if before == 0 {
            self.file.flush()?;
            std::thread::sleep(pause);
            self.pause = None;
            return self.file.write(buf);
        }
        let part = buf.len().min(usize::try_from(before).unwrap_or(usize::MAX));
        let n = self.file.write(&buf[..part])?;
        self.pause = Some((before - n as u64, pause));
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(feature = "test-hooks")]
fn test_pause() -> Option<std::time::Duration> {
    let ms = std::env::var(PAUSE_ENV).ok()?.parse::<u64>().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

#[cfg(not(feature = "test-hooks"))]
fn test_pause() -> Option<std::time::Duration> {
    None
}

/// Makes the folder's entries (the rename) durable. Only Unix can open a folder to fsync it.
fn sync_folder(folder: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    File::open(folder)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = folder;
    Ok(())
}

/// Best effort: the temporary files of earlier saves to the same path that crashed (names of the
/// form [`create_temp`] writes, see [`is_temp_name`]).
fn remove_stale_temps(folder: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(folder) else {
        return;
    };
    let Ok(in_flight) = IN_FLIGHT.lock() else {
        return; // cannot tell another thread's temporary file from a stale one
    };
    for entry in entries.flatten() {
        if is_temp_name(&entry.file_name().to_string_lossy(), prefix)
            && !in_flight.contains(&entry.path())
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(bytes: &[u8], path: &Path) -> Result<()> {
        write_atomically(path, bytes.len() as u64, |out| out.write_all(bytes))
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> std::io::Result<Vec<String>> {
        let mut names = fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<Vec<_>>>()?;
        names.sort();
        Ok(names)
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("cgc-atomic-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let path = dir.join("state.safetensors");
        // A temporary file left by a crashed save.
        fs::write(dir.join(".state.safetensors.tmp-1-0"), b"torn")?;
        save(b"first, longer", &path)?;
        save(b"second", &path)?;
        assert_eq!(fs::read(&path)?, b"second");
        assert_eq!(names(&dir)?, ["state.safetensors"]);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_restarted_process_with_the_same_pid_does_not_collide() -> Result<()> {
        // A crashed predecessor with this process id left temporaries under the names a
        // pid-and-counter scheme would pick next; a file that only starts like one is someone
        // else's and stays.
        let dir = std::env::temp_dir().join(format!("cgc-atomic-pid-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let path = dir.join("state.safetensors");
        let next = COUNTER.load(Ordering::Relaxed);
        for c in next..next + 64 {
            fs::write(
                dir.join(format!(".state.safetensors.tmp-{}-{c}", std::process::id())),
                b"torn",
            )?;
        }
        fs::write(dir.join(".state.safetensors.tmp-notes"), b"mine")?;
        save(b"state", &path)?;
        assert_eq!(
            names(&dir)?,
            [".state.safetensors.tmp-notes", "state.safetensors"]
        );
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn threads_saving_to_one_path_do_not_remove_each_others_temporaries() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("cgc-atomic-threads-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let path = dir.join("state.safetensors");
        // A large enough file that the writes overlap.
        let bytes = vec![7u8; 1 << 20];
        std::thread::scope(|s| {
            let saves: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| -> Result<()> {
                        for _ in 0..20 {
                            save(&bytes, &path)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            saves
                .into_iter()
                .try_for_each(|h| h.join().expect("no panic"))
        })?;
        assert_eq!(names(&dir)?, ["state.safetensors"]);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn temporary_names_are_recognised_exactly() {
        let p = ".a.safetensors.tmp-";
        assert!(is_temp_name(".a.safetensors.tmp-12-3", p));
        assert!(is_temp_name(
            ".a.safetensors.tmp-12-1733450000000000000-3",
            p
        ));
        for other in [
            ".a.safetensors.tmp-",
            ".a.safetensors.tmp-12",
            ".a.safetensors.tmp-12-",
            ".a.safetensors.tmp-12-x",
            ".a.safetensors.tmp-1-2-3-4",
            ".a.safetensors.tmp-12-3.bak",
            ".b.safetensors.tmp-12-3",
        ] {
            assert!(!is_temp_name(other, p), "{other}");
        }
    }

    #[test]
    fn a_failed_save_keeps_the_old_file() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("cgc-atomic-fail-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        // Renaming a file over a non-empty folder fails: the folder stays, no temporary is left.
        let path = dir.join("taken");
        fs::create_dir_all(path.join("inside"))?;
        // Someone else's file that starts like a temporary one stays.
        fs::write(dir.join(".taken.tmp-7-7"), b"not ours")?;
        let err = save(b"state", &path);
        assert!(err.is_err());
        assert!(path.join("inside").is_dir());
        assert_eq!(fs::read(dir.join(".taken.tmp-7-7"))?, b"not ours");
        assert_eq!(fs::read_dir(&dir)?.count(), 2);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_short_or_failed_stream_keeps_the_old_file() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("cgc-atomic-short-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let path = dir.join("state.safetensors");
        save(b"old", &path)?;
        // Fewer bytes than announced: refused, named.
        let err = write_atomically(&path, 10, |out| out.write_all(b"new"))
            .expect_err("a short file accepted");
        assert!(
            err.to_string().contains("3 bytes written, 10 expected"),
            "{err}"
        );
        // The writer fails half-way.
        let err = write_atomically(&path, 10, |out| {
            out.write_all(b"new")?;
            Err(std::io::Error::other("disk on fire"))
        })
        .expect_err("a failed write accepted");
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert_eq!(fs::read(&path)?, b"old");
        assert_eq!(names(&dir)?, ["state.safetensors"]);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
