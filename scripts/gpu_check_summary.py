#!/usr/bin/env python3
"""The summary table of scripts/gpu-check.sh run: tests, sanitizer findings, and the benchmark
ratios against the copy ceiling and PyTorch, with the targets of the CUDA issue.

    python3 scripts/gpu_check_summary.py OUT_DIR TESTS_RC BENCH_RC TORCH_RC

Reads OUT_DIR/{nvidia-smi.txt,tests.log,sanitizer-*.log,bench.log,torch.json}. Exits 1 when the
check failed: no GPU, a test failed or skipped part of itself, or a sanitizer reported an error.
Performance targets are reported, not enforced.
"""

import json
import os
import re
import sys

UNIT = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}

# Bytes moved per parameter byte: `copy` reads and writes once (2); `clip` reads for the norm, then
# reads and writes to scale (3); `noclip` and `norm` read once (1).
# An AdamW step moves 7 (28 bytes of f32 per parameter: p, m, v read and written, g read), 8 with
# the clip's read of the gradients.
# ZClip as the clip (its kernel is one thread); AGC reads the parameters once more for the unit
# norms (9).
# Gradient accumulation (issue 23): `accumulate` reads the buffer and the gradient and writes the
# buffer (3: 12 bytes a f32 parameter); `accumulate_f32` is BF16 gradients into F32 buffers (2 + 4
# + 4 bytes a 2-byte parameter: 5); `accumulate_zero` writes once; the candle loop moves what
# `accumulate` moves, into a new allocation.
MOVED = {"clip": 3.0, "noclip": 1.0, "norm": 1.0, "adamw": 7.0, "adamw_clip": 8.0, "adamw_candle": 7.0,
         "adamw_zclip": 8.0, "adamw_agc": 9.0, "accumulate": 3.0, "accumulate_f32": 5.0,
         "accumulate_zero": 1.0, "accumulate_candle": 3.0}
# Targets (CUDA and fused-optimizer issues): fraction of copy bandwidth, speed-up over PyTorch.
BANDWIDTH_TARGET = {"clip": 0.85, "noclip": 0.85, "adamw": 0.8, "accumulate": 0.85}
TORCH_TARGET = {"clip": 1.3, "noclip": 2.5, "adamw": 1.0, "adamw_clip": 1.0}
TINY_SET = "set_D_10M_10000"
TINY_TARGET = 3.0


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def bench_medians(log):
    """{"set/dtype/case": seconds} from criterion's output."""
    out, name = {}, None
    for line in log.splitlines():
        m = re.match(r"^gpu/(\S+)", line.strip())
        if m:
            name = m.group(1)
        m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
        if m and name:
            out[name] = float(m.group(1)) * UNIT[m.group(2)]
            name = None
    return out


def sanitizer_status(log):
    """(status, failed) for one compute-sanitizer log."""
    if not log:
        return "no log", False
    if "Device not supported" in log or "error 999" in log.lower():
        return "unavailable on this machine (compute-sanitizer refused the device)", False
    m = re.search(r"exit status (\d+)", log)
    rc = int(m.group(1)) if m else None
    if rc == 127:
        return "unavailable on this machine (compute-sanitizer not found)", False
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", log)]
    found = sum(errors)
    if rc == 124:
        return f"timed out (cap reached; {found} errors before)", found > 0
    if found > 0 or rc == 86:
        return f"FAILED: {found} errors", True
    tests = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed", log)
    if tests and tests[-1][2] != "0":
        return f"tests failed under the tool ({tests[-1][2]})", True
    if rc != 0:
        return f"exit status {rc}", True
    return f"clean ({sum(errors) if errors else 0} errors)", False


def main():
    out_dir = sys.argv[1]
    tests_rc, bench_rc, torch_rc = (int(x) for x in sys.argv[2:5])
    failed = []

    smi = read(os.path.join(out_dir, "nvidia-smi.txt"))
    card = re.search(r"\|\s+\d+\s+(NVIDIA [^|]*?)\s{2,}", smi)
    driver = re.search(r"Driver Version:\s*(\S+)", smi)
    print(f"card: {card.group(1).strip() if card else 'not found'}; driver {driver.group(1) if driver else '?'}")
    if not card:
        failed.append("no GPU found by nvidia-smi")

    tests = read(os.path.join(out_dir, "tests.log"))
    result = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed; (\d+) ignored", tests)
    skipped = [l for l in tests.splitlines() if l.startswith("SKIPPED")]
    if "no usable CUDA device" in tests:
        failed.append("no usable CUDA device for the tests")
    if result:
        status, passed, nfailed, ignored = result[-1]
        print(f"tests: {passed} passed, {nfailed} failed, {ignored} ignored, {len(skipped)} skipped parts (exit {tests_rc})")
    else:
        print(f"tests: no result line (exit {tests_rc}; see tests.log)")
    for l in skipped:
        print(f"  {l}")
    if tests_rc != 0:
        failed.append(f"CUDA tests exit status {tests_rc}")
    if skipped:
        failed.append(f"{len(skipped)} CUDA test part(s) SKIPPED")

    for tool in ("memcheck", "racecheck", "synccheck"):
        status, bad = sanitizer_status(read(os.path.join(out_dir, f"sanitizer-{tool}.log")))
        print(f"sanitizer {tool}: {status}")
        if bad:
            failed.append(f"compute-sanitizer {tool}: {status}")

    ours = bench_medians(read(os.path.join(out_dir, "bench.log")))
    try:
        with open(os.path.join(out_dir, "torch.json")) as f:
            torch = json.load(f)
    except (OSError, ValueError):
        torch = {}
    print(f"benchmarks (exit {bench_rc}), torch (exit {torch_rc}): medians, device-synchronised per call")
    header = f"{'set/dtype/case':34s} {'ours us':>9s} {'copy us':>9s} {'of copy bw':>10s} {'target':>7s} {'torch us':>9s} {'torch/ours':>10s} {'target':>7s}"
    print(header)
    for key in sorted(set(ours) | set(torch)):
        set_dtype, _, case = key.rpartition("/")
        if case == "copy":
            continue
        a, b = ours.get(key), torch.get(key)
        copy = ours.get(f"{set_dtype}/copy")
        bw = MOVED[case] / 2.0 * copy / a if a and copy and case in MOVED else None
        bw_target = BANDWIDTH_TARGET.get(case)
        speedup = b / a if a and b else None
        speed_target = TORCH_TARGET.get(case)
        if set_dtype.startswith(TINY_SET) and case in TORCH_TARGET:
            speed_target = TINY_TARGET

        def mark(value, target):
            if value is None or target is None:
                return ""
            return " ok" if value >= target else " LOW"

        print(
            f"{key:34s} {a * 1e6 if a else float('nan'):9.1f} {copy * 1e6 if copy else float('nan'):9.1f} "
            f"{(f'{bw:.2f}' + mark(bw, bw_target)) if bw else '-':>10s} {bw_target if bw_target else '-':>7} "
            f"{b * 1e6 if b else float('nan'):9.1f} {(f'{speedup:.2f}' + mark(speedup, speed_target)) if speedup else '-':>10s} "
            f"{speed_target if speed_target else '-':>7}"
        )

    for key in sorted(ours):
        if key.endswith("/adamw_clip"):
            base = ours.get(key[: -len("_clip")])
            if base:
                ratio = ours[key] / base
                print(f"{key}: clipped step / unclipped step = {ratio:.2f} (target <= 1.2){' ok' if ratio <= 1.2 else ' HIGH'}")
        if key.endswith("/adamw_zclip"):
            clipped = ours.get(key[: -len("_zclip")] + "_clip")
            if clipped:
                ratio = ours[key] / clipped
                print(f"{key}: ZClip step / norm-clipped step = {ratio:.3f} (target <= 1.05){' ok' if ratio <= 1.05 else ' HIGH'}")
        if key.endswith("/adamw_agc"):
            base = ours.get(key[: -len("_agc")])
            if base:
                print(f"{key}: AGC step / unclipped step = {ours[key] / base:.2f} (9/7 of the bytes: 1.29 at the floor)")
        if key.endswith("/adamw_candle"):
            fused = ours.get(key[: -len("_candle")])
            if fused:
                print(f"{key}: candle's AdamW / FusedAdamW = {ours[key] / fused:.1f}x")
    if failed:
        print("GPU CHECK FAILED: " + "; ".join(failed))
        return 1
    print("GPU CHECK PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
