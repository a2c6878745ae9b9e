#!/usr/bin/env bash
# The PPO recipe on 1 GPU with its critic and reward model local, then served by recipes/critic_server.py
# (a second process on the same GPU, token-authenticated; the critic update overlaps the actor's update,
# futures on the client); config A widths, random init. With N >= 2 GPUs (bash bench/critic_server_gpu.sh N)
# also an N-rank FSDP2 actor job all-local vs against the server (each rank sends its share, the server
# updates once per global batch). Per-step metrics compared and time per step under $OUT/summary.md.
#   bash bench/critic_server_gpu.sh [N]      (carry .whl, incl. starlette, uvicorn, h11, anyio, click; and .whl_pa)
set -u
N=${1:-1}
OUT=${OUT:-critic_server_out}; W=/tmp/cs; mkdir -p "$OUT"; source bench/gpu_setup.sh
python3 -c "import starlette, uvicorn" || { echo "critic server needs starlette + uvicorn wheels in .whl"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
STEPS=6
export RLHF_KIT_SERVER_TOKEN=$(python3 -c "import secrets; print(secrets.token_urlsafe(24))")
PPO="recipes/ppo.py --actor $W/lm --train-prompts $W/data/train_prompts.jsonl --val-prompts $W/data/test_prompts.jsonl
    --backend compiled --num-rollout-samples 64 --global-batch-size 64 --micro-batch-size 16 --rollout-micro-batch-size 32
    --max-new-tokens 64 --max-steps $STEPS --val-check-interval 1000 --save-interval 3 --mixed-precision bf16
    --critic-server-timeout 120"
L1="accelerate launch --config_file recipes/accelerate/single.yaml"
LN="accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes $N"
SERVER=""
start_server() {  # $1: output dir; waits for the "listening" line
  python3 recipes/critic_server.py --reward-model $W/rm --total-steps $STEPS --micro-batch-size 32 \
      --mixed-precision bf16 --port 5567 --output-dir $W/$1 > $W/$1.log 2>&1 &
  SERVER=$!
  for i in $(seq 1 120); do grep -q "listening" $W/$1.log && break; sleep 1; done
  grep listening $W/$1.log
}
stop_server() { kill $SERVER; wait $SERVER 2>/dev/null; tail -3 $W/$1.log | cut -c1-300; }
run() { local name=$1; shift; local t0=$(date +%s.%N)
  timeout 300 "$@" --output-dir $W/$name > $W/$name.log 2>&1; local rc=$?; local t1=$(date +%s.%N)
  echo "$name rc=$rc wall=$(python3 -c "print(round($t1-$t0,1))")s" | tee -a "$OUT/runs.txt"
  tail -2 $W/$name.log | cut -c1-300; cp $W/$name/metrics.jsonl $OUT/${name}_metrics.jsonl 2>/dev/null; }

run local $L1 $PPO --reward-model $W/rm
start_server server
run remote $L1 $PPO --critic-server http://127.0.0.1:5567
ls $W/server/final/critic | head -3
stop_server server
PAIRS="local:remote"
if [ "$N" -ge 2 ]; then
  run local_${N}rank $LN $PPO --reward-model $W/rm
  start_server server_${N}rank
  run remote_${N}rank $LN $PPO --critic-server http://127.0.0.1:5567
  stop_server server_${N}rank
  PAIRS="$PAIRS local_${N}rank:remote_${N}rank"
fi

python3 - <<PY | tee "$OUT/summary.md"
import json, os, statistics
KEYS = ("reward/score_mean", "kl/seq_mean", "policy/loss", "value/loss", "value/grad_norm",
        "values/explained_variance", "lr/critic")
TIMES = ("time/generate", "time/score", "time/train")
def rows(name):
    p = os.path.join("$W", name, "metrics.jsonl")
    return [r for r in map(json.loads, open(p)) if "value/loss" in r] if os.path.exists(p) else []
print("| pair | steps | max rel. diff per metric | median s per step (steps 2+), local -> served |")
print("|---|---|---|---|")
for pair in "$PAIRS".split():
    a, b = (rows(n) for n in pair.split(":"))
    if not a or len(a) != len(b):
        print(f"| {pair} | {len(a)} vs {len(b)} rows | incomplete | |"); continue
    diffs = {k: max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b)) for k in KEYS if k in a[0]}
    med = lambda rs, k: statistics.median(r[k] for r in rs[1:]) if len(rs) > 1 else float("nan")  # step 1: compile
    times = ", ".join(f"{k.split('/')[1]} {med(a, k):.3f} -> {med(b, k):.3f}" for k in TIMES)
    for r in a + b:
        r["time/step"] = sum(r.get(k, 0.0) for k in TIMES)
    times += f", step {med(a, 'time/step'):.3f} -> {med(b, 'time/step'):.3f}"
    diff = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    print(f"| {pair} | {len(a)} | {diff} | {times} |")
PY
