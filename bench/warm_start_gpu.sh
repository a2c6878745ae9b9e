#!/usr/bin/env bash
# Warm start of the PPO recipe on one GPU: the same short run twice with one Inductor cache directory
# (cold, then warm), with --compile-blocks off and on; config-A widths, random init (bench/gpu_setup.sh).
# Reports process wall, launch to the end of step 1 (time/since_launch), step-1 and step-2 phase times (the step-1 excess is the warm-up) in $OUT/warm_start.md.
#   bash bench/warm_start_gpu.sh      (carry .whl)
set -u
OUT=${OUT:-warm_start_out}; W=/tmp/ws; mkdir -p "$OUT"; source bench/gpu_setup.sh
export TORCHINDUCTOR_CACHE_DIR=$W/inductor_cache   # shared by every run below: the first of each pair is cold
PPO="--actor $W/lm --reward-model $W/rm --train-prompts $W/data/train_prompts.jsonl
    --val-prompts $W/data/test_prompts.jsonl --num-rollout-samples 64 --global-batch-size 64 --micro-batch-size 16
    --rollout-micro-batch-size 64 --max-new-tokens 128 --max-steps 2 --val-check-interval 1000 --save-interval 1000"
run() { local name=$1; shift; local t0=$(date +%s.%N)
  # bench/startup_timeline.py runs recipes/ppo.py with a timestamp before each numbered step of main()
  local prof=; case $name in *_prof) prof="--cprofile $OUT/${name}.prof" ;; esac  # main() under cProfile to step 1
  timeout 200 python3 bench/startup_timeline.py --out $OUT/${name}_timeline.json $prof -- $PPO "$@" --output-dir $W/$name \
    > $W/$name.log 2>&1; local rc=$?; local t1=$(date +%s.%N)
  echo "$name $rc $(python3 -c "print(round($t1-$t0,1))")" >> $W/runs.txt
  cp $W/$name.log $OUT/; cp $W/$name/metrics.jsonl $OUT/${name}_metrics.jsonl 2>/dev/null; }
RUNS=${RUNS:-default_cold default_warm blocks_cold blocks_warm}   # a subset: RUNS="default_cold default_warm";
# auto_cold auto_warm: the recipe's own --compile-blocks auto; auto_prof: auto_warm again, main() profiled up to step 1
# (cProfile; its top rows in $OUT/auto_prof_top.txt)
for name in $RUNS; do
  case $name in blocks_*) run $name --compile-blocks on ;; auto_*) run $name ;; *) run $name --compile-blocks off ;; esac
  [ -f $OUT/$name.prof ] && python3 -c "import pstats, sys; pstats.Stats(sys.argv[1]).sort_stats('cumulative').print_stats(70)" \
    $OUT/$name.prof > $OUT/${name}_top.txt
done
python3 - "$W/runs.txt" "$OUT" <<'PY' | tee "$OUT/warm_start.md"
import json, os, sys
print("| run | rc | process wall s | launch to end of step 1 s | step 1 generate / score / train s | step 2 generate / score / train s |")
print("|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    name, rc, wall = line.split()
    path = os.path.join(sys.argv[2], f"{name}_metrics.jsonl")
    rows = [json.loads(x) for x in open(path)] if os.path.exists(path) else []
    steps = [r for r in rows if "time/generate" in r]
    cell = lambda r: " / ".join(f"{r.get('time/' + k, float('nan')):.3f}" for k in ("generate", "score", "train"))
    launch = f"{steps[0]['time/since_launch']:.1f}" if steps and "time/since_launch" in steps[0] else "-"
    print(f"| {name} | {rc} | {wall} | {launch} | {cell(steps[0]) if steps else '-'} | {cell(steps[1]) if len(steps) > 1 else '-'} |")
    tl = os.path.join(sys.argv[2], f"{name}_timeline.json")
    if os.path.exists(tl):  # seconds since launch at each numbered step of the recipe's main()
        print(f"|  | {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in json.load(open(tl))["marks"]) + " | | | | |")
PY
