//! Per-tensor norms (`grad_norms`) and norm statistics (`GradNormStats`) against f64 references.

use super::*;
use crate::common::ref_quantile;

#[test]
fn grad_norms_match_an_f64_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(3);
    let varmap = VarMap::new();
    let names = ["layer2.weight", "layer1.bias", "layer1.weight", "frozen"];
    let mut grads = GradStore::default();
    let mut expected: Vec<(String, Vec<f64>)> = Vec::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    for (i, name) in names.iter().enumerate() {
        vb.get(SHAPES[i % SHAPES.len()], name)?;
    }
    let data = varmap.data().lock().unwrap().clone();
    for name in names.iter().filter(|n| **n != "frozen") {
        let var = &data[*name];
        let g = random(var.elem_count(), 2.0, &mut rng);
        let f: Vec<f32> = g.iter().map(|&x| x as f32).collect();
        grads.insert(var, Tensor::from_vec(f, var.shape(), &Device::Cpu)?);
        expected.push((
            name.to_string(),
            g.iter().map(|&x| x as f32 as f64).collect(),
        ));
    }
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    for norm_type in [NormType::L2, NormType::L1, NormType::Inf, NormType::P(3.5)] {
        let got = grad_norms(&varmap, &grads, norm_type)?;
        let names_got: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names_got, ["layer1.bias", "layer1.weight", "layer2.weight"]);
        for ((name, norm), (_, g)) in got.iter().zip(&expected) {
            let reference = ref_norm(std::slice::from_ref(g), norm_type) as f32;
            assert!(
                (norm - reference).abs() <= 1e-6 * reference,
                "{name} {norm_type}: {norm} vs {reference}"
            );
        }
    }
    assert!(grad_norms(&varmap, &grads, NormType::P(-1.0)).is_err());
    Ok(())
}

#[test]
fn grad_norm_stats_match_a_sorted_reference() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(9);
    let mut stats = GradNormStats::new();
    let mut reference = Vec::new();
    for i in 0..257 {
        let x = rng.gen::<f64>() * 10.0;
        if i % 50 == 7 {
            stats.record(&Tensor::new(f32::NAN, &Device::Cpu)?)?;
        }
        // Mix dtypes: F64 norms and F32 ones.
        if i % 2 == 0 {
            stats.record(&Tensor::new(x, &Device::Cpu)?)?;
            reference.push(x);
        } else {
            stats.record(&Tensor::new(x as f32, &Device::Cpu)?)?;
            reference.push(x as f32 as f64);
        }
    }
    stats.record(&Tensor::new(f32::INFINITY, &Device::Cpu)?)?;
    assert_eq!(stats.count(), 257 + 5 + 1);
    assert_eq!(stats.nonfinite()?, 6);
    let mean = reference.iter().sum::<f64>() / reference.len() as f64;
    let std =
        (reference.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / reference.len() as f64).sqrt();
    reference.sort_by(f64::total_cmp);
    assert!((stats.mean()? - mean).abs() < 1e-12);
    assert!((stats.suggest_max_norm()? - mean).abs() < 1e-12);
    assert!((stats.std()? - std).abs() < 1e-12);
    assert_eq!(stats.min()?, reference[0]);
    assert_eq!(stats.max()?, reference[reference.len() - 1]);
    for q in [0.0, 0.1, 0.25, 0.5, 0.9, 0.99, 1.0, 1.0 / 3.0] {
        assert!(
            (stats.quantile(q)? - ref_quantile(&reference, q)).abs() < 1e-12,
            "q = {q}"
        );
    }
    // Errors change nothing.
    assert!(stats.quantile(-0.1).is_err());
    assert!(stats.quantile(f64::NAN).is_err());
    assert!(stats
        .record(&Tensor::new(&[1f32, 2.], &Device::Cpu)?)
        .is_err());
    assert!(stats.record(&Tensor::new(3u32, &Device::Cpu)?).is_err());
    assert_eq!(stats.count(), 263);
    assert!(GradNormStats::new().mean().is_err());
    Ok(())
}
