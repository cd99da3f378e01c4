//! Tests of the emulation itself (`emulation/selftest.cu`): conversions, warp calls, barriers,
//! shared memory, atomics and the errors it must report, each against expectations computed
//! here, independently of the shim.

use half::{bf16, f16};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::ffi::launch_named;
use super::BlockOrder;
use crate::backend::kernels::launch::Arg;
use crate::ops::element::Element;
use candle_core::Result;

const ORDERS: [BlockOrder; 4] = [
    BlockOrder::InOrder,
    BlockOrder::Reversed,
    BlockOrder::Shuffled,
    BlockOrder::Concurrent { threads: 3 },
];

fn ptr<T>(v: &mut [T]) -> Arg {
    Arg::Ptr(v.as_mut_ptr() as u64)
}

/// Launches a self-test kernel. The buffers behind the pointer arguments are `Vec`s of the test
/// that it does not touch until the launch returns.
fn run(name: &str, args: &[Arg], grid: u32, block: u32, order: BlockOrder) -> Result<()> {
    // SAFETY: every pointer argument is a `Vec` of the calling test, sized for what the kernel
    // reads or writes (grid × block threads, or n elements), and not accessed until this returns.
    unsafe { launch_named(name, args, grid, block, order, 7) }
}

/// f64 -> f16 / bf16 / f32 round once to nearest even, from the f64 (the CPU back end's
/// conversions are the reference: they are checked against a brute-force search in cpu.rs);
/// every f16 bit pattern converts exactly to float.
#[test]
fn conversions_round_once_to_nearest_even() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(1);
    let mut input: Vec<f64> = vec![
        0.0,
        -0.0,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        65504.0,
        65520.0,
        65519.99,
        1e-300,
        5e-324,
        f64::MAX,
        3.4028235677973366e38,
        5.960464477539063e-8,
        2.9802322387695312e-8,
        2.98023223876953e-8,
    ];
    while input.len() < 1 << 16 {
        let base: f64 = rng.gen_range(-4.0..4.0) * 2f64.powi(rng.gen_range(-140..130));
        // Midpoints of f16 and bf16 neighbours, and noise in the low bits (what half's own
        // conversions ignore).
        let x = match input.len() % 4 {
            0 => base,
            1 => f64::from_bits(base.to_bits() ^ rng.gen_range(0..1u64 << 30)),
            2 => {
                let h = f16::from_f64(base);
                let next = f16::from_bits(h.to_bits().wrapping_add(1));
                (h.to_f64() + next.to_f64()) / 2.0
            }
            _ => {
                let h = bf16::from_f64(base);
                let next = bf16::from_bits(h.to_bits().wrapping_add(1));
                (h.to_f64() + next.to_f64()) / 2.0
            }
        };
        input.push(x);
    }
    let n = input.len();
    let (mut f16s, mut bf16s, mut f32s, mut back) =
        (vec![0u16; n], vec![0u16; n], vec![0f32; n], vec![0f32; n]);
    run(
        "emu_selftest_convert",
        &[
            ptr(&mut input),
            ptr(&mut f16s),
            ptr(&mut bf16s),
            ptr(&mut f32s),
            ptr(&mut back),
            Arg::U64(n as u64),
        ],
        7,
        256,
        BlockOrder::Shuffled,
    )?;
    for (i, &x) in input.iter().enumerate() {
        let (want16, want_b16) = (
            <f16 as Element>::from_f64(x),
            <bf16 as Element>::from_f64(x),
        );
        if x.is_nan() {
            assert!(f16::from_bits(f16s[i]).is_nan() && bf16::from_bits(bf16s[i]).is_nan());
            assert!(f32s[i].is_nan());
            continue;
        }
        assert_eq!(f16s[i], want16.to_bits(), "f16 of {x:e}");
        assert_eq!(bf16s[i], want_b16.to_bits(), "bf16 of {x:e}");
        assert_eq!(f32s[i].to_bits(), (x as f32).to_bits(), "f32 of {x:e}");
        let h = f16::from_bits((i & 0xffff) as u16).to_f32();
        assert!(
            back[i].to_bits() == h.to_bits() || (back[i].is_nan() && h.is_nan()),
            "f16 bits {i:#x} to float"
        );
    }
    Ok(())
}

/// What each lane of a warp receives from the shuffles, ballot and votes, and each block's sum
/// through shared memory and barriers, under every block order.
#[test]
fn warp_calls_barriers_and_shared_memory() -> Result<()> {
    let mut rng = StdRng::seed_from_u64(2);
    // Powers of two: the kernel sums a block by halving.
    for (block, grid) in [(256u32, 5u32), (32, 3), (1024, 2), (64, 4)] {
        let threads = (block * grid) as usize;
        let mut input: Vec<u64> = (0..threads).map(|_| rng.gen_range(0..1u64 << 40)).collect();
        input[threads / 2] = 12345; // one warp's `all` is false
        for order in ORDERS {
            let mut out = vec![0u64; threads * 8];
            let mut sums = vec![0u64; grid as usize];
            run(
                "emu_selftest_warp",
                &[ptr(&mut input), ptr(&mut out), ptr(&mut sums)],
                grid,
                block,
                order,
            )?;
            for g in 0..threads {
                let lane = g % 32;
                let w = g - lane;
                let v = |l: usize| input[w + l];
                let what = format!("block {block} {order:?} thread {g}");
                let o = &out[g * 8..g * 8 + 8];
                assert_eq!(
                    o[0],
                    if lane + 5 < 32 { v(lane + 5) } else { v(lane) },
                    "down {what}"
                );
                assert_eq!(
                    o[1],
                    if lane >= 3 { v(lane - 3) } else { v(lane) },
                    "up {what}"
                );
                assert_eq!(o[2], v(lane ^ 9), "xor {what}");
                assert_eq!(o[3], v(7), "idx {what}");
                let (seg, within) = (lane & !15, lane & 15);
                let want = if within + 3 < 16 {
                    v(seg + within + 3)
                } else {
                    v(lane)
                };
                assert_eq!(o[4], want, "down width 16 {what}");
                let ballot = (0..32).fold(0u64, |b, l| b | ((v(l) & 1) << l));
                assert_eq!(o[5], ballot, "ballot {what}");
                let all = (0..32).all(|l| v(l) != 12345) as u64;
                assert_eq!(o[6], all | 2, "votes {what}");
                let next = if lane + 1 < 32 { v(lane + 1) } else { v(lane) };
                assert_eq!(o[7], ((next % 1000) as f32) as u64, "float shuffle {what}");
            }
            for (b, &s) in sums.iter().enumerate() {
                let lo = b * block as usize;
                let want: u64 = input[lo..lo + block as usize].iter().sum();
                assert_eq!(s, want, "block {b} sum, {order:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn atomics_from_concurrent_blocks() -> Result<()> {
    for order in ORDERS {
        let mut counters = vec![0u64; 4];
        run(
            "emu_selftest_atomics",
            &[ptr(&mut counters)],
            16,
            128,
            order,
        )?;
        assert_eq!(counters[0], 2048, "{order:?}");
        assert_eq!(counters[1], 2047, "{order:?}");
        assert_eq!(counters[2], u64::MAX, "{order:?}");
        assert_eq!(f64::from_bits(counters[3]), 1024.0, "{order:?}");
    }
    Ok(())
}

/// Kernel bugs that a GPU would hang on or compute garbage from are errors, as is a partial-mask
/// warp call (legal on a GPU, not emulated), and the thread's emulator works normally afterwards.
#[test]
fn kernel_bugs_are_reported() -> Result<()> {
    for order in ORDERS {
        let mut out = vec![0u64; 256 * 2];
        for (kernel, expected) in [
            ("emu_selftest_divergent_barrier", "__syncthreads at line"),
            ("emu_selftest_partial_warp_call", "warp"),
            (
                "emu_selftest_partial_mask",
                "partial-mask warp calls are not emulated",
            ),
            ("emu_selftest_deadlock", "deadlock"),
        ] {
            let err = run(kernel, &[ptr(&mut out)], 2, 256, order)
                .expect_err(kernel)
                .to_string();
            assert!(err.contains(expected), "{kernel} {order:?}: {err}");
        }
        let mut counters = vec![0u64; 4];
        run("emu_selftest_atomics", &[ptr(&mut counters)], 2, 64, order)?;
        assert_eq!(counters[0], 128);
    }
    // A launch whose arguments do not match the kernel's parameters never runs.
    let err = run(
        "emu_selftest_atomics",
        &[Arg::U64(0)],
        1,
        32,
        BlockOrder::InOrder,
    )
    .expect_err("signature")
    .to_string();
    assert!(err.contains("do not match"), "{err}");
    let err = run("no_such_kernel", &[], 1, 32, BlockOrder::InOrder)
        .expect_err("unknown")
        .to_string();
    assert!(err.contains("no kernel named"), "{err}");
    Ok(())
}
