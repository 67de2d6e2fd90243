#!/usr/bin/env bash
# The paper's comparison: every variant x fine-tuning seed as one `dvc exp run`, then the table.
#   VARIANTS="cebert acebert" SEEDS="1 2" scripts/run_variants.sh
# Variants that read the same image tokens share one pre-training (docs/pretrain.md), so the
# cost is three pre-trainings (twinbert, fashionbert, the cebert family) plus one fine-tuning
# and one evaluation per run.
set -euo pipefail
variants=${VARIANTS:-"twinbert fashionbert cebert cebert_hot cebert_adv acebert"}
seeds=${SEEDS:-"1 2 3"}
for variant in $variants; do
  for seed in $seeds; do
    echo "=== $variant, seed $seed"
    dvc exp run -S "model.variant=$variant" -S "finetune.seed=$seed"
  done
done
ace compare
