//! Files that carry the SHA-256 of every tensor and of their header, written and read by the
//! training checkpoint and by every `save_state`/`load_state` file: [`save`] adds the digests and
//! writes the file atomically as a stream, [`read`] reads it once and verifies it whole.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::Result;
use rayon::prelude::*;

use super::atomic;
use super::format::{self, Entry, FileWriter, Parsed};

/// The metadata key of the header's digest.
pub(crate) const KEY_DIGEST: &str = "sha256";
/// The prefix of each tensor's digest key (`sha256:<tensor name>`).
pub(crate) const DIGEST_PREFIX: &str = "sha256:";

/// Saves `entries` with `metadata` and their digests at `path`, atomically: the digests are
/// computed in parallel (one tensor per task), then the header and the tensors are streamed to
/// the temporary file straight from the entries' buffers.
pub(crate) fn save(
    path: &Path,
    entries: &BTreeMap<String, Entry>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut meta = metadata.clone();
    for (name, digest) in format::digests(entries) {
        meta.insert(format!("{DIGEST_PREFIX}{name}"), digest);
    }
    let digest = format::header_digest(&meta, entries, KEY_DIGEST);
    meta.insert(KEY_DIGEST.to_string(), digest);
    let writer = FileWriter::new(
        entries.iter().map(|(n, e)| (n.as_str(), e)),
        meta.into_iter().collect(),
    )?;
    atomic::write_atomically(path, writer.len(), |out| writer.write_to(out))
}

/// What [`verify`] found wrong.
#[derive(Debug, PartialEq)]
pub(crate) enum Damage {
    /// The file has no header digest.
    NoDigest,
    /// The header does not match its digest.
    Header,
    /// A tensor does not match its digest.
    Tensor(String),
    /// A tensor has no digest.
    TensorWithoutDigest(String),
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::NoDigest => write!(f, "has no digest"),
            Damage::Header => write!(f, "is corrupt: the digest of its header does not match"),
            Damage::Tensor(name) => {
                write!(f, "is corrupt: tensor `{name}` does not match its digest")
            }
            Damage::TensorWithoutDigest(name) => write!(f, "has no digest for tensor `{name}`"),
        }
    }
}

/// Reads the whole file at `path` once and parses it (its tensors stay in that one buffer); the
/// error says what is wrong, for the caller to name the file.
pub(crate) fn read(path: &Path) -> std::result::Result<Parsed, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot be read ({e})"))?;
    format::parse(Arc::new(bytes)).map_err(|e| format!("is {e}"))
}

/// Checks the header digest first (a damaged key or value must read as damage, whatever it hit),
/// then every tensor's, in parallel; on success removes the digests from `parsed.metadata`.
pub(crate) fn verify(parsed: &mut Parsed) -> std::result::Result<(), Damage> {
    let meta = &parsed.metadata;
    match meta.get(KEY_DIGEST) {
        Some(d) if *d == format::header_digest(meta, &parsed.entries, KEY_DIGEST) => {}
        Some(_) => return Err(Damage::Header),
        None => return Err(Damage::NoDigest),
    }
    let problem = parsed.entries.par_iter().find_map_first(|(name, e)| {
        match meta.get(&format!("{DIGEST_PREFIX}{name}")) {
            Some(d) if *d == e.digest() => None,
            Some(_) => Some(Damage::Tensor(name.clone())),
            None => Some(Damage::TensorWithoutDigest(name.clone())),
        }
    });
    if let Some(p) = problem {
        return Err(p);
    }
    parsed
        .metadata
        .retain(|k, _| k != KEY_DIGEST && !k.starts_with(DIGEST_PREFIX));
    Ok(())
}
