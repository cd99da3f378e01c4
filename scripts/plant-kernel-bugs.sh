#!/usr/bin/env bash
# Proves that the emulated kernel tests can fail: plants one bug at a time in a copy of this
# checkout (in a temporary folder, never the checkout itself) and runs the tests of the bug's area
# there, which must FAIL. Prints one line per planted bug; exits non-zero if any bug survives.
#
#   bug in                                     caught by (test target: folder of tests/)
#   a kernel of kernels/grad_clip.cu           cargo test --release --test emulation (tests/emulation)
#   ZClip's kernel (`zclip-*`)                 --test policy (tests/policy/zclip)
#   AGC's kernels (`agc-*`)                    --test clip (tests/clip/agc)
#   GradScaler's one-read path (`scaler-*`)    --test grad_scaler (tests/grad_scaler)
#   the accumulation kernel (`accum-*`)        --test accumulate (tests/accumulate)
#   the emulation's own shim (emulation/)      --lib emulated (the shim's self-tests)
#
#   scripts/plant-kernel-bugs.sh            # every bug below (27 bugs: about 7 minutes in all on 2 cores)
#   scripts/plant-kernel-bugs.sh carry      # only the bugs whose name contains "carry"
#
# The copies build into this checkout's target directory, so only the crate itself rebuilds; each
# copy renames its package (candle-grad-clip-planted-<bug>) so that its artifacts sit beside this
# checkout's instead of replacing them (cargo does not tell two copies of one package apart).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
FILTER=${1:-}

# name | file | what the bug is | python expression of (source -> mutated source); must change the
# text. Which tests must catch each bug: the table at the top of this file.
BUGS=(
  "carry|kernels/grad_clip.cu|the superaccumulator drops the add into its second digit|s.replace('atomicAdd(&digits[digit + 1], lo >> 32);', '', 1)"
  "last-block|kernels/grad_clip.cu|the first block to finish (not the last) finalises the norm|s.replace('s_last = done == (u64)gridDim.x - 1;', 's_last = done == 0;', 1)"
  "early-exit|kernels/grad_clip.cu|the scale kernel skips coefficients above 0.5 (not only >= 1)|s.replace('if (c >= 1.0) return;', 'if (c > 0.5) return;', 1)"
  "segment-walk|kernels/grad_clip.cu|a chunk at a segment boundary stays in the previous segment|s.replace('segs[s + 1].chunk_start <= chunk', 'segs[s + 1].chunk_start < chunk', 1)"
  "barrier|kernels/grad_clip.cu|no barrier between the chunk loop and the flush of the block's sums|s.replace('''        }\n    }\n    __syncthreads();\n\n    // Flush''', '''        }\n    }\n\n    // Flush''', 1)"
  "clamp-store|kernels/grad_clip.cu|value clipping stores a vector only when its first element changed|s.replace('return r.v.x != old.v.x || r.v.y != old.v.y || r.v.z != old.v.z || r.v.w != old.v.w;', 'return r.v.x != old.v.x;', 1)"
  "segment-norms|kernels/grad_clip.cu|a tensor's norm in grad_norms reads only its first chunk|s.replace('const u64 last = i + 1 < n_segs ? segs[i + 1].chunk_start : n_chunks;', 'const u64 last = first + 1;', 1)"
  "empty-no-write|kernels/grad_clip.cu|the reduction writes no norm when there is nothing to reduce|s.replace('    if (pass == 1) {\\n        // Written by the previous launch', '    if (n_chunks == 0) return;\\n    if (pass == 1) {\\n        // Written by the previous launch', 1)"
  "step-count|kernels/grad_clip.cu|the fused step counts two steps at a time|s.replace('            control[0] = t;', '            control[0] = t + 1;', 1)"
  "momentum-start|kernels/grad_clip.cu|SGD's momentum buffer is not started with the first gradient|s.replace('const C b = has_state ? A::add(A::mul(s0[e], k.mu), A::mul(k.omd, d)) : d;', 'const C b = A::add(A::mul(s0[e], k.mu), A::mul(k.omd, d));', 1)"
  "unfused-affine|kernels/grad_clip.cu|F32 AdamW rounds candle's affine twice instead of one fma|s.replace('case DT_F32: step_chunk<DT_F32, float, true>', 'case DT_F32: step_chunk<DT_F32, float, false>', 1)"
  "no-skip|kernels/grad_clip.cu|the fused step ignores skip_nonfinite|s.replace('const bool skip = skip_nonfinite != 0 && nonfinite;', 'const bool skip = false;', 1)"
  "step-early-exit|kernels/grad_clip.cu|the fused step scales only coefficients below 0.5|s.replace('const bool change = transform == TRANSFORM_CLAMP || (transform == TRANSFORM_SCALE && clipped);', 'const bool change = transform == TRANSFORM_CLAMP || (transform == TRANSFORM_SCALE && clipped && !(c >= 0.5));', 1)"
  "zclip-ema|kernels/grad_clip.cu|ZClip's variance EMA uses the mean before this step's update|s.replace('const double d = __dsub_rn(x, new_mean);', 'const double d = __dsub_rn(x, mean);', 1)"
  "agc-write|kernels/grad_clip.cu|AGC writes the clipped units of read-only gradients (the fused optimizers' store)|s.replace('if (clipped && seg.write) {', 'if (clipped) {', 1)"
  "agc-flag|kernels/grad_clip.cu|AGC's 'some unit clipped' flag is never raised|s.replace('if (s_clipped != 0) atomicOr(&scratch->max_bits, 1ull);', '', 1)"
  "scaler-skip-unscale|kernels/grad_clip.cu|a prescaled step that is skipped leaves the gradients scaled|s.replace('    } else if (pre) {\n        // A skipped step leaves the store unscaled too', '    } else if (false) {\n        // A skipped step leaves the store unscaled too', 1)"
  "scaler-bf16-round|kernels/grad_clip.cu|the reduction unscales BF16 without rounding the product to BF16|s.replace('    return Tr<DT>::to_f64(Tr<DT>::from_f64((double)u));\n}', '    return (double)u;\n}', 1)"
  "agc-unit-index|kernels/grad_clip.cu|the fused step indexes AGC units from the chunk, not the var|s.replace('const u64 i = start + e;', 'const u64 i = e;', 1)"
  "accum-tail|kernels/grad_clip.cu|the accumulation kernel drops the last element of every chunk|s.replace('    for (; i < n; i += WARP) {\n        const A a = read_dst', '    for (; i + 1 < n; i += WARP) {\n        const A a = read_dst', 1)"
  "accum-product|kernels/grad_clip.cu|add_scaled does not round the product to the buffer's dtype before the sum|s.replace('const double product = Tr<AD>::to_f64(Tr<AD>::from_f64(__dmul_rn(Tr<GD>::to_f64(g), alpha)));', 'const double product = __dmul_rn(Tr<GD>::to_f64(g), alpha);', 1)"
  "accum-src-offset|kernels/grad_clip.cu|a chunk's source address steps by the buffer's element size, not the gradient's|s.replace('(const void*)(seg.src + start * elem_bytes(seg.src_dtype))', '(const void*)(seg.src + start * elem_bytes(seg.dst_dtype))', 1)"
  "accum-zero|kernels/grad_clip.cu|zero_ leaves the buffers as they are|s.replace('    const int lane = threadIdx.x % WARP;\n    for (WarpChunks<PairSegment>', '    if (op == ACC_ZERO) return;\n    const int lane = threadIdx.x % WARP;\n    for (WarpChunks<PairSegment>', 1)"
  "shfl-own|emulation/include/cuda_emu.h|a shuffle returns the lane's own value|s.replace('    if (use_own) return var;', '    return var;', 1)"
  "one-slot|emulation/runtime.cpp|warp exchanges use one buffer (a fast lane overwrites values not yet read)|s.replace('(unsigned)(f->warp_calls++ & 1)', '(unsigned)(f->warp_calls++ & 0)', 1)"
  "no-barrier|emulation/runtime.cpp|__syncthreads does not wait|s.replace('    maybe_release_barrier(b);\\n    yield_blocked();', '    --b->at_barrier;\\n    f->state = FiberState::Ready;\\n    b->push(f->index);\\n    yield_blocked();', 1)"
  "bf16-truncate|emulation/include/cuda_emu.h|f64 to f16/bf16 truncates instead of rounding|s.replace('    if (rem > half || (rem == half && (q & 1))) q += 1;', '', 1)"
)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
survivors=0
printf '%-14s %-10s %s\n' "bug" "result" "what"
for entry in "${BUGS[@]}"; do
  IFS='|' read -r name file what expr <<<"$entry"
  if [ -n "$FILTER" ] && [[ "$name" != *"$FILTER"* ]]; then
    continue
  fi
  copy=$work/$name
  mkdir -p "$copy"
  (cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 tar -c) | tar -x -C "$copy"
  sed -i -e "s/^name = \"candle-grad-clip\"/name = \"candle-grad-clip-planted-$name\"/" \
    -e "s/^candle-grad-clip = { path = \".\"/candle-grad-clip = { package = \"candle-grad-clip-planted-$name\", path = \".\"/" \
    "$copy/Cargo.toml"
  grep -q "package = \"candle-grad-clip-planted-$name\"" "$copy/Cargo.toml" || {
    echo "error: could not rename the package of the copy (Cargo.toml changed?)" >&2
    exit 2
  }
  python3 - "$copy/$file" "$expr" <<'EOF'
import sys
path, expr = sys.argv[1], sys.argv[2]
s = open(path).read()
m = eval(expr, {"s": s})
if m == s:
    sys.exit("the bug could not be planted: " + path + " no longer has the text it replaces")
open(path, "w").write(m)
EOF
  # A bug in ZClip's, AGC's or GradScaler's kernels (named after them) is caught by the tests of
  # their area; one in the emulation's shim by its self-tests; the others by the emulation target.
  case "$name:$file" in
    *:emulation/*) tests=(--lib emulated) ;;
    zclip-*) tests=(--test policy) ;;
    agc-*) tests=(--test clip) ;;
    scaler-*) tests=(--test grad_scaler) ;;
    accum-*) tests=(--test accumulate) ;;
    *) tests=(--test emulation) ;;
  esac
  if (cd "$copy" && cargo test --release "${tests[@]}" >"$copy.log" 2>&1); then
    printf '%-14s %-10s %s\n' "$name" "SURVIVED" "$what"
    survivors=$((survivors + 1))
  elif grep -q "test result: FAILED" "$copy.log"; then
    printf '%-14s %-10s %s (first failing test: %s)\n' "$name" "caught" "$what" \
      "$(grep -m1 -oE '^test [a-z0-9_:]+ \.\.\. FAILED' "$copy.log" | sed 's/^test //; s/ \.\.\. FAILED//')"
  elif grep -qE "signal: [0-9]+" "$copy.log"; then
    # The kernel corrupted memory badly enough to kill the test process: caught, loudly.
    printf '%-14s %-10s %s (%s)\n' "$name" "crashed" "$what" "$(grep -m1 -oE 'signal: [0-9]+, [A-Z]+' "$copy.log")"
  else
    echo "error: the copy with bug '$name' did not build or run its tests:" >&2
    tail -20 "$copy.log" >&2
    exit 2
  fi
done
if [ "$survivors" -ne 0 ]; then
  echo "$survivors planted bug(s) survived the emulation tests" >&2
  exit 1
fi
