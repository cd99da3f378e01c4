//! Refusals and odd inputs: bad configs and bad gradients are refused and change nothing; mixed
//! dtypes, views, vars without gradients, integer and empty vars.

use super::*;

#[test]
fn bad_configs_are_refused_and_nothing_changes() -> Result<()> {
    let bad_adamw = [
        ParamsAdamW {
            lr: -1e-3,
            ..Default::default()
        },
        ParamsAdamW {
            lr: f64::NAN,
            ..Default::default()
        },
        ParamsAdamW {
            beta1: 1.0,
            ..Default::default()
        },
        ParamsAdamW {
            beta2: -0.1,
            ..Default::default()
        },
        ParamsAdamW {
            eps: 0.0,
            ..Default::default()
        },
        ParamsAdamW {
            weight_decay: f64::INFINITY,
            ..Default::default()
        },
        ParamsAdamW {
            weight_decay: -0.1,
            ..Default::default()
        },
    ];
    let w = Var::new(&[1f32, 2.], &Device::Cpu)?;
    let mut opt = FusedAdamW::new(vec![w.clone()], ParamsAdamW::default())?;
    for p in bad_adamw {
        assert!(
            FusedAdamW::new(vec![w.clone()], p.clone()).is_err(),
            "{p:?}"
        );
        assert!(opt.set_params(p.clone()).is_err(), "{p:?}");
        assert_eq!(opt.params().lr, ParamsAdamW::default().lr);
    }
    // An invalid learning rate through the trait is refused at the step, nothing written.
    opt.set_learning_rate(f64::NAN);
    let mut grads = GradStore::default();
    grads.insert(&w, Tensor::new(&[1f32, 1.], &Device::Cpu)?);
    let before = bits(&w)?;
    assert!(opt.step(&grads).is_err());
    assert_eq!(bits(&w)?, before);
    assert_eq!(opt.steps()?, 0);
    let bad_sgd = [
        ParamsSgd {
            lr: -0.1,
            ..Default::default()
        },
        ParamsSgd {
            momentum: -0.5,
            ..Default::default()
        },
        ParamsSgd {
            weight_decay: -1.0,
            ..Default::default()
        },
        ParamsSgd {
            nesterov: true,
            ..Default::default()
        },
        ParamsSgd {
            nesterov: true,
            momentum: 0.9,
            dampening: 0.1,
            ..Default::default()
        },
        ParamsSgd {
            dampening: f64::NAN,
            ..Default::default()
        },
    ];
    let mut sgd = FusedSgd::new(vec![w.clone()], ParamsSgd::default())?;
    for p in bad_sgd {
        let err = FusedSgd::new(vec![w.clone()], p.clone())
            .expect_err("refused")
            .to_string();
        assert!(err.contains("ParamsSgd"), "{err}");
        assert!(sgd.set_params(p).is_err());
        assert_eq!(sgd.params(), &ParamsSgd::default());
    }
    assert!(FusedSgd::new(vec![], ParamsSgd::default())?
        .with_clip(ClipSetting::value(f64::NAN))
        .is_err());
    Ok(())
}

#[test]
fn bad_gradients_are_refused_and_nothing_changes() -> Result<()> {
    let w = Var::new(&[1f32, 2., 3., 4.], &Device::Cpu)?;
    let v = Var::new(&[1f32, 2.], &Device::Cpu)?;
    let mut opt = FusedAdamW::new(vec![v.clone(), w.clone()], ParamsAdamW::default())?;
    let before = (bits(&w)?, bits(&v)?, state_bits(&opt.state_dict()?)?);
    let cases = [
        ("dtype", Tensor::new(&[1f64, 2., 3., 4.], &Device::Cpu)?),
        ("shape", Tensor::new(&[1f32, 2., 3.], &Device::Cpu)?),
        ("storage", w.as_tensor().clone()),
    ];
    for (what, g) in cases {
        let mut grads = GradStore::default();
        grads.insert(&v, Tensor::new(&[1f32, 1.], &Device::Cpu)?);
        grads.insert(&w, g);
        let err = opt.step(&grads).expect_err(what).to_string();
        assert!(err.contains("var #1"), "{what}: {err}");
        assert_eq!(
            (bits(&w)?, bits(&v)?, state_bits(&opt.state_dict()?)?),
            before,
            "{what}"
        );
    }
    Ok(())
}

/// Mixed dtypes in one optimizer, a transposed (non-contiguous) gradient, a var never given a
/// gradient, an integer var (left out), an empty var.
#[test]
fn mixed_dtypes_views_and_vars_without_gradients() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(8);
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for dtype in [DType::F32, DType::F64] {
        let t = tensor(&signed_values(&mut rng, 12, 1.0), &[3, 4], dtype)?;
        ours.push(Var::from_tensor(&t)?);
        theirs.push(Var::from_tensor(&t)?);
    }
    let idle = Var::new(&[5f32], &Device::Cpu)?;
    let ints = Var::from_tensor(&Tensor::new(&[1u32, 2], &Device::Cpu)?)?;
    let empty = Var::zeros(0, DType::F32, &Device::Cpu)?;
    let mut all = ours.clone();
    all.extend([idle.clone(), ints.clone(), empty.clone()]);
    let mut fused = FusedAdamW::new(all, ParamsAdamW::default())?;
    assert_eq!(fused.vars().len(), 4, "the integer var is left out");
    let mut reference = AdamW::new(theirs.clone(), ParamsAdamW::default())?;
    for _ in 0..3 {
        let (mut ga, mut gb) = (GradStore::default(), GradStore::default());
        for (a, b) in ours.iter().zip(&theirs) {
            let g = signed_values(&mut rng, 12, 1.0);
            // Given as the transpose of a (4, 3) tensor: a strided view.
            let gt = tensor(&g, &[4, 3], a.dtype())?;
            ga.insert(a, gt.t()?);
            gb.insert(b, gt.t()?.contiguous()?);
        }
        ga.insert(&empty, Tensor::zeros(0, DType::F32, &Device::Cpu)?);
        fused.step(&ga)?;
        reference.step(&gb)?;
        assert_eq!(vars_bits(&ours)?, vars_bits(&theirs)?);
    }
    assert_eq!(idle.to_vec1::<f32>()?, [5.0]);
    let state = fused.state_dict()?;
    assert_eq!(
        state["2.exp_avg"].to_vec1::<f32>()?,
        [0.0],
        "no gradient, no moment"
    );
    Ok(())
}
