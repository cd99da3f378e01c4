#!/usr/bin/env python3
"""PyTorch reference timings for benches/clip_cuda.rs.

Times torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True) on the same parameter sets,
synchronising the device after every call (as the Rust benchmark does), plus the norm alone and a
device-to-device copy of the same byte count. Prints one line per case and, with --json PATH,
writes {"<set>/<dtype>/<case>": seconds (median)}.

    python3 scripts/torch_clip_bench.py [--json out.json] [--min-time 1.0]

Cases match the Rust ones: noclip (max_norm=1e30; PyTorch still multiplies by the clamped
coefficient 1.0), clip (max_norm=0: coefficient 0), norm (total norm only), copy; and on set A
f32, adamw (torch.optim.AdamW(fused=True).step()) and adamw_clip (clip_grad_norm_(foreach=True)
to 1.0, then the step).
"""

import argparse
import json
import statistics
import sys
import time

import torch


def param_sets():
    a = [(4096, 4096)] * 4 + [(4096, 1024)] * 8 + [(4096,)] * 188
    return [
        ("set_A_101M_200", a, [torch.float32, torch.bfloat16]),
        ("set_C_1M_1000", [(1000,)] * 1000, [torch.float32]),
        ("set_D_10M_10000", [(1000,)] * 10_000, [torch.float32]),
    ]


DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def median_time(fn, min_time, warmup=3, min_iters=10, max_iters=5000):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_time):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def total_norm(grads):
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, 2.0, foreach=True)
    norms = torch._foreach_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


def optimizer_cases(name, shapes, dtype, dev, gen, min_time, results):
    """torch.optim.AdamW(fused=True) on real parameters of the set's shapes: the step alone
    ("adamw"), and clip_grad_norm_(foreach=True) to 1.0 then the step ("adamw_clip")."""
    params = []
    for shape in shapes:
        p = torch.zeros(shape, device=dev, dtype=dtype, requires_grad=True)
        p.grad = (torch.randn(shape, device=dev, generator=gen) * 0.01).to(dtype)
        params.append(p)
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)

    def clip_then_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()

    for case, fn in {"adamw": opt.step, "adamw_clip": clip_then_step}.items():
        key = f"{name}/{DTYPE_NAMES[dtype]}/{case}"
        t = median_time(fn, min_time)
        results[key] = t
        print(f"torch/{key:40s} {t * 1e6:12.1f} us")
        sys.stdout.flush()
    del params, opt
    torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="write the medians (seconds) to this file")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per case")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipping: torch.cuda is not available", file=sys.stderr)
        return 0
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev)}")
    results = {}
    gen = torch.Generator(device=dev)
    gen.manual_seed(0x5EED)
    for name, shapes, dtypes in param_sets():
        for dtype in dtypes:
            params = []
            for shape in shapes:
                p = torch.zeros(1, device=dev, dtype=dtype, requires_grad=True)
                p.grad = (torch.randn(shape, device=dev, generator=gen) * 0.01).to(dtype)
                params.append(p)
            grads = [p.grad for p in params]
            nbytes = sum(g.numel() * g.element_size() for g in grads)
            src = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)
            torch.cuda.synchronize()
            cases = {
                "noclip": lambda: torch.nn.utils.clip_grad_norm_(params, 1e30, foreach=True),
                "norm": lambda: total_norm(grads),
                "clip": lambda: torch.nn.utils.clip_grad_norm_(params, 0.0, foreach=True),
                "copy": lambda: dst.copy_(src),
            }
            for case, fn in cases.items():
                key = f"{name}/{DTYPE_NAMES[dtype]}/{case}"
                t = median_time(fn, args.min_time)
                results[key] = t
                print(f"torch/{key:40s} {t * 1e6:12.1f} us {nbytes / t / 1e9:10.1f} GB/s")
                sys.stdout.flush()
            del params, grads, src, dst
            torch.cuda.empty_cache()
            if name == "set_A_101M_200" and dtype == torch.float32:
                optimizer_cases(name, shapes, dtype, dev, gen, args.min_time, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
