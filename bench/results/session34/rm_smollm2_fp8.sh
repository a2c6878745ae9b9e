#!/bin/bash
# SmolLM2-135M-Instruct reward model on the shipped HH pairs, CPU: bf16 backward against FP8 backward
cd /tmp
for mode in off weights all; do
  rm -rf /tmp/rmcmp/$mode
  /usr/bin/time -f "%e s" python /work/main/recipes/reward_model.py --model /tmp/smol/hf --output-dir /tmp/rmcmp/$mode \
    --max-steps 30 --global-batch-size 8 --micro-batch-size 8 --max-length 256 --master-weights \
    --no-gradient-checkpointing --val-check-interval 100 --val-size 64 --fp8-backward $mode > /tmp/rmcmp/$mode.log 2>&1
  echo "$mode rc=$?" >> /tmp/rmcmp/done.txt
done
