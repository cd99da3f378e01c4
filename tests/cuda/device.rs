//! What only a GPU can show: concurrent threads use separate scratch, more than 2^31 elements, no
//! host synchronisation, CUDA graph capture refused before any work, gradients on two devices
//! refused, a new device per iteration.

use super::*;

#[test]
fn concurrent_threads_use_separate_scratch() -> Result<()> {
    let dev = cuda_or_skip!("concurrent_threads_use_separate_scratch");
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || -> Result<()> {
                let mut rng = StdRng::seed_from_u64(100 + t);
                for round in 0..10 {
                    let grads: Vec<Tensor> = (0..20)
                        .map(|i| {
                            let n = 1 + (i * 131 + round) % 9000;
                            tensor(
                                &random_values(&mut rng, n, 1.0),
                                &[n],
                                DTYPES[(i + t as usize) % 4],
                                &dev,
                            )
                        })
                        .collect::<Result<_>>()?;
                    check_clip(
                        &grads,
                        ClipGradNorm::new(0.5),
                        &format!("thread {t} round {round}"),
                    )?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread panicked")?;
    }
    Ok(())
}

/// A bf16 tensor of more than 2^31 elements (64-bit indexing), when the GPU has the memory.
#[test]
fn more_than_2_pow_31_elements() -> Result<()> {
    let dev = cuda_or_skip!("more_than_2_pow_31_elements");
    let n: usize = (1usize << 31) + 4099;
    let (free, _) = dev
        .as_cuda_device()?
        .cuda_stream()
        .context()
        .mem_get_info()
        .map_err(|e| candle_core::Error::Msg(format!("cuMemGetInfo failed: {e:?}")))?;
    // The tensor (4 GiB) twice (cat), plus slack.
    if free < 12 << 30 {
        skipped(
            "more_than_2_pow_31_elements",
            &format!("{} GiB free on the GPU, need 12", free >> 30),
        );
        return Ok(());
    }
    let head = Tensor::ones(n - 1, DType::BF16, &dev)?;
    let tail = Tensor::new(&[4.0f32], &dev)?.to_dtype(DType::BF16)?;
    let big = Tensor::cat(&[&head, &tail], 0)?;
    drop(head);
    let (vars, mut gs) = store(std::slice::from_ref(&big))?;
    // The maximum sits past 2^31: the reduction reads it.
    assert_eq!(scalar(&total_norm(&vars, &gs, NormType::Inf, false)?)?, 4.0);
    let l1 = scalar(&total_norm(&vars, &gs, NormType::L1, false)?)?;
    assert_eq!(l1, ((n - 1) as f64 + 4.0) as f32 as f64);
    // Scale by exactly 1/2 (norm 2 * max_norm with eps 0): every element, the last included.
    let l1_norm = ClipGradNorm::new(l1 / 2.0)
        .with_norm_type(NormType::L1)
        .with_eps(0.0);
    let norm = scalar(&l1_norm.clip_(&vars, &mut gs)?)?;
    assert_eq!(norm, l1);
    let last = values(&big.narrow(0, n - 2, 2)?)?;
    assert!(
        close(last[0], 0.5, 1e-6) && close(last[1], 2.0, 1e-6),
        "tail {last:?}"
    );
    let first = values(&big.narrow(0, 0, 2)?)?;
    assert!(close(first[0], 0.5, 1e-6), "head {first:?}");
    Ok(())
}

/// None of the four functions waits for the device: with a long queue of matmuls in front, each
/// returns long before the device is done.
#[test]
fn no_host_synchronisation() -> Result<()> {
    let dev = cuda_or_skip!("no_host_synchronisation");
    let mut rng = StdRng::seed_from_u64(10);
    let grads: Vec<Tensor> = (0..200)
        .map(|i| {
            tensor(
                &random_values(&mut rng, 5000, 1.0),
                &[5000],
                DTYPES[i % 4],
                &dev,
            )
        })
        .collect::<Result<_>>()?;
    let (vars, mut gs) = store(&grads)?;
    let a = Tensor::ones((4096, 4096), DType::F32, &dev)?;
    // Warm up: module load, scratch and staging allocation, cuBLAS handles.
    let norm = clip_grad_norm_(&vars, &mut gs, 1.0)?;
    clip_grads_with_norm_(&vars, &mut gs, 1.0, &norm)?;
    clip_grad_value_(&vars, &mut gs, 1.0)?;
    total_norm(&vars, &gs, NormType::L2, false)?;
    let _ = a.matmul(&a)?;
    dev.synchronize()?;
    // Size the queue: at least ~300 ms of device work.
    let t = Instant::now();
    let mut m = a.matmul(&a)?;
    for _ in 0..4 {
        m = m.matmul(&a)?;
    }
    dev.synchronize()?;
    let per_matmul = t.elapsed() / 5;
    let count =
        (Duration::from_millis(300).as_secs_f64() / per_matmul.as_secs_f64()).ceil() as usize;
    let count = count.clamp(5, 800);
    drop(m);

    let zclip = std::cell::RefCell::new(ZClip::new().with_warmup_steps(2));
    zclip.borrow_mut().clip_(&vars, &mut gs)?;
    type Call<'a> = &'a dyn Fn(&mut GradStore) -> Result<()>;
    let calls: [(&str, Call); 6] = [
        ("clip_grad_norm_", &|gs| {
            clip_grad_norm_(&vars, gs, 1.0).map(|_| ())
        }),
        ("total_norm", &|gs| {
            total_norm(&vars, gs, NormType::L2, false).map(|_| ())
        }),
        ("clip_grads_with_norm_", &|gs| {
            clip_grads_with_norm_(&vars, gs, 1.0, &norm)
        }),
        ("clip_grad_value_", &|gs| clip_grad_value_(&vars, gs, 1.0)),
        ("ZClip::clip_", &|gs| {
            zclip.borrow_mut().clip_(&vars, gs).map(|_| ())
        }),
        ("adaptive_clip_grad_", &|gs| {
            candle_grad_clip::adaptive_clip_grad_(&vars, gs, 0.01, 1e-3).map(|_| ())
        }),
    ];
    for (name, call) in calls {
        let start = Instant::now();
        let mut m = a.clone();
        for _ in 0..count {
            m = m.matmul(&a)?;
        }
        let queued = start.elapsed();
        let t = Instant::now();
        call(&mut gs)?;
        let call_time = t.elapsed();
        dev.synchronize()?;
        let total = start.elapsed();
        println!("{name}: returned after {call_time:?}; queue of {count} matmuls took {total:?} (enqueue {queued:?})");
        assert!(
            queued + call_time < total / 2,
            "{name} seems to wait for the device: returned at {:?} of {total:?}",
            queued + call_time
        );
    }
    Ok(())
}

/// Under CUDA graph capture every call is refused before it enqueues anything, even the
/// `.contiguous()` copy of a transposed gradient: the captured graph stays empty.
#[test]
fn graph_capture_is_refused_before_any_work() -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    if cuda("graph_capture_is_refused_before_any_work").is_none() {
        return Ok(());
    }
    let dev = Device::new_cuda_with_stream(0)?;
    let g = tensor(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3], DType::F32, &dev)?.t()?;
    let before = values(&g)?;
    let (vars, mut gs) = store(std::slice::from_ref(&g))?;
    let stream = dev.as_cuda_device()?.cuda_stream();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
    let results = [
        clip_grad_norm_(&vars, &mut gs, 0.1).map(|_| ()),
        total_norm(&vars, &gs, NormType::L2, false).map(|_| ()),
        clip_grad_value_(&vars, &mut gs, 0.1),
    ];
    let graph = stream
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .map_err(|e| candle_core::Error::Msg(format!("{e:?}")))?;
    for r in results {
        let msg = r.expect_err("refused under capture").to_string();
        assert!(msg.contains("CUDA graph"), "{msg}");
    }
    if let Some(graph) = graph {
        let mut nodes = 0usize;
        // SAFETY: `graph` is a live graph; with a null node array cuGraphGetNodes only writes the
        // node count to `nodes`.
        let rc =
            unsafe { sys::cuGraphGetNodes(graph.cu_graph(), std::ptr::null_mut(), &mut nodes) };
        assert_eq!(rc, sys::CUresult::CUDA_SUCCESS);
        assert_eq!(nodes, 0, "work was captured before the refusal");
    }
    assert!(bits_equal(&before, &values(&g)?));
    Ok(())
}

#[test]
fn gradients_on_two_devices_are_refused_and_nothing_is_written() -> Result<()> {
    let dev = cuda_or_skip!("gradients_on_two_devices_are_refused_and_nothing_is_written");
    let on_gpu = tensor(&[30.0, 40.0], &[2], DType::F32, &dev)?;
    let on_cpu = Tensor::new(&[300f32, 400.], &Device::Cpu)?;
    let (vars, mut gs) = store(&[on_gpu.clone(), on_cpu.clone()])?;
    let before = (values(&on_gpu)?, values(&on_cpu)?);
    for r in [
        clip_grad_norm_(&vars, &mut gs, 1.0).map(|_| ()),
        clip_grad_value_(&vars, &mut gs, 1.0),
        total_norm(&vars, &gs, NormType::L2, false).map(|_| ()),
    ] {
        let msg = r.expect_err("two devices").to_string();
        assert!(msg.contains("different devices"), "{msg}");
    }
    assert!(bits_equal(&before.0, &values(&on_gpu)?));
    assert!(bits_equal(&before.1, &values(&on_cpu)?));
    Ok(())
}

/// A new device per iteration: the per-thread scratch keeps the 4 most recent, and every call is
/// still right.
#[test]
fn a_new_device_per_iteration() -> Result<()> {
    if cuda("a_new_device_per_iteration").is_none() {
        return Ok(());
    }
    for i in 0..12 {
        let dev = Device::new_cuda(0)?;
        let g = tensor(&[3.0, 4.0], &[2], DType::F32, &dev)?;
        let (vars, mut gs) = store(std::slice::from_ref(&g))?;
        let n = clip_grad_norm_(&vars, &mut gs, 1.0)?;
        assert_eq!(scalar(&n)?, 5.0, "device {i}");
        let c = 1.0 / (5.0 + 1e-6);
        assert_within_one_ulp(&values(&g)?, &[3.0 * c, 4.0 * c], DType::F32, "clipped");
    }
    Ok(())
}
