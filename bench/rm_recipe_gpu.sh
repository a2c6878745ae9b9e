#!/usr/bin/env bash
# The reward-model recipe on 1 GPU, config-A widths (random init), shipped HH pairs, max length 512:
# autocast (default) against --master-weights --gradient-checkpointing. Metrics under $OUT.
#   bash bench/rm_recipe_gpu.sh      (carry .whl and .whl_pa)
set -u
OUT=${OUT:-rm_recipe_out}; W=/tmp/rmr; mkdir -p "$OUT"; source bench/gpu_setup.sh
RM="recipes/reward_model.py --model $W/lm --train-data $W/data/train_comparisons.jsonl --test-data $W/data/test_comparisons.jsonl
    --max-length 512 --lr 1e-5 --max-steps 30 --global-batch-size 64 --micro-batch-size 16 --val-check-interval 1000
    --save-interval 15 --mixed-precision bf16"
for run in "plain" "master --master-weights --gradient-checkpointing"; do
  set -- $run; name=$1; shift
  t0=$(date +%s.%N)
  timeout 200 python3 $RM "$@" --output-dir $W/$name > $W/$name.log 2>&1; rc=$?
  echo "$name rc=$rc wall=$(python3 -c "print(round($(date +%s.%N)-$t0,1))")s"; tail -2 $W/$name.log | cut -c1-200
  python3 -c "
import json
rows=[json.loads(l) for l in open('$W/$name/metrics.jsonl')]
tr=[r for r in rows if 'train/loss' in r]
print('$name', 'steps', len(tr), 'loss first/last', round(tr[0]['train/loss'],4), round(tr[-1]['train/loss'],4), 'acc last', round(tr[-1].get('train/accuracy', float('nan')),3))
print('$name', {k: v for r in rows for k, v in r.items() if k.startswith('test/') or 'per_s' in k or 'memory' in k})
"
  cp $W/$name/metrics.jsonl "$OUT/rm_$name.jsonl"
done
