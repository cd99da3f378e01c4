#!/usr/bin/env bash
# GPU check for the CUDA back end, in two halves:
#
#   scripts/gpu-check.sh build   # here (Rust toolchain, no GPU): build the cuda test and bench
#                                # binaries, strip them, gzip them into .gpu/ (ignored by git)
#   scripts/gpu-check.sh run     # on the GPU machine (no Rust toolchain), carrying .gpu/: run the
#                                # tests, the benchmarks and scripts/torch_clip_bench.py, logs
#                                # under $OUT, and print a summary table
#
# The run stops each part at a cap (tests 180 s, benches 180 s, torch 120 s: 8 minutes at most),
# so that one device call (10 minutes at most, 15 minutes of device time a session) leaves room
# for a second try: run(command="bash scripts/gpu-check.sh run", carry=[".gpu"], timeout_s=540).
#
# Stripped, each binary is ~40 MB: together they exceed the 64 MiB that can be carried to a GPU
# machine, so they travel gzipped (~12 MB each) and are unpacked there.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
GPU_DIR=$ROOT/.gpu

# The path of the executable cargo built for target $1, from --message-format=json on stdin.
executable_of() {
  python3 -c '
import json, sys
name = sys.argv[1]
exe = None
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name:
        exe = m["executable"]
if exe is None:
    sys.exit("no executable for " + name)
print(exe)' "$1"
}

build() {
  set -e
  # shellcheck source=/dev/null
  source "$ROOT/scripts/cuda-toolchain.sh"
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/candle-grad-clip/cuda-target}
  local tests bench
  tests=$(cargo test --release --features cuda --no-run --test cuda --message-format=json | executable_of cuda)
  bench=$(cargo bench --features cuda --no-run --bench clip_cuda --message-format=json | executable_of clip_cuda)
  rm -rf "$GPU_DIR"
  mkdir -p "$GPU_DIR"
  strip -o "$GPU_DIR/cuda_tests" "$tests"
  strip -o "$GPU_DIR/clip_cuda_bench" "$bench"
  echo "stripped:"
  ls -l "$GPU_DIR"
  gzip -6 "$GPU_DIR/cuda_tests" "$GPU_DIR/clip_cuda_bench"
  echo "carried (gzipped):"
  ls -l "$GPU_DIR"
  local total
  total=$(du -cb "$GPU_DIR"/* | tail -1 | cut -f1)
  echo "total: $((total / 1024 / 1024)) MiB of the 64 MiB that can be carried (with the working tree)"
  if [ "$total" -gt $((56 * 1024 * 1024)) ]; then
    echo "WARNING: .gpu/ is too big to carry" >&2
    return 1
  fi
}

run() {
  OUT=${OUT:-/tmp/candle-grad-clip-gpu-out}
  mkdir -p "$OUT"
  local bin=/tmp/candle-grad-clip-gpu
  rm -rf "$bin"
  mkdir -p "$bin"
  local f
  for f in cuda_tests clip_cuda_bench; do
    if [ -f "$GPU_DIR/$f.gz" ]; then
      gzip -dc "$GPU_DIR/$f.gz" > "$bin/$f"
    elif [ -f "$GPU_DIR/$f" ]; then
      cp "$GPU_DIR/$f" "$bin/$f"
    else
      echo "missing $GPU_DIR/$f(.gz): run 'scripts/gpu-check.sh build' first and carry .gpu" >&2
      return 1
    fi
    chmod +x "$bin/$f"
  done

  # The CUDA 13 user-space libraries come from the Python packages (nvidia-*-cu13 wheels).
  local libs
  libs=$(python3 - <<'EOF'
import os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = []
for root in list(nvidia.__path__):
    for dirpath, dirnames, _ in os.walk(root):
        if os.path.basename(dirpath) == "lib":
            dirs.append(dirpath)
print(":".join(sorted(dirs)))
EOF
)
  export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$OUT/env.txt"
  nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -15
  for f in cuda_tests clip_cuda_bench; do
    echo "== ldd $f"
    ldd "$bin/$f"
  done 2>&1 | tee "$OUT/ldd.txt"
  if grep -q "not found" "$OUT/ldd.txt"; then
    echo "WARNING: unresolved libraries (see above)" >&2
  fi

  echo "== tests"
  timeout 180 "$bin/cuda_tests" --test-threads=1 --nocapture 2>&1 | tee "$OUT/tests.log"
  local tests_rc=${PIPESTATUS[0]}
  echo "tests exit status: $tests_rc"

  echo "== benchmarks"
  CRITERION_HOME=/tmp/criterion timeout 180 "$bin/clip_cuda_bench" --bench 2>&1 | tee "$OUT/bench.log"
  local bench_rc=${PIPESTATUS[0]}

  echo "== torch"
  timeout 120 python3 "$ROOT/scripts/torch_clip_bench.py" --json "$OUT/torch.json" 2>&1 | tee "$OUT/torch.log"
  local torch_rc=${PIPESTATUS[0]}

  echo "== summary"
  python3 - "$OUT/bench.log" "$OUT/torch.json" "$OUT/tests.log" <<'EOF' | tee "$OUT/summary.txt"
import json, re, sys

bench_log, torch_json, tests_log = sys.argv[1:4]
unit = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
ours, name = {}, None
for line in open(bench_log, errors="replace"):
    m = re.match(r"^gpu/(\S+)", line.strip())
    if m:
        name = m.group(1)
    m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
    if m and name:
        ours[name] = float(m.group(1)) * unit[m.group(2)]
        name = None
try:
    torch = json.load(open(torch_json))
except (OSError, ValueError):
    torch = {}
tests = [l for l in open(tests_log, errors="replace") if l.startswith("test result:")]
print("tests:", tests[-1].strip() if tests else "no result line (see tests.log)")
print(f"{'set/dtype/case':40s} {'ours us':>10s} {'torch us':>10s} {'torch/ours':>10s}")
for key in sorted(set(ours) | set(torch)):
    a, b = ours.get(key), torch.get(key)
    fa = f"{a * 1e6:10.1f}" if a else f"{'-':>10s}"
    fb = f"{b * 1e6:10.1f}" if b else f"{'-':>10s}"
    ratio = f"{b / a:10.2f}" if a and b else f"{'-':>10s}"
    print(f"{key:40s} {fa} {fb} {ratio}")
EOF
  echo "exit status: tests $tests_rc, bench $bench_rc, torch $torch_rc"
  [ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
