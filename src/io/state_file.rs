//! The file of a `save_state`/`load_state` pair (the fused optimizers, ZClip, GradScaler): a
//! safetensors file of the state's tensors, sealed with their digests ([`super::digest`]), that
//! names its format and the kind of the component whose state it is.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Result, Tensor};

use super::digest::{self, Damage};
use super::format::Entry;

/// The value of the `format` metadata entry.
pub(crate) const FORMAT: &str = "candle-grad-clip state v1";
const KEY_FORMAT: &str = "format";
const KEY_KIND: &str = "kind";

/// Saves `entries`, the state of a `kind` (`"FusedAdamW"`, `"ZClip"`, …), at `path`,
/// atomically, with the digest of every tensor and of the header.
pub(crate) fn save_entries(
    entries: &BTreeMap<String, Entry>,
    kind: &str,
    path: &Path,
) -> Result<()> {
    let meta = BTreeMap::from([
        (KEY_FORMAT.to_string(), FORMAT.to_string()),
        (KEY_KIND.to_string(), kind.to_string()),
    ]);
    digest::save(path, entries, &meta)
}

/// [`save_entries`] for a state dict.
pub(crate) fn save(tensors: &HashMap<String, Tensor>, kind: &str, path: &Path) -> Result<()> {
    let entries = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), Entry::from_tensor(t)?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    save_entries(&entries, kind, path)
}

/// Reads and verifies the state of a `kind` saved by [`save`]: a file that cannot be read, is
/// truncated, damaged (a digest that does not match: the header or a named tensor), has no
/// digests (not a state file, or one written before they were kept), or holds another kind's
/// state is an error naming the file and the problem. The entries stay in the file's buffer.
pub(crate) fn load_entries(path: &Path, kind: &str) -> Result<BTreeMap<String, Entry>> {
    let fail = |what: String| -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "{kind}::load_state: `{}` {what}; nothing was loaded",
            path.display()
        ))
    };
    let mut parsed = digest::read(path).map_err(fail)?;
    match digest::verify(&mut parsed) {
        Ok(()) => {}
        Err(Damage::NoDigest) => {
            return Err(fail(
                "has no digests: it is not a state file of this crate, or one written before \
                 0.2 (which kept none), and cannot be verified"
                    .into(),
            ))
        }
        Err(damage) => return Err(fail(damage.to_string())),
    }
    match parsed.metadata.get(KEY_FORMAT) {
        Some(f) if f == FORMAT => {}
        Some(f) => return Err(fail(format!("has format `{f}`, not `{FORMAT}`"))),
        None => return Err(fail("is not a state file (no `format` entry)".into())),
    }
    match parsed.metadata.get(KEY_KIND) {
        Some(k) if k == kind => {}
        Some(k) => return Err(fail(format!("holds the state of a {k}, not of a {kind}"))),
        None => return Err(fail("names no kind".into())),
    }
    Ok(parsed.entries)
}

/// [`load_entries`] as a state dict on the CPU.
pub(crate) fn load(path: &Path, kind: &str) -> Result<HashMap<String, Tensor>> {
    load_entries(path, kind)?
        .into_iter()
        .map(|(name, e)| Ok((name, e.to_tensor(&Device::Cpu)?)))
        .collect()
}

/// The entries of a state dict given to `load_state_dict`, read with the checks every component
/// makes (the fused optimizers have their own, per var): each expected entry is there with its
/// dtype and rank, and nothing else is. The errors name the component's call and say that
/// nothing was loaded.
pub(crate) struct StateDictReader<'a> {
    pub(crate) dict: &'a HashMap<String, Tensor>,
    /// The public call, e.g. `"ZClip::load_state_dict"`.
    pub(crate) caller: &'static str,
}

impl<'a> StateDictReader<'a> {
    /// The entry `key`, a `rank`-d tensor of `dtype`.
    pub(crate) fn get(
        &self,
        key: &str,
        dtype: candle_core::DType,
        rank: usize,
    ) -> Result<&'a Tensor> {
        let caller = self.caller;
        let Some(t) = self.dict.get(key) else {
            candle_core::bail!("{caller}: the state has no `{key}`; nothing was loaded")
        };
        if t.dtype() != dtype || t.rank() != rank {
            candle_core::bail!(
                "{caller}: `{key}` must be a {rank}-d {dtype:?} tensor, got {:?} {:?}; nothing was loaded",
                t.dtype(),
                t.dims()
            )
        }
        Ok(t)
    }

    /// Refuses an entry outside `known`.
    pub(crate) fn refuse_unknown(&self, known: &[&str]) -> Result<()> {
        if let Some(extra) = self.dict.keys().find(|k| !known.contains(&k.as_str())) {
            candle_core::bail!("{}: unexpected `{extra}`; nothing was loaded", self.caller)
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "cgc-state-{name}-{}.safetensors",
            std::process::id()
        ))
    }

    fn state() -> Result<HashMap<String, Tensor>> {
        Ok(HashMap::from([
            ("a".to_string(), Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?),
            ("b".to_string(), Tensor::new(7i64, &Device::Cpu)?),
        ]))
    }

    fn load_err(path: &Path, kind: &str) -> String {
        let err = load(path, kind).map(|_| ()).expect_err("accepted");
        err.to_string()
    }

    #[test]
    fn round_trips_and_refuses_another_kind() -> Result<()> {
        let path = temp("kind");
        save(&state()?, "ZClip", &path)?;
        let back = load(&path, "ZClip")?;
        assert_eq!(back["a"].to_vec1::<f32>()?, [1., 2., 3.]);
        assert_eq!(back["b"].to_scalar::<i64>()?, 7);
        let msg = load_err(&path, "GradScaler");
        assert!(
            msg.contains("holds the state of a ZClip, not of a GradScaler"),
            "{msg}"
        );
        std::fs::remove_file(&path)?;
        Ok(())
    }

    #[test]
    fn refuses_a_flipped_byte_anywhere_and_a_file_without_digests() -> Result<()> {
        let path = temp("flip");
        save(&state()?, "ZClip", &path)?;
        let good = std::fs::read(&path)?;
        // Every third byte of the file, flipped one at a time: never accepted.
        for i in (0..good.len()).step_by(3) {
            let mut bytes = good.clone();
            bytes[i] ^= 0x20;
            std::fs::write(&path, &bytes)?;
            assert!(load(&path, "ZClip").is_err(), "byte {i} flipped: accepted");
        }
        // A tensor's byte: named.
        let mut bytes = good.clone();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes)?;
        let msg = load_err(&path, "ZClip");
        assert!(msg.contains("does not match its digest"), "{msg}");
        // A plain safetensors file (what 0.1 wrote): refused, saying why.
        candle_core::safetensors::save(&state()?, &path)?;
        let msg = load_err(&path, "ZClip");
        assert!(msg.contains("has no digests"), "{msg}");
        std::fs::remove_file(&path)?;
        Ok(())
    }
}
