set -o pipefail
export PYTHONPATH=$PWD/python:$PWD:$PWD/.bnb:$PWD/benchmarks PYTHONUNBUFFERED=1
(MAX_JOBS=8 python3 setup.py build_ext --inplace > $OUT/build.log 2>&1) || { tail -40 $OUT/build.log; exit 1; }
echo built
python3 -m pytest -q -x tests/test_sparse_delta_gpu.py -k "staged" 2>&1 | tail -2
python3 benchmarks/probes/sddmm_schedule.py 2>&1 | tee $OUT/schedule.txt
python3 benchmarks/probe_qspiel_step.py 2>&1 | tee $OUT/qstep.txt | grep -E "sddmm|reduce|starts|eager|spft /|^spft|^published"
(cd benchmarks && python3 bench_nf4.py 2>&1 | tee $OUT/bench_nf4.txt | grep -E "^  spft qSpIEL|^  published qSpIEL|bf16-base sparse" )
timeout 100 compute-sanitizer --tool memcheck --print-limit 5 python3 -m pytest -q -x tests/test_sparse_delta_gpu.py -k "staged and (segments or default or splits3) and bfloat16 and int64 and stage_barriers and not 0.05" 2>&1 | tail -3
timeout 60 compute-sanitizer --tool racecheck --print-limit 5 python3 -m pytest -q -x tests/test_sparse_delta_gpu.py -k "staged_gpu and 1032 and segments7 and 0.01 and bfloat16 and int32 and stage_barriers" 2>&1 | tail -3
