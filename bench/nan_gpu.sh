#!/usr/bin/env bash
set -u
# GPU check of issue 5's NaN (bench/nan_probe.py) and of the PPO recipe on 1 GPU, config A widths.
#   STEPS=8 FAST=1 [NO_PROBE=1] bash bench/nan_gpu.sh   (carry .whl and .whl_pa)
W=/tmp/w; source bench/gpu_setup.sh
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
[ -n "${NO_PROBE:-}" ] || python3 bench/nan_probe.py --out $OUT/probe.jsonl 2>&1 | grep -v Warning
PPO="recipes/ppo.py --actor $W/lm --reward-model $W/rm --train-prompts $W/data/train_prompts.jsonl --val-prompts $W/data/test_prompts.jsonl
    --backend compiled --num-rollout-samples 64 --global-batch-size 64 --micro-batch-size 16 --rollout-micro-batch-size 32
    --max-new-tokens 64 --max-steps ${STEPS:-2} --val-check-interval 1000 --save-interval 1000 --mixed-precision bf16 "
# the PPO recipe on 1 GPU: as is, and with the fast flags
run() { local name=$1; shift
  timeout 300 accelerate launch --config_file recipes/accelerate/single.yaml $PPO "$@" --output-dir $W/ppo_$name > $W/ppo_$name.log 2>&1; echo "$name rc=$?"
  tail -3 $W/ppo_$name.log | cut -c1-300
  python3 -c "
import json
for l in open('$W/ppo_$name/metrics.jsonl'):
    r=json.loads(l); print({k:r.get(k) for k in ('step','policy/loss','value/loss','policy/grad_norm','reward/score_mean','kl/seq_mean','time/generate','time/score','time/train')})
"
  cp $W/ppo_$name/metrics.jsonl $OUT/ppo_$name.jsonl; }
run plain --compile-blocks off
[ -n "${FAST:-}" ] && run fast --compile-blocks on --master-weights
