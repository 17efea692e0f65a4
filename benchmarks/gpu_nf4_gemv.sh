#!/usr/bin/env bash
# On a GPU machine: build spft._C, run the compiled GEMV's tests (also under compute-sanitizer),
# then time it against its anchors. Usage: bash benchmarks/gpu_nf4_gemv.sh [tune args...]
# Environment: NCU=1 adds an Nsight Compute pass and a SASS opcode histogram; SKIP_TESTS=1 and
# SKIP_TUNE=1 leave out the tests (and sanitizer) or the timing. Writes the build log and the
# built extension to $OUT when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/spft-gpu}"
mkdir -p "$out"
# Always (re)build: a warm machine keeps the last build, which may predate the sources.
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python3 -c "import torch, spft._C as c; print('spft._C', c.__file__, 'cuda', c.with_cuda())"
find python -name "_C*.so" -exec cp {} "$out/" \;
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -v -p no:cacheprovider tests/test_nf4_gemv_cuda.py \
    tests/test_nf4_gemv_tiled_cuda.py tests/test_nf4_gemv_layout.py >"$out/pytest.log" 2>&1
  echo "pytest exit: $?"; grep -E "FAIL|Error|passed|failed|Fatal|Segmentation" "$out/pytest.log" | tail -15
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider \
    tests/test_nf4_gemv_cuda.py tests/test_nf4_gemv_tiled_cuda.py \
    -k "inconsistent or 45x192 or every_config or dense_deltas or split" 2>&1 | tail -4
  echo "sanitizer exit: $?"
fi
if [ "${NCU:-0}" = 1 ]; then
  m=smsp__average_warps_issue_stalled
  metrics="gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,\
smsp__issue_active.avg.pct_of_peak_sustained_active,\
sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,\
sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,\
sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active,\
l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,\
${m}_long_scoreboard_per_issue_active.ratio,${m}_short_scoreboard_per_issue_active.ratio,\
${m}_mio_throttle_per_issue_active.ratio,${m}_barrier_per_issue_active.ratio,\
${m}_wait_per_issue_active.ratio,${m}_math_pipe_throttle_per_issue_active.ratio,\
${m}_not_selected_per_issue_active.ratio,${m}_lg_throttle_per_issue_active.ratio,\
${m}_dispatch_stall_per_issue_active.ratio,${m}_no_instruction_per_issue_active.ratio,\
l1tex__throughput.avg.pct_of_peak_sustained_active,lts__throughput.avg.pct_of_peak_sustained_elapsed,\
launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem,launch__registers_per_thread"
  ncu --kernel-name regex:nf4_gemv --metrics "$metrics" python3 benchmarks/ncu_nf4_gemv.py 2>&1 \
    | grep -E "nf4_gemv(_tiled)?_kernel|  [a-z]" | sed -E 's/smsp__average_warps_issue_stalled_/stall_/; s/ +/ /g' \
    | cut -c1-120 | tee "$out/ncu.txt"
  so=$(find python -name "_C*.so" | head -1)
  fn=$(cuobjdump -sass "$so" | grep -o "Function : .*nf4_gemv_kernelI13__nv_bfloat16Li1ELi1ELi4ELi2E[^ ]*" | head -1 | cut -d' ' -f3)
  echo "SASS opcode histogram of $fn (main loop and all):"
  cuobjdump -sass -fun "$fn" "$so" | grep -oE "^\s+/\*[0-9a-f]{4}\*/\s+[A-Z0-9_.]+" | awk '{print $2}' \
    | sed -E 's/\..*//' | sort | uniq -c | sort -rn | head -24 | tr '\n' ' '; echo
fi
[ "${SKIP_TUNE:-0}" = 1 ] || python3 benchmarks/tune_nf4_gemv.py "$@"
