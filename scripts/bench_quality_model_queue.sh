#!/bin/sh
# The model-based part of the quality benchmark, in priority order (each step resumes from bench_cache/).
cd "$(dirname "$0")/.." || exit 1
PY="nice -n 10 ${PYTHON:-python} scripts/bench_quality.py"
$PY --part ppl --kind model --only sleb --ks 7
$PY --part ppl --kind model --only "iterative bi" --ks 7
$PY --part search
$PY --part ppl --kind model --only "sleb,iterative bi" --ks 10,3,5
$PY --part ppl --kind model --only "iterative angular" --ks 7,10,3,5
