set -o pipefail
export PYTHONPATH=$PWD/python:$PWD:$PWD/.bnb:$PWD/benchmarks PYTHONUNBUFFERED=1
(MAX_JOBS=8 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1) || { tail -40 $OUT/build.log; exit 1; }
python3 benchmarks/probes/qspiel_timeline.py 2>&1 | grep -v Warn | tee $OUT/timeline.txt
(cd benchmarks && python3 bench_nf4.py 2>&1 | tee $OUT/bench_nf4.txt | grep -E "^  spft qSpIEL|^  published qSpIEL|bf16-base sparse" )
