//! `TrainingCheckpoint` at library level: round trips with every float dtype and empty tensors,
//! a resume bitwise equal to the uninterrupted run, and every refusal leaving everything as it
//! was.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use candle_grad_clip::{
    AutoClip, ClipSetting, FusedAdamW, FusedSgd, GradScaler, TrainingCheckpoint, ZClip,
};
use candle_nn::{Optimizer, ParamsAdamW, VarMap};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::common::{bits, seeded_varmap, uniform_tensor};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cgc-train-lm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A var's name, shape and dtype.
type Spec = (&'static str, &'static [usize], DType);

/// Shapes and dtypes of the test model: every float dtype, an empty tensor, a scalar.
const SPECS: [(&str, &[usize], DType); 6] = [
    ("a.weight", &[4, 3], DType::F32),
    ("a.bias", &[3], DType::F64),
    ("b.weight", &[5, 2], DType::BF16),
    ("b.norm", &[7], DType::F16),
    ("empty", &[0, 3], DType::F32),
    ("scalar", &[], DType::F32),
];

fn sorted(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("lock");
    let mut v: Vec<_> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Seeded gradients for every var (step `k`), with a spike every few steps.
fn grads(varmap: &VarMap, k: u64) -> Result<GradStore> {
    let mut rng = StdRng::seed_from_u64(1000 + k);
    let scale = if k % 7 == 6 { 50.0 } else { 1.0 };
    let mut g = GradStore::default();
    for (_, var) in sorted(varmap) {
        g.insert(
            &var,
            uniform_tensor(&mut rng, var.dims(), var.dtype(), scale)?,
        );
    }
    Ok(g)
}

fn var_bits(varmap: &VarMap) -> Result<BTreeMap<String, Vec<u64>>> {
    sorted(varmap)
        .into_iter()
        .map(|(n, v)| Ok((n, bits(v.as_tensor())?)))
        .collect()
}

fn dict_bits(dict: &HashMap<String, Tensor>) -> Result<BTreeMap<String, Vec<u64>>> {
    dict.iter()
        .map(|(k, t)| Ok((k.clone(), bits(t)?)))
        .collect()
}

fn adamw(varmap: &VarMap, clip: Option<ClipSetting>) -> Result<FusedAdamW> {
    let params = ParamsAdamW {
        lr: 1e-2,
        ..Default::default()
    };
    let opt = FusedAdamW::from_varmap(varmap, params)?;
    match clip {
        Some(c) => opt.with_clip(c),
        None => Ok(opt),
    }
}

/// Everything a restore may change, as bits.
#[derive(Debug, PartialEq)]
struct Snapshot {
    vars: BTreeMap<String, Vec<u64>>,
    optimizer: BTreeMap<String, Vec<u64>>,
    clip: Option<BTreeMap<String, Vec<u64>>>,
    scaler: BTreeMap<String, Vec<u64>>,
}

fn snapshot(varmap: &VarMap, opt: &FusedAdamW, scaler: &GradScaler) -> Result<Snapshot> {
    let clip = match opt.clip_setting() {
        Some(ClipSetting::ZClip(z)) => Some(dict_bits(&z.state_dict()?)?),
        Some(ClipSetting::AutoClip(a)) => Some(dict_bits(&a.state_dict()?)?),
        _ => None,
    };
    Ok(Snapshot {
        vars: var_bits(varmap)?,
        optimizer: dict_bits(&opt.state_dict()?)?,
        clip,
        scaler: dict_bits(&scaler.state_dict()?)?,
    })
}

/// `steps` steps of the optimizer, and of the scaler on an F32 var of its own (GradScaler takes
/// F32 master gradients; the model has F16 and BF16 vars): clean steps grow the scale every 3
/// steps, every 5th step overflows and halves it.
fn train(
    varmap: &VarMap,
    opt: &mut FusedAdamW,
    scaler: &mut GradScaler,
    from: u64,
    steps: u64,
) -> Result<()> {
    for k in from..from + steps {
        opt.step(&grads(varmap, k)?)?;
        let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
        let mut sgd = FusedSgd::new(vec![w.clone()], Default::default())?;
        let mut g = GradStore::default();
        let x = if k % 5 == 4 { f32::INFINITY } else { 1.0 };
        g.insert(&w, Tensor::new(&[x, 0.0], &Device::Cpu)?);
        scaler.step(&mut sgd, &g)?;
        scaler.update()?;
    }
    Ok(())
}

fn scaler() -> GradScaler {
    GradScaler::new()
        .with_init_scale(1.0)
        .with_growth_interval(3)
}

#[test]
fn round_trip_and_bitwise_resume() -> Result<()> {
    let dir = temp_dir("round-trip");
    let path = dir.join("ckpt.safetensors");
    for clip in [
        None,
        Some(ClipSetting::norm(1.0)),
        Some(ClipSetting::ZClip(ZClip::new().with_warmup_steps(3))),
        Some(ClipSetting::AutoClip(
            AutoClip::new(50.0)?.with_capacity(4)?,
        )),
    ] {
        // The uninterrupted run: 12 steps.
        let full = seeded_varmap(1, &SPECS)?;
        let mut opt_full = adamw(&full, clip.clone())?;
        let mut scaler_full = scaler();
        train(&full, &mut opt_full, &mut scaler_full, 0, 12)?;

        // 7 steps, a checkpoint, 3 more steps that the resume forgets.
        let run = seeded_varmap(1, &SPECS)?;
        let mut opt = adamw(&run, clip.clone())?;
        let mut sc = scaler();
        train(&run, &mut opt, &mut sc, 0, 7)?;
        let saved = snapshot(&run, &opt, &sc)?;
        TrainingCheckpoint::new(&run, 7)?
            .with_optimizer(&opt)?
            .with_grad_scaler(&sc)?
            .with_metadata("data_position", "1234")
            .save(&path)?;
        train(&run, &mut opt, &mut sc, 7, 3)?;

        // A fresh process: other values, same model; restore, then the last 5 steps.
        let resumed = seeded_varmap(99, &SPECS)?;
        let mut opt2 = adamw(&resumed, clip.clone())?;
        let mut sc2 = scaler();
        let ck = TrainingCheckpoint::load(&path)?;
        assert_eq!((ck.step(), ck.metadata("data_position")), (7, Some("1234")));
        assert_eq!(ck.optimizer_kind(), Some("FusedAdamW"));
        ck.restore(&resumed)
            .optimizer(&mut opt2)
            .grad_scaler(&mut sc2)
            .apply()?;
        assert_eq!(
            snapshot(&resumed, &opt2, &sc2)?,
            saved,
            "{clip:?}: restored state"
        );
        train(&resumed, &mut opt2, &mut sc2, 7, 5)?;
        assert_eq!(
            snapshot(&resumed, &opt2, &sc2)?,
            snapshot(&full, &opt_full, &scaler_full)?,
            "{clip:?}: the resumed run is the uninterrupted one"
        );
        assert_eq!(opt2.steps()?, opt_full.steps()?);
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn separate_clip_setting_round_trip() -> Result<()> {
    let dir = temp_dir("separate-clip");
    let path = dir.join("ckpt.safetensors");
    let vm = seeded_varmap(3, &SPECS[..2])?;
    let vars: Vec<Var> = sorted(&vm).into_iter().map(|(_, v)| v).collect();
    let mut clip = ClipSetting::AutoClip(AutoClip::new(30.0)?);
    if let ClipSetting::AutoClip(a) = &mut clip {
        for k in 0..5 {
            a.clip_(&vars, &mut grads(&vm, k)?)?;
        }
    }
    TrainingCheckpoint::new(&vm, 5)?
        .with_clip(&clip)?
        .save(&path)?;
    let mut other = ClipSetting::AutoClip(AutoClip::new(30.0)?);
    TrainingCheckpoint::load(&path)?
        .restore(&vm)
        .clip(&mut other)
        .apply()?;
    match (&clip, &other) {
        (ClipSetting::AutoClip(a), ClipSetting::AutoClip(b)) => {
            assert_eq!(a.observed(), b.observed());
            assert_eq!(a.threshold(), b.threshold());
        }
        _ => panic!("not AutoClip"),
    }
    // A ZClip setting in the file, an AutoClip given: refused, unchanged.
    TrainingCheckpoint::new(&vm, 5)?
        .with_clip(&ClipSetting::ZClip(ZClip::new()))?
        .save(&path)?;
    let err = TrainingCheckpoint::load(&path)?
        .restore(&vm)
        .clip(&mut other)
        .apply()
        .unwrap_err()
        .to_string();
    assert!(err.contains("zclip") && err.contains("autoclip"), "{err}");
    if let ClipSetting::AutoClip(b) = &other {
        assert_eq!(b.observed(), 5);
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The trained state every refusal is checked against.
struct Fixture {
    dir: PathBuf,
    path: PathBuf,
    varmap: VarMap,
    opt: FusedAdamW,
    scaler: GradScaler,
}

fn fixture(name: &str, clip: Option<ClipSetting>) -> Result<Fixture> {
    let dir = temp_dir(name);
    let path = dir.join("ckpt.safetensors");
    let varmap = seeded_varmap(5, &SPECS)?;
    let mut opt = adamw(&varmap, clip)?;
    let mut scaler = scaler();
    train(&varmap, &mut opt, &mut scaler, 0, 4)?;
    TrainingCheckpoint::new(&varmap, 4)?
        .with_optimizer(&opt)?
        .with_grad_scaler(&scaler)?
        .save(&path)?;
    // Move on, so that a restore would visibly change everything.
    train(&varmap, &mut opt, &mut scaler, 4, 2)?;
    Ok(Fixture {
        dir,
        path,
        varmap,
        opt,
        scaler,
    })
}

/// Restoring `file` into the fixture fails with an error containing `needle`, and nothing
/// changes.
fn refused_restore(f: &mut Fixture, file: &Path, needle: &str) -> Result<()> {
    let before = snapshot(&f.varmap, &f.opt, &f.scaler)?;
    let err = TrainingCheckpoint::load(file).and_then(|ck| {
        ck.restore(&f.varmap)
            .optimizer(&mut f.opt)
            .grad_scaler(&mut f.scaler)
            .apply()
    });
    let msg = match err {
        Ok(()) => panic!("expected a refusal containing `{needle}`"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains(needle), "`{needle}` not in: {msg}");
    assert!(msg.contains("nothing was"), "{msg}");
    assert_eq!(
        snapshot(&f.varmap, &f.opt, &f.scaler)?,
        before,
        "changed by: {msg}"
    );
    Ok(())
}

#[test]
fn refuses_truncated_and_corrupt_files() -> Result<()> {
    let mut f = fixture(
        "corrupt",
        Some(ClipSetting::ZClip(ZClip::new().with_warmup_steps(2))),
    )?;
    let bytes = std::fs::read(&f.path)?;
    let bad = f.dir.join("bad.safetensors");
    // Truncated anywhere: inside the length, the header, the data, one byte short.
    for len in [0, 5, 8, 40, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&bad, &bytes[..len])?;
        refused_restore(&mut f, &bad, "not a complete safetensors file")?;
    }
    // One trailing byte too many.
    let mut longer = bytes.clone();
    longer.push(0);
    std::fs::write(&bad, &longer)?;
    refused_restore(&mut f, &bad, "safetensors")?;
    // A flipped bit in every tensor's data (the last bytes of the file are data), and in the
    // header (a digit of the step: still valid JSON).
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    for offset in [
        bytes.len() - 1,
        8 + header_len,
        8 + header_len + (bytes.len() - 8 - header_len) / 2,
    ] {
        let mut flipped = bytes.clone();
        flipped[offset] ^= 0x10;
        std::fs::write(&bad, &flipped)?;
        refused_restore(&mut f, &bad, "does not match its digest")?;
    }
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).expect("utf-8 header");
    let at = header.find("\"step\":\"4\"").expect("the step entry") + "\"step\":\"".len();
    let mut flipped = bytes.clone();
    flipped[8 + at] = b'5';
    std::fs::write(&bad, &flipped)?;
    refused_restore(&mut f, &bad, "digest of its header")?;
    // Any byte of the header flipped: refused whatever it hits (JSON, a name, a digest).
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..40 {
        let mut flipped = bytes.clone();
        let i = 8 + rng.gen_range(0..header_len);
        flipped[i] ^= 1 << rng.gen_range(0..7);
        if flipped[i] == b' ' || bytes[i] == b' ' {
            continue; // the header's padding
        }
        std::fs::write(&bad, &flipped)?;
        let before = snapshot(&f.varmap, &f.opt, &f.scaler)?;
        assert!(
            TrainingCheckpoint::load(&bad).is_err(),
            "flipped header byte {i} accepted"
        );
        assert_eq!(snapshot(&f.varmap, &f.opt, &f.scaler)?, before);
    }
    // A safetensors file that is not a training checkpoint.
    candle_core::safetensors::save(
        &HashMap::from([("x", Tensor::new(&[1f32], &Device::Cpu)?)]),
        &bad,
    )?;
    refused_restore(&mut f, &bad, "not a training checkpoint")?;
    // A missing file.
    let missing = f.dir.join("missing.safetensors");
    refused_restore(&mut f, &missing, "cannot be read")?;
    std::fs::remove_dir_all(&f.dir)?;
    Ok(())
}

#[test]
fn refuses_mismatched_components() -> Result<()> {
    let mut f = fixture(
        "mismatch",
        Some(ClipSetting::ZClip(ZClip::new().with_warmup_steps(2))),
    )?;
    let file = f.path.clone();
    let before = snapshot(&f.varmap, &f.opt, &f.scaler)?;

    // A var of another shape, another dtype, missing, or one more.
    let cases: [(&str, Vec<Spec>, &str); 4] = [
        (
            "shape",
            SPECS
                .iter()
                .map(|&(n, s, d)| {
                    if n == "b.norm" {
                        (n, &[8usize][..], d)
                    } else {
                        (n, s, d)
                    }
                })
                .collect(),
            "shape",
        ),
        (
            "dtype",
            SPECS
                .iter()
                .map(|&(n, s, d)| {
                    if n == "a.bias" {
                        (n, s, DType::F32)
                    } else {
                        (n, s, d)
                    }
                })
                .collect(),
            "dtype",
        ),
        (
            "extra in file",
            SPECS[1..].to_vec(),
            "which the VarMap does not have",
        ),
        (
            "missing in file",
            SPECS
                .iter()
                .copied()
                .chain([("c.new", &[2usize][..], DType::F32)])
                .collect(),
            "has no var `c.new`",
        ),
    ];
    for (what, specs, needle) in cases {
        let vm = seeded_varmap(11, &specs)?;
        let vm_before = var_bits(&vm)?;
        let mut opt = adamw(
            &vm,
            Some(ClipSetting::ZClip(ZClip::new().with_warmup_steps(2))),
        )?;
        let opt_before = dict_bits(&opt.state_dict()?)?;
        let mut sc = scaler();
        let err = TrainingCheckpoint::load(&file)?
            .restore(&vm)
            .optimizer(&mut opt)
            .grad_scaler(&mut sc)
            .apply()
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{what}: {err}");
        assert_eq!(var_bits(&vm)?, vm_before, "{what}");
        assert_eq!(dict_bits(&opt.state_dict()?)?, opt_before, "{what}");
    }

    // Another optimizer kind; another clip setting; a component missing on either side.
    let sgd_vm = seeded_varmap(5, &SPECS)?;
    let sgd = FusedSgd::from_varmap(&sgd_vm, Default::default())?;
    let sgd_file = f.dir.join("sgd.safetensors");
    TrainingCheckpoint::new(&sgd_vm, 1)?
        .with_optimizer(&sgd)?
        .with_grad_scaler(&scaler())?
        .save(&sgd_file)?;
    refused_restore(
        &mut f,
        &sgd_file,
        "the state of a FusedSgd, not of a FusedAdamW",
    )?;

    for (clip, needle) in [
        (Some(ClipSetting::AutoClip(AutoClip::default())), "autoclip"),
        (Some(ClipSetting::ZClip(ZClip::new())), "warmup_steps=25"),
        (None, "this one with zclip"),
    ] {
        let vm = seeded_varmap(5, &SPECS)?;
        let other = adamw(&vm, clip)?;
        let other_file = f.dir.join("other.safetensors");
        TrainingCheckpoint::new(&vm, 1)?
            .with_optimizer(&other)?
            .with_grad_scaler(&scaler())?
            .save(&other_file)?;
        refused_restore(&mut f, &other_file, needle)?;
    }

    let no_scaler = f.dir.join("no-scaler.safetensors");
    TrainingCheckpoint::new(&f.varmap, 1)?
        .with_optimizer(&f.opt)?
        .save(&no_scaler)?;
    refused_restore(&mut f, &no_scaler, "holds no GradScaler state")?;
    let no_optimizer = f.dir.join("no-optimizer.safetensors");
    TrainingCheckpoint::new(&f.varmap, 1)?
        .with_grad_scaler(&f.scaler)?
        .save(&no_optimizer)?;
    refused_restore(&mut f, &no_optimizer, "holds no optimizer state")?;
    // Saved with a scaler and an optimizer, restored without them.
    let err = TrainingCheckpoint::load(&file)?
        .restore(&f.varmap)
        .apply()
        .unwrap_err()
        .to_string();
    assert!(err.contains("pass the optimizer"), "{err}");

    // A missing optimizer tensor: the state of an optimizer over fewer vars (keyed by the vars'
    // names in the checkpoint, the third var's is missing).
    let vm = seeded_varmap(5, &SPECS)?;
    let vars: Vec<Var> = sorted(&vm).into_iter().map(|(_, v)| v).collect();
    let small = FusedAdamW::new(vars[..2].to_vec(), ParamsAdamW::default())?;
    let mut big = FusedAdamW::new(vars.clone(), ParamsAdamW::default())?;
    big.step(&grads(&vm, 0)?)?;
    let big_before = dict_bits(&big.state_dict()?)?;
    let vm_before = var_bits(&vm)?;
    let small_file = f.dir.join("small.safetensors");
    TrainingCheckpoint::new(&vm, 1)?
        .with_optimizer(&small)?
        .save(&small_file)?;
    // The vars of the file differ from the current ones (one step was taken since): a restore
    // would change them.
    let err = TrainingCheckpoint::load(&small_file)?
        .restore(&vm)
        .optimizer(&mut big)
        .apply()
        .unwrap_err()
        .to_string();
    assert!(err.contains("has no `b.norm.exp_avg` (var #2)"), "{err}");
    assert_eq!(dict_bits(&big.state_dict()?)?, big_before);
    assert_eq!(var_bits(&vm)?, vm_before);

    // A scaler in the middle of a step is refused by its own load (after unscale_).
    let mut mid = scaler();
    let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    let mut g = GradStore::default();
    g.insert(&w, Tensor::new(&[1f32, 2.0], &Device::Cpu)?);
    mid.unscale_(&[w], &mut g)?;
    let vm_before = var_bits(&f.varmap)?;
    let err = TrainingCheckpoint::load(&file)?
        .restore(&f.varmap)
        .optimizer(&mut f.opt)
        .grad_scaler(&mut mid)
        .apply()
        .unwrap_err()
        .to_string();
    assert!(err.contains("step is in progress"), "{err}");
    assert_eq!(var_bits(&f.varmap)?, vm_before);

    assert_eq!(snapshot(&f.varmap, &f.opt, &f.scaler)?, before);
    std::fs::remove_dir_all(&f.dir)?;
    Ok(())
}

#[test]
fn a_crashed_save_leaves_the_old_checkpoint() -> Result<()> {
    // What a crash during a save of 0.1 left (and of this version on a file system without
    // O_TMPFILE): a torn temporary file next to the old checkpoint.
    let f = fixture("crashed-save", None)?;
    let torn = f.dir.join(".ckpt.safetensors.tmp-12345-0");
    let bytes = std::fs::read(&f.path)?;
    std::fs::write(&torn, &bytes[..bytes.len() / 2])?;
    assert_eq!(TrainingCheckpoint::load(&f.path)?.step(), 4);
    // The next save replaces the checkpoint and leaves nothing of its own behind.
    TrainingCheckpoint::new(&f.varmap, 6)?
        .with_optimizer(&f.opt)?
        .with_grad_scaler(&f.scaler)?
        .save(&f.path)?;
    assert_eq!(TrainingCheckpoint::load(&f.path)?.step(), 6);
    assert_eq!(std::fs::read_dir(&f.dir)?.count(), 2);
    std::fs::remove_dir_all(&f.dir)?;
    Ok(())
}

/// A GradScaler taken during a step (after `unscale_`, or `step`, before `update`) would not
/// match the optimizer's state: refused, and accepted again after `update`.
#[test]
fn refuses_a_grad_scaler_during_a_step() -> Result<()> {
    let varmap = VarMap::new();
    let w = Var::ones(2, DType::F32, &Device::Cpu)?;
    let mut sgd = FusedSgd::new(vec![w.clone()], Default::default())?;
    let mut scaler = scaler();
    let grads_of = || -> Result<GradStore> {
        let mut g = GradStore::default();
        g.insert(&w, Tensor::new(&[0.5f32, -0.5], &Device::Cpu)?);
        Ok(g)
    };
    let mut g = grads_of()?;
    scaler.unscale_(std::slice::from_ref(&w), &mut g)?;
    let err = TrainingCheckpoint::new(&varmap, 0)?
        .with_grad_scaler(&scaler)
        .expect_err("after unscale_");
    assert!(err.to_string().contains("step is in progress"), "{err}");
    scaler.step(&mut sgd, &g)?;
    assert!(TrainingCheckpoint::new(&varmap, 0)?
        .with_grad_scaler(&scaler)
        .is_err());
    scaler.update()?;
    let ck = TrainingCheckpoint::new(&varmap, 1)?.with_grad_scaler(&scaler)?;
    // And the state it holds is the updated one: it restores into a fresh scaler.
    let mut fresh = GradScaler::new();
    ck.restore(&varmap).grad_scaler(&mut fresh).apply()?;
    assert_eq!(fresh.scale_value()?, scaler.scale_value()?);
    Ok(())
}
