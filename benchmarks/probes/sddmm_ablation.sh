# Where the staged SDDMM's time goes: copies of the build inputs with one part of the token
# loop removed from csrc/sddmm.cu (the results are WRONG by design; only the times mean
# something), built side by side and timed against the unmodified build.
#
#     bash benchmarks/probes/sddmm_ablation.sh [workdir]     (from the repository root, on a GPU)
#
# Variants (each a sed edit of the block-barrier fill's loop, fill=0):
#   nocopy   no copies after the prologue (the stages hold stale data)
#   nosync   no block barrier per stage
#   noA      no ldmatrix of the gathered A fragments (registers hold addresses)
#   nomma    no mma (the fragments are folded into one accumulator)
#   nocopynosync  both of the first two
# Each build's kernel is timed on 11008x4096 / 4096x11008 at 1 % and 11008x4096 at 0.1 %,
# 4096 tokens, CUDA-graph replays, µs (min / median of three do_bench medians).
set -euo pipefail
work=${1:-/tmp/sddmm_ablation}
repo=$(pwd)
rm -rf "$work"
mkdir -p "$work"
edit() {  # edit NAME SED-EXPRESSION...
  local d=$work/$1
  shift
  mkdir -p "$d"
  cp -r "$repo"/setup.py "$repo"/pyproject.toml "$repo"/README.md "$repo"/csrc \
    "$repo"/python "$repo"/sparse_kernels "$d"/
  rm -f "$d"/python/spft/_C*.so
  for e in "$@"; do sed -i "$e" "$d"/csrc/sddmm.cu; done
}
copy_if='s/if (st + kRing - 1 < ps.n_stages) {/if (false) {/'
sync_line="/everyone's; slot st/s/__syncthreads();//"
edit base
edit nocopy "$copy_if"
edit nosync "$sync_line"
edit noA 's/ ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, \[a_at\];/ mov.b32 %0, a_at; mov.b32 %1, a_at; mov.b32 %2, a_at; mov.b32 %3, a_at;/'
edit nomma 's/Half2<T>::mma(acc\[g\], a, b0, b1);/acc[g][0] += __uint_as_float(a[0] ^ a[1] ^ a[2] ^ a[3] ^ b0 ^ b1);/'
edit nocopynosync "$copy_if" "$sync_line"
for v in nocopy nosync noA nomma nocopynosync; do
  if cmp -s "$work/base/csrc/sddmm.cu" "$work/$v/csrc/sddmm.cu"; then
    echo "variant $v: the sed edit matched nothing" >&2
    exit 1
  fi
done
for v in base nocopy nosync noA nomma nocopynosync; do
  (cd "$work/$v" && MAX_JOBS=4 python3 setup.py build_ext --inplace > build.log 2>&1) &
done
wait
cat > "$work/time.py" <<'EOF'
import sys

import torch
from triton.testing import do_bench

import spft._C as C
from benchmarks.common import capture_graph

results = []
torch.manual_seed(0)
for rows, cols, density in ((11008, 4096, 0.01), (4096, 11008, 0.01), (11008, 4096, 0.001)):
    dy = torch.randn(4096, rows, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4096, cols, device="cuda", dtype=torch.bfloat16)
    k = int(density * rows * cols)
    idx = torch.randperm(rows * cols, device="cuda")[:k].sort().values.int()
    graph = capture_graph(lambda dy=dy, x=x, idx=idx, cols=cols:
                          C.sddmm_staged(dy, x, idx, cols, -1, 0))
    ms = sorted(do_bench(graph.replay, rep=200) for _ in range(3))
    results.append(f"{rows}x{cols}@{density:.1%}: {ms[0] * 1e3:.1f} / {ms[1] * 1e3:.1f}")
print(f"{sys.argv[1]:14s}", "  ".join(results), flush=True)
EOF
for v in base nocopy nosync noA nomma nocopynosync; do
  (cd "$work/$v" && PYTHONPATH=$PWD/python:$repo python3 "$work/time.py" "$v")
done
