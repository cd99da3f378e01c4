//! The file a checkpoint writes: plain safetensors that candle reads too, laid out as the
//! safetensors crate lays it out, and a file of the 0.1 format (v1) refused with an error that
//! names its version.

use std::collections::HashMap;

use candle_core::{DType, Device, Result};
use candle_grad_clip::{CheckpointStatus, FusedSgd, TrainingCheckpoint, ZClip};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

use crate::common::seeded_varmap;
use crate::temp_dir;

const SPECS: [(&str, &[usize], DType); 3] = [
    ("x", &[3, 2], DType::F32),
    ("y", &[4], DType::F16),
    ("z", &[0, 2], DType::F64),
];

#[test]
fn candle_reads_a_checkpoint_as_plain_safetensors() -> Result<()> {
    let dir = temp_dir("plain");
    let path = dir.join("ckpt.safetensors");
    let vm = seeded_varmap(5, &SPECS)?;
    let opt = FusedSgd::from_varmap(&vm, Default::default())?;
    TrainingCheckpoint::new(&vm, 2)?
        .with_optimizer(&opt)?
        .save(&path)?;
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    for (name, _, _) in SPECS {
        let saved = &tensors[&format!("vars/{name}")];
        let live = vm.data().lock().expect("lock")[name].as_tensor().clone();
        assert_eq!(crate::common::bits(saved)?, crate::common::bits(&live)?);
    }
    assert_eq!(tensors["optimizer/step"].to_scalar::<i64>()?, 0);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The header digest as the format defines it: every metadata entry but `sha256`, then every
/// tensor's name, dtype and shape, each length-prefixed (an independent transcription).
fn header_digest(meta: &HashMap<String, String>, file: &SafeTensors<'_>) -> String {
    let mut h = Sha256::new();
    let mut put = |s: &[u8]| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s);
    };
    let mut keys: Vec<&String> = meta.keys().filter(|k| *k != "sha256").collect();
    keys.sort();
    for k in keys {
        put(k.as_bytes());
        put(meta[k].as_bytes());
    }
    let mut names = file.names();
    names.sort();
    for name in names {
        let view = file.tensor(name).expect("listed");
        let dtype = DType::try_from(view.dtype()).expect("a candle dtype");
        put(name.as_bytes());
        put(format!("{dtype:?}").as_bytes());
        put(format!("{:?}", view.shape()).as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_checkpoint_of_the_01_format_is_refused_naming_its_version() -> Result<()> {
    let dir = temp_dir("v1");
    let path = dir.join("ckpt.safetensors");
    TrainingCheckpoint::new(&seeded_varmap(5, &SPECS)?, 4)?.save(&path)?;
    // Rewrite it as 0.1 wrote it: format v1, digests valid.
    let bytes = std::fs::read(&path)?;
    let file = SafeTensors::deserialize(&bytes).expect("parses");
    let (_, header) = SafeTensors::read_metadata(&bytes).expect("parses");
    let mut meta = header.metadata().clone().expect("metadata");
    meta.insert(
        "format".into(),
        "candle-grad-clip training checkpoint v1".into(),
    );
    meta.insert("sha256".into(), header_digest(&meta, &file));
    let v1 = safetensors::serialize(file.tensors(), Some(meta)).expect("serializes");
    std::fs::write(&path, v1)?;
    assert!(matches!(
        TrainingCheckpoint::inspect(&path)?,
        CheckpointStatus::NotACheckpoint(reason) if reason.contains("v1")
    ));
    let err = TrainingCheckpoint::load(&path)
        .expect_err("v1 accepted")
        .to_string();
    assert!(
        err.contains("has format `candle-grad-clip training checkpoint v1`")
            && err.contains("reads `candle-grad-clip training checkpoint v2`"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// What a loop reacts to without parsing an error: `inspect` finds an intact checkpoint (its
/// step), a damaged one (truncated at any of a few lengths, a bit flipped in the header, in a
/// tensor or in the padding, random bytes, an empty file), another kind of file (a `save_state`
/// file), and fails only on a file it cannot read. `fits` tells this run's model from another's.
#[test]
fn inspect_tells_intact_damaged_and_foreign_files_apart() -> Result<()> {
    let dir = temp_dir("inspect");
    let path = dir.join("ckpt.safetensors");
    let vm = seeded_varmap(9, &SPECS)?;
    let opt = FusedSgd::from_varmap(&vm, Default::default())?;
    let checkpoint = TrainingCheckpoint::new(&vm, 42)?.with_optimizer(&opt)?;
    checkpoint.save(&path)?;
    assert_eq!(
        TrainingCheckpoint::inspect(&path)?,
        CheckpointStatus::Intact { step: 42 }
    );
    let good = std::fs::read(&path)?;
    let damaged = |bytes: &[u8], what: &str| -> Result<()> {
        std::fs::write(&path, bytes)?;
        let status = TrainingCheckpoint::inspect(&path)?;
        assert!(
            matches!(status, CheckpointStatus::Damaged(_)),
            "{what}: {status:?}"
        );
        Ok(())
    };
    for cut in [0, 7, 8, good.len() / 2, good.len() - 1] {
        damaged(&good[..cut], &format!("truncated at {cut}"))?;
    }
    let header_len = u64::from_le_bytes(good[..8].try_into().expect("8 bytes")) as usize;
    for at in [20, 8 + header_len / 2, 8 + header_len + 1, good.len() - 2] {
        let mut flipped = good.clone();
        flipped[at] ^= 0x10;
        damaged(&flipped, &format!("bit flipped at byte {at}"))?;
    }
    damaged(&[0x5a; 300], "random bytes")?;
    // A ZClip state file: intact, but not a training checkpoint.
    ZClip::new().save_state(&path)?;
    assert!(matches!(
        TrainingCheckpoint::inspect(&path)?,
        CheckpointStatus::NotACheckpoint(_)
    ));
    assert!(TrainingCheckpoint::inspect(dir.join("missing.safetensors")).is_err());

    // `fits`: the same model, and three others (a shape, a dtype, a var more).
    assert!(checkpoint.fits(&vm)?);
    for other in [
        vec![
            ("x", &[3usize, 3][..], DType::F32),
            ("y", &[4][..], DType::F16),
            ("z", &[0, 2][..], DType::F64),
        ],
        vec![
            ("x", &[3, 2][..], DType::F64),
            ("y", &[4][..], DType::F16),
            ("z", &[0, 2][..], DType::F64),
        ],
        vec![
            ("x", &[3, 2][..], DType::F32),
            ("y", &[4][..], DType::F16),
            ("z", &[0, 2][..], DType::F64),
            ("w", &[1][..], DType::F32),
        ],
    ] {
        assert!(!checkpoint.fits(&seeded_varmap(9, &other)?)?, "{other:?}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
