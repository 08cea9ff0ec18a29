#!/usr/bin/env bash
# Issue 15's converged suite in two streams of one thread each (`make benchmark-converged DATA=dir`).
#
# These models are small, and one thread trains them nearly as fast as two: vgg11_w25's 30-epoch baseline took
# 747 s alone on two threads, and two one-thread baselines side by side took 1076 s and 1109 s, ×1.35 the work
# done. Estimated from those parts, the whole suite takes about 130 min here (phase 1 ~61, phase 2 ~57, phase 3
# ~14); it has not been timed end to end. Phase 1 trains VGG's baseline and sparse model
# (its 50% entry, with the peer) beside both mobilenet_v2 entries; phase 2 prunes that sparse model in the other
# VGG entries (--reuse-trained) beside the raw-|γ| peer seeds; phase 3 runs the --normalize max peer seeds, which
# reuse Torch-Pruning's seeds from phase 2. A failure in either stream fails the suite; --resume continues entries
# an earlier, interrupted run left.
set -euo pipefail
DATA=${1:?usage: benchmarks/converged.sh DATA_DIR (the folder holding cifar10.npz)}
PY=${PYTHON:-python3}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
run() { "$PY" -m benchmarks.run --suite converged --data-dir "$DATA" --resume "$@"; }
vgg() { run --only vgg11_w25 --reuse-trained "$@"; }
seeds() { "$PY" -m benchmarks.peer_seeds "benchmarks/work/converged-vgg11_w25-cifar10-$1" --seed0-from-run "${@:2}"; }
wait_all() { local rc=0 p; for p in "$@"; do wait "$p" || rc=$?; done; return "$rc"; }
tag=$("$PY" -c 'from benchmarks.common import machine_tag; print(machine_tag())')
t0=$SECONDS

vgg --percent 0.5 --normalize none & a=$!
run --only mobilenet_v2 & b=$!
wait_all "$a" "$b"
echo "phase 1 done after $(( (SECONDS - t0) / 60 )) min"

( vgg --percent 0.7 --normalize none && vgg --percent 0.55 && vgg --percent 0.7 --normalize max ) & a=$!
( seeds p50 && vgg --percent 0.5 --normalize max ) & b=$!
wait_all "$a" "$b"
echo "phase 2 done after $(( (SECONDS - t0) / 60 )) min"

seeds p50-nmax --peer-from "benchmarks/results/$tag/seeds-converged-vgg11_w25-cifar10-p50.json"
"$PY" -m benchmarks.run --render-only
echo "converged suite: $(( (SECONDS - t0) / 60 )) min"
