//! The norm across ranks of CUDA gradients (`LocalGroup` ranks on this GPU; NCCL too with the
//! `nccl` feature) is the one-process CUDA norm.

use super::*;
use candle_grad_clip::ClipGradNorm;

/// The norm across ranks on CUDA gradients (`dist`): two `LocalGroup` ranks on this GPU, each
/// owning every other tensor. The local sums are the kernels' own chunk partials (read back and
/// added exactly), so for L1, L2 and Inf the norm and the clipped gradients are bitwise the
/// one-process CUDA call's; for p = 7 the root is taken on the host (the GPU's `pow` may differ
/// by an ulp): both ranks agree, within 4 ulps of the one-process norm. With `nccl`, the same
/// through an NCCL communicator of one rank.
#[test]
fn norm_across_ranks_of_cuda_gradients_is_the_one_process_cuda_norm() -> Result<()> {
    use candle_grad_clip::{LocalGroup, ProcessGroup};
    let Some(dev) = cuda("norm_across_ranks_of_cuda_gradients_is_the_one_process_cuda_norm") else {
        return Ok(());
    };
    let shapes: [&[usize]; 5] = [&[5000], &[33, 17], &[1], &[70_000], &[3, 3]];
    for dtype in DTYPES {
        for norm_type in [NormType::L1, NormType::L2, NormType::Inf, NormType::P(7.0)] {
            let exact = norm_type != NormType::P(7.0);
            let mut rng = StdRng::seed_from_u64(41);
            let grads: Vec<Tensor> = shapes
                .iter()
                .map(|s| {
                    let n: usize = s.iter().product();
                    tensor(&random_values(&mut rng, n, 1.0), s, dtype, &dev)
                })
                .collect::<Result<_>>()?;
            let vars: Vec<Var> = shapes
                .iter()
                .map(|s| Var::zeros(s.to_vec(), dtype, &dev))
                .collect::<Result<_>>()?;
            let clip = ClipGradNorm::new(0.5).with_norm_type(norm_type);
            let mut one_process = GradStore::default();
            for (v, g) in vars.iter().zip(&grads) {
                one_process.insert(v, g.copy()?);
            }
            let want_norm = clip.clip_(&vars, &mut one_process)?;
            let want_value = want_norm.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let want_norm = (want_norm.dtype(), common::bits(&want_norm)?);
            let want: Vec<Vec<u64>> = vars
                .iter()
                .map(|v| common::bits(one_process.get(v).expect("grad")))
                .collect::<Result<_>>()?;
            let ranks = LocalGroup::on_devices(vec![dev.clone(), dev.clone()])?;
            let results: Vec<Result<(DType, Vec<u64>)>> = std::thread::scope(|s| {
                let handles: Vec<_> = ranks
                    .iter()
                    .map(|g| {
                        let (grads, vars, want, want_norm) = (&grads, &vars, &want, &want_norm);
                        let dev = dev.clone();
                        s.spawn(move || -> Result<(DType, Vec<u64>)> {
                            let mut store = GradStore::default();
                            let mine: Vec<usize> =
                                (0..vars.len()).filter(|i| i % 2 == g.rank()).collect();
                            for &i in &mine {
                                store.insert(&vars[i], grads[i].copy()?);
                            }
                            let owned: Vec<Var> = mine.iter().map(|&i| vars[i].clone()).collect();
                            let norm = clip.clip_across_(&owned, &mut store, g)?;
                            assert!(norm.device().same_device(&dev));
                            let got = (norm.dtype(), common::bits(&norm)?);
                            if exact {
                                assert_eq!(&got, want_norm, "{dtype:?} {norm_type:?}: the norm");
                                for &i in &mine {
                                    let got = common::bits(store.get(&vars[i]).expect("grad"))?;
                                    assert_eq!(got, want[i], "{dtype:?} {norm_type:?}: grad {i}");
                                }
                            }
                            Ok(got)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a rank panicked"))
                    .collect()
            });
            let got: Vec<(DType, Vec<u64>)> = results.into_iter().collect::<Result<_>>()?;
            assert_eq!(
                got[0], got[1],
                "{dtype:?} {norm_type:?}: the ranks disagree"
            );
            if !exact {
                let norm = if got[0].0 == DType::F64 {
                    f64::from_bits(got[0].1[0])
                } else {
                    f32::from_bits(got[0].1[0] as u32) as f64
                };
                let tol = 4.0 * ulp(got[0].0, want_value);
                assert!(
                    (norm - want_value).abs() <= tol,
                    "{dtype:?} {norm_type:?}: {norm:e}, one process {want_value:e}"
                );
            }
        }
    }
    // A rank whose gradients are on the CPU while its group reduces CUDA gradients is refused.
    let ranks = LocalGroup::on_devices(vec![dev.clone()])?;
    let w = Var::zeros(2, DType::F32, &Device::Cpu)?;
    let mut store = GradStore::default();
    store.insert(&w, Tensor::new(&[3f32, 4.], &Device::Cpu)?);
    // (The same gradients clip in one process: only the group's device refuses them.)
    clip_grad_norm_(std::slice::from_ref(&w), &mut store, 1.0)?;
    let err = candle_grad_clip::total_norm_across(&[w], &store, NormType::L2, &ranks[0]);
    let message = err.expect_err("another device").to_string();
    assert!(
        message.contains("rank 0") && message.contains("Cuda"),
        "{message}"
    );
    #[cfg(feature = "nccl")]
    {
        use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id};
        use candle_grad_clip::NcclGroup;
        let stream = dev.as_cuda_device()?.cuda_stream();
        let comm = Comm::from_rank(stream, 0, 1, Id::new().expect("an NCCL id"))
            .expect("an NCCL communicator of one rank");
        let group = NcclGroup::new(comm, dev.clone())?;
        assert_eq!((group.rank(), group.world_size()), (0, 1));
        let mut words = [1u64, u64::MAX - 1, 7];
        group.all_reduce_sum_u64(&mut words)?;
        assert_eq!(words, [1, u64::MAX - 1, 7]);
        group.all_reduce_max_u64(&mut words)?;
        assert_eq!(words, [1, u64::MAX - 1, 7]);
        let w = Var::zeros(2, DType::F32, &dev)?;
        let mut store = GradStore::default();
        store.insert(&w, Tensor::new(&[30f32, 40.], &dev)?);
        let norm = candle_grad_clip::clip_grad_norm_across_(
            std::slice::from_ref(&w),
            &mut store,
            1.0,
            &group,
        )?;
        assert_eq!(norm.to_scalar::<f32>()?, 50.0);
    }
    Ok(())
}
