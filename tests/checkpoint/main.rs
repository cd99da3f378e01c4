//! Checkpoints and state files at scale and off the happy path: state dicts that hold their own
//! elements only, the memory of a save and of a load + restore (an ignored probe run alone by
//! `.ci/run`), saves on another thread while training goes on, optimizer state found by var
//! name whatever order the vars come in, every state file verified and every loaded value
//! checked, the format version a file names, and saves to one path from several processes.

#[path = "../common/mod.rs"]
mod common;

mod background;
mod by_name;
mod formats;
mod memory;
mod processes;
mod state_files;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{backprop::GradStore, Result, Var};
use candle_nn::{ParamsAdamW, VarMap};
use rand::{rngs::StdRng, SeedableRng};

use common::{bits, uniform_tensor};

/// A fresh folder for one test.
pub(crate) fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cgc-checkpoint-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The var named `name`.
pub(crate) fn var(varmap: &VarMap, name: &str) -> Var {
    varmap.data().lock().expect("lock")[name].clone()
}

/// Seeded gradients of step `k` for every var, keyed by var name (so that two VarMaps with the
/// same names get the same gradients, whatever order an optimizer lists the vars in).
pub(crate) fn grads(varmap: &VarMap, k: u64) -> Result<GradStore> {
    let data = varmap.data().lock().expect("lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut g = GradStore::default();
    for name in names {
        let seed = 1000 * k + name.bytes().map(u64::from).sum::<u64>();
        let mut rng = StdRng::seed_from_u64(seed);
        let v = &data[name];
        g.insert(v, uniform_tensor(&mut rng, v.dims(), v.dtype(), 1.0)?);
    }
    Ok(g)
}

/// Every var's bits, by name.
pub(crate) fn var_bits(varmap: &VarMap) -> Result<BTreeMap<String, Vec<u64>>> {
    let data = varmap.data().lock().expect("lock");
    data.iter()
        .map(|(n, v)| Ok((n.clone(), bits(v.as_tensor())?)))
        .collect()
}

pub(crate) fn params() -> ParamsAdamW {
    ParamsAdamW {
        lr: 1e-2,
        ..Default::default()
    }
}
