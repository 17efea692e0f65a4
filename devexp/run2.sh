set -o pipefail
export PYTHONPATH=$PWD/python:$PWD:$PWD/.bnb PYTHONUNBUFFERED=1
(MAX_JOBS=8 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1) || { tail -40 $OUT/build.log; exit 1; }
echo built
python3 -m pytest -q -x tests/test_sparse_delta_gpu.py -k "staged and (default or bad_input or through_op)" 2>&1 | tail -2
python3 benchmarks/probe_qspiel_step.py 2>&1 | tee $OUT/qstep.txt | grep -v "^    " 
(cd benchmarks && python3 bench_nf4.py 2>&1 | tee $OUT/bench_nf4.txt | grep -E "qSpIEL|bf16-base" )
