//! A `VarMap`'s vars, sorted by name: the one order every process agrees on (its `HashMap`
//! order differs between processes).

use candle_core::{Result, Var};
use candle_nn::VarMap;

/// Every `(name, var)` of `varmap`, sorted by name; the handles are copied out so that the lock
/// is not held afterwards. `caller` names the public call in the error of a poisoned lock.
pub(crate) fn sorted_vars(varmap: &VarMap, caller: &str) -> Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{caller}: the VarMap's lock is poisoned")))?;
    let mut vars: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}
