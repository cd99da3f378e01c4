//! Crash-safe file replacement through the `atomic-write-file` crate: a file is streamed to an
//! unnamed temporary file in the same folder (Linux's `O_TMPFILE`; a randomly named one where the
//! file system has none), fsynced, linked and renamed over the old one, and the folder fsynced. A
//! crash at any moment leaves either the old file or the new one under the name, never a torn
//! one, and (with `O_TMPFILE`) no temporary file, but for a crash in the instant between the link
//! to a hidden name and the rename. Saves to one path from several threads or processes
//! at once each succeed; the last rename wins.

use std::io::{BufWriter, Write};
use std::path::Path;

use atomic_write_file::AtomicWriteFile;
use candle_core::Result;

/// With the feature `test-hooks` (this crate's own tests only): when set to a number of
/// milliseconds, every atomic write pauses that long in the middle of writing its temporary file
/// (half of it written and flushed), after printing [`PAUSE_MARK`] to stderr, so that a test can
/// kill the process during a save. It changes nothing else. Without the feature it is not read.
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
pub(crate) const PAUSE_ENV: &str = "CANDLE_GRAD_CLIP_TEST_SAVE_PAUSE_MS";

/// What a paused save prints to stderr (test hooks only).
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
pub(crate) const PAUSE_MARK: &str = "candle-grad-clip test hook: save paused half-way";

/// The write buffer between a streamed file and the disk: large writes (a tensor's bytes) go
/// through without a copy; this bounds the memory a save adds for the small ones.
const WRITE_BUFFER: usize = 1 << 20;

fn io_error(what: &str, path: &Path, e: std::io::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what} `{}`: {e}", path.display()))
}

/// Replaces the file at `path` by the `len` bytes that `write` streams, atomically and durably
/// (see the module's documentation), through a bounded buffer.
///
/// If writing fails, or `write` streams another number of bytes than `len`, the old file is left
/// as it was and the temporary file is removed. (If the final rename itself fails, the crate
/// leaves the temporary file under a hidden random name `.<name>.XXXXXX`; a folder in the way,
/// the common cause, is refused before anything is written.)
pub(crate) fn write_atomically(
    path: &Path,
    len: u64,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    if path.file_name().is_none() {
        candle_core::bail!("cannot save to `{}`: it names no file", path.display())
    }
    // The rename would fail after the whole write, and the crate leaves its temporary file
    // behind when a rename fails: refuse up front.
    if path.is_dir() {
        candle_core::bail!("cannot save to `{}`: it is a folder", path.display())
    }
    let mut file = AtomicWriteFile::options()
        .open(path)
        .map_err(|e| io_error("cannot create a temporary file to replace", path, e))?;
    let fail = |e| io_error("cannot write the temporary file for", path, e);
    {
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, PauseHalfway::new(&mut file, len));
        write(&mut out).map_err(fail)?;
        out.flush().map_err(fail)?;
    }
    let written = file.as_file().metadata().map_err(fail)?.len();
    if written != len {
        candle_core::bail!(
            "cannot write the temporary file for `{}`: {written} bytes written, {len} expected",
            path.display()
        )
    }
    // fsync the file, rename it over `path`, fsync the folder; on error the temporary file goes.
    file.commit()
        .map_err(|e| io_error("cannot fsync and rename the temporary file over", path, e))
}

/// The temporary file, which pauses once half of it is written and flushed when the test hook
/// asks for it (a test kills the process then), and passes every write through otherwise.
struct PauseHalfway<'a> {
    file: &'a mut AtomicWriteFile,
    /// Bytes before the pause, and the pause; `None` once paused, or without the hook.
    pause: Option<(u64, std::time::Duration)>,
}

impl<'a> PauseHalfway<'a> {
    fn new(file: &'a mut AtomicWriteFile, len: u64) -> Self {
        Self {
            file,
            pause: test_pause().map(|p| (len / 2, p)),
        }
    }
}

impl Write for PauseHalfway<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some((before, pause)) = self.pause else {
            return self.file.write(buf);
        };
        if before == 0 {
            self.file.flush()?;
            eprintln!("{PAUSE_MARK}");
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

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

    fn dir(name: &str) -> std::io::Result<std::path::PathBuf> {
        let dir = std::env::temp_dir().join(format!("cgc-atomic-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() -> Result<()> {
        let dir = dir("replace")?;
        let path = dir.join("state.safetensors");
        // Someone else's file that looks like a temporary one (the crate's or 0.1's) stays.
        fs::write(dir.join(".state.safetensors.tmp-1-0"), b"not ours")?;
        fs::write(dir.join(".state.safetensors.AbC123"), b"not ours")?;
        save(b"first, longer", &path)?;
        save(b"second", &path)?;
        assert_eq!(fs::read(&path)?, b"second");
        assert_eq!(
            names(&dir)?,
            [
                ".state.safetensors.AbC123",
                ".state.safetensors.tmp-1-0",
                "state.safetensors"
            ]
        );
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn threads_saving_to_one_path_all_succeed() -> Result<()> {
        let dir = dir("threads")?;
        let path = dir.join("state.safetensors");
        // Large enough that the writes overlap; each thread writes its own byte.
        std::thread::scope(|s| {
            let saves: Vec<_> = (0..4u8)
                .map(|k| {
                    let path = &path;
                    s.spawn(move || -> Result<()> {
                        let bytes = vec![k; 1 << 20];
                        for _ in 0..20 {
                            save(&bytes, path)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            saves
                .into_iter()
                .try_for_each(|h| h.join().expect("no panic"))
        })?;
        // One thread's file, whole.
        let bytes = fs::read(&path)?;
        assert_eq!(bytes.len(), 1 << 20);
        assert!(bytes.iter().all(|&b| b == bytes[0]));
        assert_eq!(names(&dir)?, ["state.safetensors"]);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_failed_save_keeps_the_old_file() -> Result<()> {
        let dir = dir("fail")?;
        // A folder in the way: refused before anything is written; the folder stays.
        let path = dir.join("taken");
        fs::create_dir_all(path.join("inside"))?;
        let err = save(b"state", &path).expect_err("saved over a folder");
        assert!(err.to_string().contains("it is a folder"), "{err}");
        assert!(path.join("inside").is_dir());
        assert_eq!(names(&dir)?, ["taken"]);
        // A path that names no file.
        let err = save(b"state", Path::new("/")).expect_err("saved to /");
        assert!(err.to_string().contains("names no file"), "{err}");
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_short_or_failed_stream_keeps_the_old_file() -> Result<()> {
        let dir = dir("short")?;
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
