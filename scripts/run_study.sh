#!/usr/bin/env bash
# The convergence study of docs/results.md, end to end (about an hour on a 2-core CPU):
#   bash scripts/run_study.sh [DATA_DIR]
# Sweeps are idempotent: re-running skips finished runs and resumes stopped ones.
set -euo pipefail
DATA=${1:-../shared/data}
cd "$(dirname "$0")/.."
sparseopt sweep configs/sweeps/study_mnist_mlp.yaml --set data_dir="$DATA" --out runs/study/mnist_mlp
sparseopt sweep configs/sweeps/study_itop_mnist.yaml --set data_dir="$DATA" --out runs/study/itop_mnist
sparseopt sweep configs/sweeps/study_cifar10_resnet20.yaml --set data_dir="$DATA" --out runs/study/cifar10_resnet20
sparseopt report runs/study/mnist_mlp --out docs/results/mnist_mlp
sparseopt report runs/study/itop_mnist --out docs/results/itop_mnist
sparseopt report runs/study/cifar10_resnet20 --out docs/results/cifar10_resnet20
