#!/bin/bash
# MNIST written as an image folder (6,000 train / 2,000 val 28-px PNGs) trained with each --augment preset, and the
# same digits as IDX files: the measurement behind `--augment auto` = none for small folders (docs/training.md).
#   bash scripts/folder_augmentation.sh [MNIST_IDX_DIR] [OUT]      (defaults: ../shared/data/mnist, runs/folder_augmentation)
set -euo pipefail
MNIST=${1:-../shared/data/mnist}
OUT=${2:-runs/folder_augmentation}
python - "$MNIST" "$OUT/folder" <<'PY'
import sys
from pathlib import Path
from PIL import Image
from sparseopt.data.mnist import load_mnist
mnist, root = sys.argv[1], Path(sys.argv[2])
for train, split, n in ((True, "train", 6000), (False, "val", 2000)):
    x, y = load_mnist(mnist, "mnist", train)
    for i in range(n):
        d = root / split / str(int(y[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i, 0].numpy()).save(d / f"{i}.png")
PY
COMMON="--model mlp --mlp-hidden 256 256 --sparsity 0.9 --epochs 8 --batch-size 128 --warmup-epochs 1 --delta-t 20 --quiet"
for seed in 0 1; do
  for aug in none imagenet crop_flip; do
    sparseopt train --dataset imagefolder --data-dir "$OUT/folder" --image-size 28 --workers 1 --augment $aug \
      --seed $seed $COMMON --out "$OUT/folder-$aug-s$seed" --overwrite
  done
  sparseopt train --dataset mnist --data-dir "$MNIST" --train-subset 6000 --test-subset 2000 --seed $seed $COMMON \
    --out "$OUT/idx-s$seed" --overwrite
done
for f in "$OUT"/*/results.json; do
  python -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-2], r['final']['test_acc'])" "$f"
done
