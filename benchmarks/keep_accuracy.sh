#!/usr/bin/env bash
# Issue 26's converged suite (benchmarks/keep_accuracy.py says what each job is). Two one-thread streams, so that
# the two cores of the reference machine each run one; a trained model or a finished row is never redone.
#   bash benchmarks/keep_accuracy.sh DATA_DIR     (DATA_DIR holds cifar10.npz: ../shared/tools/fetch_cifar10.py)
# Wall time on amd-epyc-2c (AVX2, 2 cores), measured: 53 min per vgg11_w25 training (both in parallel), then
# per stream about 2 h 20 min of jobs (one refine: 12 min plain, 22 min with --distill or steps, 34 min both).
# mobilenet_v2 (MOBILENET=1) adds two 5-epoch trainings (44 min each, in parallel) and its job (not yet timed).
set -euo pipefail
DATA=${1:?usage: keep_accuracy.sh DATA_DIR}
W=benchmarks/work/keep
mkdir -p "$W/vgg" "$W/mnv2"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
V=(-a vgg11_w25 -d cifar10 --data-dir "$DATA" -e 30 --eval-every 2 --seed 0 --device cpu)
M=(-a torchvision:mobilenet_v2 -d cifar10 --data-dir "$DATA" -e 5 --lr 0.05 --seed 0 --device cpu)
train() { [ -f "$1" ] || slimexport train -o "$@" > "${1%.pt}.log" 2>&1; }
run_jobs() { "${PYTHON:-python3}" -m benchmarks.keep_accuracy --data-dir "$DATA" "$@"; }
( train "$W/vgg/baseline.pt" "${V[@]}" --sparsity 0
  run_jobs vgg:plain:0 vgg:plain:1 vgg:plain:2 vgg:distill:0 vgg:distill:1 vgg:distill:2 vgg:all:0
  if [ -n "${MOBILENET:-}" ]; then train "$W/mnv2/baseline.pt" "${M[@]}" --sparsity 0; fi ) &
( train "$W/vgg/sparse-polar.pt" "${V[@]}" --sparsity 8e-4 --regularizer polar
  run_jobs vgg:steps:0
  while [ ! -f "$W/rows/vgg-plain-0.json" ]; do sleep 30; done  # Torch-Pruning's MACs are ours
  run_jobs tp:plain:0 tp:plain:1 tp:plain:2 tp:distill:0 tp:distill:1 tp:distill:2
  run_jobs vgg+keep25:plain:0 vgg+keep25:plain:1 vgg+keep25:plain:2 vgg+mean:plain:0  # at the plain run's MACs
  if [ -n "${MOBILENET:-}" ]; then
    train "$W/mnv2/sparse-polar.pt" "${M[@]}" --sparsity 1e-3 --regularizer polar
    while [ ! -f "$W/mnv2/baseline.pt" ]; do sleep 30; done
    run_jobs mobilenet
  fi ) &
wait
run_jobs render
