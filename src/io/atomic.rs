//! Crash-safe file replacement: a file is written whole to a temporary file in the same folder,
//! flushed and fsynced, renamed over the old one, and the folder fsynced. A crash at any moment
//! leaves either the old file or the new one under the name, never a torn one.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{Result, Tensor};

use super::format;

/// With the feature `test-hooks` (this crate's own tests only): when set to a number of
/// milliseconds, every atomic write pauses that long in the middle of writing its temporary file
/// (half of it written and flushed), so that a test can kill the process during a save. It changes
/// nothing else. Without the feature it is not read.
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
pub(crate) const PAUSE_ENV: &str = "CANDLE_GRAD_CLIP_TEST_SAVE_PAUSE_MS";

/// Saves `tensors` as a safetensors file at `path`, atomically (see the module's documentation).
/// For the `save_state` methods of the optimizers and policies.
pub(crate) fn save_safetensors_atomically(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    save_safetensors_with_metadata_atomically(tensors, HashMap::new(), path)
}

/// [`save_safetensors_atomically`] with file metadata (the safetensors header's `__metadata__`;
/// none when `metadata` is empty).
pub(crate) fn save_safetensors_with_metadata_atomically(
    tensors: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    let entries = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), format::Entry::from_tensor(t)?)))
        .collect::<Result<Vec<_>>>()?;
    let bytes = format::serialize(entries, metadata, path)?;
    write_atomically(path, &bytes)
}

/// Temporary files of one process get distinct names.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The prefix of the temporary files of saves to `path` (in its folder).
fn temp_prefix(path: &Path) -> Result<String> {
    let Some(name) = path.file_name() else {
        candle_core::bail!("cannot save to `{}`: it names no file", path.display())
    };
    Ok(format!(".{}.tmp-", name.to_string_lossy()))
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

/// Replaces the file at `path` by `bytes`, atomically and durably: the bytes go to a new
/// temporary file in the same folder, which is flushed and fsynced, then renamed over `path`, and
/// the folder is fsynced (on Unix) so that the rename itself survives a power loss. When it fails
/// the old file is left as it was and the temporary file removed. Temporary files that earlier,
/// crashed saves to the same path left behind are removed after a successful save.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let folder = folder_of(path);
    let prefix = temp_prefix(path)?;
    let temp = folder.join(format!(
        "{prefix}{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = write_and_sync(&temp, bytes).and_then(|()| {
        fs::rename(&temp, path)
            .map_err(|e| io_error("cannot rename the temporary file to", path, e))
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    sync_folder(&folder)?;
    remove_stale_temps(&folder, &prefix);
    Ok(())
}

fn write_and_sync(temp: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(temp)
        .map_err(|e| io_error("cannot create the temporary file", temp, e))?;
    let write = |file: &mut File, part: &[u8]| {
        file.write_all(part)
            .map_err(|e| io_error("cannot write the temporary file", temp, e))
    };
    match test_pause() {
        Some(pause) => {
            let (first, second) = bytes.split_at(bytes.len() / 2);
            write(&mut file, first)?;
            file.flush()
                .map_err(|e| io_error("cannot write the temporary file", temp, e))?;
            std::thread::sleep(pause);
            write(&mut file, second)?;
        }
        None => write(&mut file, bytes)?,
    }
    file.sync_all()
        .map_err(|e| io_error("cannot fsync the temporary file", temp, e))
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
fn sync_folder(folder: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(folder)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_error("cannot fsync the folder", folder, e))?;
    }
    #[cfg(not(unix))]
    let _ = folder;
    Ok(())
}

/// Best effort: the temporary files of earlier saves to the same path that crashed.
fn remove_stale_temps(folder: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(folder) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("cgc-atomic-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let path = dir.join("state.safetensors");
        // A temporary file left by a crashed save.
        fs::write(dir.join(".state.safetensors.tmp-1-0"), b"torn")?;
        let t = Tensor::arange(0f32, 6., &Device::Cpu)?;
        save_safetensors_atomically(&HashMap::from([("t".to_string(), t.clone())]), &path)?;
        let t2 = (t * 2.0)?.to_dtype(DType::F64)?;
        save_safetensors_atomically(&HashMap::from([("u".to_string(), t2)]), &path)?;
        let back = candle_core::safetensors::load(&path, &Device::Cpu)?;
        assert_eq!(back["u"].to_vec1::<f64>()?, [0., 2., 4., 6., 8., 10.]);
        assert!(!back.contains_key("t"));
        let names: Vec<String> = fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        assert_eq!(names, ["state.safetensors"]);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_failed_save_keeps_the_old_file() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("cgc-atomic-fail-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        // Renaming a file over a non-empty folder fails: the folder stays, no temporary is left.
        let path = dir.join("taken");
        fs::create_dir_all(path.join("inside"))?;
        let t = Tensor::new(&[1f32], &Device::Cpu)?;
        let err = save_safetensors_atomically(&HashMap::from([("t".to_string(), t)]), &path);
        assert!(err.is_err());
        assert!(path.join("inside").is_dir());
        assert_eq!(fs::read_dir(&dir)?.count(), 1);
        fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
