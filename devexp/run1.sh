set -o pipefail
export PYTHONPATH=$PWD/python:$PWD:$PWD/.bnb PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.draw --format=csv,noheader
(MAX_JOBS=8 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1) || { tail -40 $OUT/build.log; exit 1; }
echo built
python3 -m pytest -q -x tests/test_sparse_delta_gpu.py -k "staged" 2>&1 | tail -3
python3 -m pytest -q -x tests/test_nf4.py 2>&1 | tail -2
python3 benchmarks/probes/sddmm_schedule.py --blocks 264 2>&1 | tee $OUT/schedule.txt
(cd benchmarks && python3 bench_nf4.py 2>&1 | tee $OUT/bench_nf4.txt | grep -v "^ *$" | tail -25)
