#!/usr/bin/env bash
# GPU check for the CUDA back end, in two halves:
#
#   scripts/gpu-check.sh build   # here (Rust toolchain, no GPU): build the cuda test and bench
#                                # binaries, strip them, gzip them into .gpu/ (ignored by git)
#   scripts/gpu-check.sh run     # on the GPU machine (no Rust toolchain), carrying .gpu/: run the
#                                # tests, the tests again under compute-sanitizer (memcheck,
#                                # racecheck, synccheck), the benchmarks and
#                                # scripts/torch_clip_bench.py; logs under $OUT; one summary table
#
# The run is sized for one device call with room for a second (device time is 15 minutes a
# session, the machine's start included): every part stops at a cap (tests 120 s, each sanitizer
# tool 60 s, benches 120 s, torch 60 s: at most 8 minutes, usually under 5):
#   run(command="bash scripts/gpu-check.sh run", carry=[".gpu"], timeout_s=540)
#
# `run` fails (and its summary says why) when no GPU is found, when any CUDA test failed or
# SKIPPED part of itself, or when a sanitizer reported an error. A sanitizer that cannot run on the
# machine (compute-sanitizer refuses the device under gVisor) is reported as unavailable.
#
# Optional, after the summary when GPU_CHECK_VARIANTS=1 (about 2 more minutes, capped at 3 plus
# nvcc: with the caps above that can pass 540 s, so use it for a second call once the first has
# shown the usual times, not for the first): the set A
# benchmarks again with the kernels rebuilt there by nvcc with other GRAD_CLIP_UNROLL values,
# loaded through CANDLE_GRAD_CLIP_PTX, to decide the load depth.
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

# Tests small enough to run under a sanitizer within its cap (each tool slows kernels 10-100x).
SANITIZED_TESTS=(
  mixed_dtypes_in_one_call
  huge_tiny_and_nonfinite_values
  offsets_transposes_and_aliases
  clip_grads_with_norm_reads_the_norm_on_the_device
  clip_grad_value_matches_cpu_bitwise
  empty_tensors
  grad_norms_match_the_cpu
  a_negative_given_norm_poisons_the_gradients
)

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
  { date -u; uname -a; nvidia-smi; } 2>&1 | tee "$OUT/nvidia-smi.txt" | head -20
  for f in cuda_tests clip_cuda_bench; do
    echo "== ldd $f"
    ldd "$bin/$f"
  done 2>&1 | tee "$OUT/ldd.txt" | grep -E "not found|==" || true
  if grep -q "not found" "$OUT/ldd.txt"; then
    echo "WARNING: unresolved libraries (see ldd.txt)" >&2
  fi

  echo "== tests"
  # No CANDLE_GRAD_CLIP_ALLOW_NO_GPU here: without a GPU every test fails.
  timeout 120 "$bin/cuda_tests" --test-threads=1 --nocapture 2>&1 | tee "$OUT/tests.log"
  local tests_rc=${PIPESTATUS[0]}
  echo "tests exit status: $tests_rc"

  echo "== compute-sanitizer"
  local tool
  for tool in memcheck racecheck synccheck; do
    echo "-- $tool"
    timeout 60 compute-sanitizer --tool "$tool" --error-exitcode 86 \
      "$bin/cuda_tests" --test-threads=1 "${SANITIZED_TESTS[@]}" >"$OUT/sanitizer-$tool.log" 2>&1
    echo "exit status $?" >>"$OUT/sanitizer-$tool.log"
    tail -3 "$OUT/sanitizer-$tool.log"
  done

  echo "== benchmarks"
  CRITERION_HOME=/tmp/criterion timeout 120 "$bin/clip_cuda_bench" --bench 2>&1 | tee "$OUT/bench.log"
  local bench_rc=${PIPESTATUS[0]}

  echo "== torch"
  PYTHONUNBUFFERED=1 timeout 60 python3 "$ROOT/scripts/torch_clip_bench.py" --min-time 0.5 --json "$OUT/torch.json" 2>&1 | tee "$OUT/torch.log"
  local torch_rc=${PIPESTATUS[0]}

  echo "== summary"
  python3 "$ROOT/scripts/gpu_check_summary.py" "$OUT" "$tests_rc" "$bench_rc" "$torch_rc" | tee "$OUT/summary.txt"
  local summary_rc=${PIPESTATUS[0]}

  if [ "${GPU_CHECK_VARIANTS:-0}" = 1 ]; then
    variants "$bin"
  fi
  return "$summary_rc"
}

# The set A benchmarks with the kernels rebuilt by the machine's nvcc for other load depths.
variants() {
  local bin=$1 unroll
  for unroll in 2 4 8; do
    echo "== variant GRAD_CLIP_UNROLL=$unroll"
    if ! nvcc --ptx -arch=sm_90a --expt-relaxed-constexpr -std=c++17 -O3 -DGRAD_CLIP_UNROLL=$unroll \
      "$ROOT/kernels/grad_clip.cu" -o "/tmp/grad_clip_u$unroll.ptx"; then
      echo "nvcc failed for GRAD_CLIP_UNROLL=$unroll"
      continue
    fi
    CANDLE_GRAD_CLIP_PTX=/tmp/grad_clip_u$unroll.ptx CRITERION_HOME=/tmp/criterion-u$unroll \
      timeout 60 "$bin/clip_cuda_bench" --bench 'set_A' 2>&1 | tee "$OUT/variant-u$unroll.log" |
      grep -E "^gpu/|time:"
  done
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
