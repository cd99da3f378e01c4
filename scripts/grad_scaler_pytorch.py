"""The PyTorch values hardcoded in tests/grad_scaler/pytorch.rs (`pytorch_*` tests):
torch.amp.GradScaler on the CPU over scripted sequences of finite and non-finite steps.

    python scripts/grad_scaler_pytorch.py    # needs torch (CI does not: the values are in the test)

Prints, for each scenario, the scale (as f32 bits) and the growth tracker after every update, and
the unscaled gradients (as bits) of the first steps, as Rust literals.
"""

import struct

import torch

NAN, INF = float("nan"), float("inf")


def f32_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def f64_bits(x):
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def grad_bits(t):
    if t.dtype == torch.float64:
        return [f64_bits(v) for v in t.tolist()]
    # f32 and bf16 (exact in f32): the value's f64 bits, as the Rust test reads them.
    return [f64_bits(v) for v in t.float().tolist()]


def run(name, dtype, init, growth, backoff, interval, steps):
    """`steps`: the scaled gradient of each step (a list of floats)."""
    p = torch.zeros(len(steps[0]), dtype=dtype, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.0)
    scaler = torch.amp.GradScaler(
        "cpu",
        init_scale=init,
        growth_factor=growth,
        backoff_factor=backoff,
        growth_interval=interval,
    )
    scales, trackers, unscaled = [], [], []
    for g in steps:
        scaler.scale(torch.tensor(1.0))  # initialises the scale lazily, as on a real loss
        p.grad = torch.tensor(g, dtype=dtype)
        scaler.step(opt)  # unscales p.grad in place, skips on inf/NaN
        unscaled.append(grad_bits(p.grad))
        scaler.update()
        scales.append(f32_bits(scaler.get_scale()))
        trackers.append(int(scaler._growth_tracker.item()))
    print(f"// {name}: {dtype}, init {init}, growth {growth}, backoff {backoff}, interval {interval}")
    print(f"const {name}_SCALE_BITS: [u32; {len(scales)}] = {scales};")
    print(f"const {name}_TRACKERS: [i64; {len(trackers)}] = {trackers};")
    print(f"const {name}_UNSCALED_BITS: [[u64; {len(steps[0])}]; {len(unscaled)}] = {unscaled};")
    print()


def main():
    # The scripted sequence: finite, finite, inf, finite, NaN, finite, finite, finite, -inf.
    poison = [None, None, INF, None, NAN, None, None, None, -INF]
    steps = []
    for k, bad in enumerate(poison):
        g = [1.5 * (k + 1), -3.0, 1e-3 * (k + 1)]
        if bad is not None:
            g[1] = bad
        steps.append(g)
    run("SCRIPTED", torch.float32, 65536.0, 2.0, 0.5, 2, steps)

    # Odd settings: a scale that is not a power of two, growth 1.7, backoff 0.3, interval 3.
    pattern = [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    values = [12345.678, -0.0173, 3.0e-5, 987.5, -65504.0]
    for dtype, name in [(torch.float32, "ODD_F32"), (torch.bfloat16, "ODD_BF16"), (torch.float64, "ODD_F64")]:
        steps = []
        for k, bad in enumerate(pattern):
            g = [v * (1 + k / 7) for v in values]
            if bad:
                g[k % len(g)] = [NAN, INF, -INF][bad - 1]
            steps.append(g)
        run(name, dtype, 1000.0, 1.7, 0.3, 3, steps)

    # Growth capped at f32's largest value.
    run("CAPPED", torch.float32, 3.4028234663852886e38 / 1.5, 2.0, 0.5, 1, [[1.0, -1.0]] * 3)


if __name__ == "__main__":
    main()
