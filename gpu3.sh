export PYTHONUNBUFFERED=1
timeout 240 python3 benchmarks/bench_offload.py --context 1M --layers 8 --steps 16 --drift 0.05 --modes dense,offload --profile > $OUT/m1.log 2>&1; echo m1 rc=$?; grep -v "^\s*$" $OUT/m1.log | grep -v Warn | tail -30 | cut -c1-200
timeout 330 python3 -m pytest -q -x tests/test_offload.py tests/test_sketch.py tests/test_search.py -k "cuda or copy or resident or tensor_core or block_lists_kernel" -p no:cacheprovider --durations=8 > $OUT/tests.log 2>&1; echo tests rc=$?; tail -25 $OUT/tests.log
