#!/usr/bin/env bash
# The PPO recipe on 1 GPU with its critic and reward model local, then served by recipes/critic_server.py
# (a second process on the same GPU); config A widths, random init. Metrics under $OUT.
#   bash bench/critic_server_gpu.sh      (carry .whl and .whl_pa)
set -u
OUT=${OUT:-critic_server_out}; W=/tmp/cs; mkdir -p "$OUT"; source bench/gpu_setup.sh
STEPS=6
PPO="recipes/ppo.py --actor $W/lm --train-prompts $W/data/train_prompts.jsonl --val-prompts $W/data/test_prompts.jsonl
    --backend compiled --num-rollout-samples 64 --global-batch-size 64 --micro-batch-size 16 --rollout-micro-batch-size 32
    --max-new-tokens 64 --max-steps $STEPS --val-check-interval 1000 --save-interval 3 --mixed-precision bf16"
summ() { python3 -c "
import json
for l in open('$1'):
    r=json.loads(l); print({k:r.get(k) for k in ('step','reward/score_mean','kl/seq_mean','value/loss','values/explained_variance','time/generate','time/score','time/train')})
"; }
timeout 240 python3 $PPO --reward-model $W/rm --output-dir $W/local > $W/local.log 2>&1; echo "local rc=$?"; tail -2 $W/local.log | cut -c1-300
summ $W/local/metrics.jsonl; cp $W/local/metrics.jsonl $OUT/local_metrics.jsonl
python3 recipes/critic_server.py --reward-model $W/rm --total-steps $STEPS --micro-batch-size 32 --mixed-precision bf16 \
    --port 5567 --output-dir $W/server > $W/server.log 2>&1 &
SERVER=$!
for i in $(seq 1 120); do grep -q "listening" $W/server.log && break; sleep 1; done
grep listening $W/server.log
timeout 240 python3 $PPO --critic-server http://127.0.0.1:5567 --output-dir $W/remote > $W/remote.log 2>&1; echo "remote rc=$?"; tail -2 $W/remote.log | cut -c1-300
summ $W/remote/metrics.jsonl; cp $W/remote/metrics.jsonl $OUT/remote_metrics.jsonl
ls $W/server/final/critic | head -3
kill $SERVER; tail -3 $W/server.log | cut -c1-300
