#!/usr/bin/env bash
# The TRL comparisons on the GPU machine, in one call (see bench/README.md).
#   bash bench/vs_trl_gpu.sh a    # PPO config A (+ profile of our step) and the reward-model benchmark
#   bash bench/vs_trl_gpu.sh b    # PPO config B (ours with and without --offload-idle), RM at lower budgets
#   bash bench/vs_trl_gpu.sh c|d  # PPO config A | B with --compile-blocks / --master-weights (session 3)
#   bash bench/vs_trl_gpu.sh e    # RM: ours with gradient checkpointing / master weights / compiled blocks (session 3)
#   bash bench/vs_trl_gpu.sh f    # PPO config B: TRL, ours --optimizer adamw8bit, ours with master weights (session 11)
#   bash bench/vs_trl_gpu.sh g    # the multi-tensor 8-bit AdamW: one optimizer step on config B's actor (ours,
#                                 # torchao, master weights), the offload check, the kept generation cache,
#                                 # PPO config B with adamw8bit (session 13; SYSTEMS="trl ours" adds TRL)
#   bash bench/vs_trl_gpu.sh h    # PPO config B with master weights (the second call of session 13)
#   bash bench/vs_trl_gpu.sh i    # session 14: PPO config A (ours profiled per phase, the code at BASE, TRL), the
#                                 # table-read 8-bit AdamW step, A at micro-batches 64 and 32, B with adamw8bit
#   bash bench/vs_trl_gpu.sh k    # this tree against $BASE (another commit's git archive): PPO A micro 64, B 8-bit micro 32
#   bash bench/vs_trl_gpu.sh l    # session 15: the decode-kernel tests on the GPU, generation A and 1B (Triton kernel
#                                 # and matmul), PPO A micro 64 (this tree, then $BASE), PPO B 8-bit micro 32
#   bash bench/vs_trl_gpu.sh m    # the decode kernel's launch settings (bench/decode_attention.py), then PPO A micro 64
#                                 # with $BASE first and this tree second (the re-run of stage l's pair)
#   bash bench/vs_trl_gpu.sh n    # session 16: the decode kernel's launch settings and product modes, PPO A micro 64
#                                 # ($BASE first, this tree, then TRL), generation A and 1B with Inductor max-autotune
#   bash bench/vs_trl_gpu.sh o    # session 16, second call: the GPU tests of the generation backend, generation A and 1B
#                                 # (compiled prefill, eager prefill, matmul, $KCFG kernel settings), PPO A profiled
#                                 # (this tree, then $BASE), the decode-kernel sweep on one cache per layer
#   bash bench/vs_trl_gpu.sh p    # session 16, third call: the GPU tests of the generation backend, PPO A ($BASE first,
#                                 # this tree, TRL), generation A and 1B (defaults and matmul)
#   bash bench/vs_trl_gpu.sh r    # session 17: generation A and 1B and PPO A, this tree against $BASE2 (the commit
#                                 # before the kernel change), PPO A of the maskless branch ($BASE), A with
#                                 # --old-logprobs sampler, PPO B (this tree, $BASE); results packed in results.tgz
#   bash bench/vs_trl_gpu.sh s    # session 17, second call: PPO A (profiled, --old-logprobs sampler) and TRL A
#   bash bench/vs_trl_gpu.sh t    # PPO B: ours (8-bit, micro 32), then TRL B (micro 16) in the same call
#   bash bench/vs_trl_gpu.sh v    # session 18: warm start (cold, warm, profiled) with a bytecode cache, import times,
#                                 # generation A and 1B (profiled) of this tree and .edges (branch decode-edges-compiled)
#   bash bench/vs_trl_gpu.sh u    # branch decode-edges-compiled against $BASE2 (.base5 = main): generation A and 1B
#                                 # twice each, alternating, then PPO A (carry .whl .whl112 .base5)
#   bash bench/vs_trl_gpu.sh w    # session 18: warm start of .base5w (main before the session) and this tree, PPO A
#                                 # (this tree, TRL)
#   bash bench/vs_trl_gpu.sh x    # SmolLM2 from the GGUF parts (two calls), 7 PPO steps padded, then packed
#   bash bench/vs_trl_gpu.sh x2   # after x, same warm machine: the RM recipe on SmolLM2, packed then padded, one epoch
#   bash bench/vs_trl_gpu.sh y    # session 19: branch packed-passes: its tests on the GPU, PPO A packed / padded /
#                                 # packed, PPO B (8-bit, micro 32) packed / padded
#   bash bench/vs_trl_gpu.sh s22  # session 22: PPO on SmolLM2-135M's widths (config S), packed / padded, this tree
#                                 # against .base22 (main before the session with this bench/), with sync reports;
#                                 # MICROS="32 64" adds this tree, padded, at those micro-batch sizes
#   bash bench/vs_trl_gpu.sh s23  # session 23: PPO S and A at micro-batches of 16, fixed and grown to the GPU's memory
#                                 # (--micro-memory 0.8, the recipe's --micro-batch-memory), and A at 64
#   bash bench/vs_trl_gpu.sh s24  # session 24 (at commit 00cb91e): the decode kernel split over the slots: GPU tests,
#                                 # settings, generation
#   bash bench/vs_trl_gpu.sh s24b # session 24 (at 00cb91e's kernel): the split kernel at batch 8 and 16, PPO A and TRL A,
#                                 # then stage s23r
#   bash bench/vs_trl_gpu.sh s24c # session 24: PPO A, scoring first against --score-in-update, alternating
#   (stages s27p and s27q, session 27's packed prefill, live on the branch packed-prefill-2, where they ran)
#   bash bench/vs_trl_gpu.sh s27  # for the next call (session 26): GPU checks of its last changes, the RM recipe and
#                                 # PPO A against the trees before them (carry .whl .whl112 .base26 .base27)
#   bash bench/vs_trl_gpu.sh s28  # session 28: generation A and 1B with and without the deferred residual adds and PDL; PPO A,
#                                 # this tree against $BASE (.base28), alternating (carry .whl .whl112 .base28)
#   bash bench/vs_trl_gpu.sh s28b # session 28: generation A and 1B with and without PDL (profiled); PPO A with and without
#                                 # TORCHINDUCTOR_ENABLE_PDL=1, alternating (carry .whl .whl112)
#   bash bench/vs_trl_gpu.sh s29  # session 29, branch decode-gemm: the decode-GEMM kernel (tests, alone against cuBLAS, in generation)
#   bash bench/vs_trl_gpu.sh s29b # session 29: PPO A at the defaults, then TRL A
#   bash bench/vs_trl_gpu.sh s30  # for the next call: PPO A and TRL A alternating, PAIRS=3 pairs (about 420 s)
#   bash bench/vs_trl_gpu.sh s30c # session 30, at b0475b9 only (reverted after): the decode kernel's first cache block
#                                 # prefetched before the PDL wait
#   bash bench/vs_trl_gpu.sh s34  # session 34: PPO B then A, ours, with --fp8-backward off, weights and all in turn (FP8
#                                 # backward products, rlhf_kit.models.fp8), PAIRS (default 1) rounds; CONFIGS="B A" picks;
#                                 # GAPS=1 runs stage s31 on A first; TRL=1 adds TRL 1.12 on B (carry .whl .whl112)
#   bash bench/vs_trl_gpu.sh s32  # session 32: PPO A with the blocks compiled dynamic from the start (--compile-dynamic)
#                                 # against the default, alternating, PAIRS (default 2) pairs; GAPS=1 runs stage s31 on A
#                                 # first (carry .whl .whl112)
#   bash bench/vs_trl_gpu.sh s31  # session 31: PPO A and B profiled, the device's idle gaps charged to the host's Python
#                                 # stacks (bench/trace_gaps.py); WS=1 (default) adds the recipe's warm start (carry .whl .whl112)
#   bash bench/vs_trl_gpu.sh s30b # session 30: the varlen tests on the GPU; PPO A, this tree against $BASE (.base30),
#                                 # alternating, then TRL A; PROF=1 adds stage s26 (carry .whl .whl112 .base30)
#   bash bench/vs_trl_gpu.sh s28c # session 28: generation with two decode chains; PPO A (defaults, then 2 chains), TRL A
#   bash bench/vs_trl_gpu.sh s26b # session 26: PPO A (--score-in-update), this tree against $BASE (.base26), alternating
#   bash bench/vs_trl_gpu.sh s26  # session 26: PPO A (--score-in-update): device-busy time per phase (torch.profiler)
#                                 # and the host's functions (cProfile over 4 steps)
#   bash bench/vs_trl_gpu.sh rm2  # session 20: the reward model, packed (varlen) against padded passes, twice
#   bash bench/vs_trl_gpu.sh q    # written in session 16 for the next call: PPO A (micro 64) and B (8-bit, micro 32)
#                                 # with --old-logprobs recompute and sampler (this tree), then $BASE (e.g. .base3 =
#                                 # the branch maskless-ppo-layout, archived as described below)
# A $BASE tree must hold all of bench/*.py as well as rlhf_kit (git archive COMMIT rlhf_kit $(git ls-tree --name-only
# COMMIT bench/ | grep .py$)): a script missing there is found in this tree's bench/, which puts this tree's
# rlhf_kit first on sys.path (before session 16, every BASE run imported this tree's rlhf_kit). check_tree below
# stops a two-tree stage when that would happen again.
# Wheels: .whl/ (TRL 1.16 + datasets, dill, multiprocess), .whl112/ (TRL 1.12 for PPO), .whl_pa/ (pyarrow,
# installed only when the machine's pyarrow is older than datasets needs). Results under $OUT.
set -u
phase=${1:-a}
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
pipi /tmp/site .whl/*.whl || exit 1
pipi /tmp/site112 .whl112/*.whl || exit 1
if ! python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)"; then
  pipi /tmp/site .whl_pa/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, accelerate, datasets, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__, 'trl', trl.__version__)"
WORK=/tmp/bench_work
# A two-tree stage stops unless $BASE's bench/ppo_vs_trl.py imports $BASE's own rlhf_kit (see the note above).
check_tree() {
  python3 - "$1" <<'PY' || exit 1
import os, runpy, sys
tree = os.path.abspath(sys.argv[1])
sys.argv = [os.path.join(tree, "bench", "ppo_vs_trl.py")]
runpy.run_path(sys.argv[0], run_name="check_tree")  # module level only: the imports and sys.path changes
import rlhf_kit
got = os.path.dirname(os.path.dirname(os.path.abspath(rlhf_kit.__file__)))
sys.exit(None if got == tree else f"{tree}/bench/ppo_vs_trl.py imports rlhf_kit from {got}")
PY
}
ours_summary() {  # ours_summary DIR steps|syncs: each DIR/*/ppo_vs_trl.json's run, with its steps or host waits
  python3 - "$1" "$2" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/*/ppo_vs_trl.json")):
    o = json.load(open(f))["configs"][0].get("ours")
    if o is None:  # a TRL-only run
        continue
    keys = ("median_step_s", "median_phases_s", "peak_allocated_gib", "step_times_s", "dynamo", "error")
    print(f.split("/")[-2], {k: o.get(k) for k in keys})
    if sys.argv[2] == "steps":
        for s in o.get("steps", []):
            print("   ", {k: s.get(k) for k in ("step_s", "micro_batch_tokens", "value_loss")}, s.get("phases_s"))
    else:
        for k, v in (o.get("syncs") or {}).get("top", [])[:12]:
            print("   ", v, k)
PY
}
tree_name() { [ "$1" = . ] && echo this || basename "$1" | tr -d .; }  # . -> this, .base4 -> base4
ppo_a_trees() {  # PPO config A, ours with the arguments in $A, once per tree given (. or a $BASE archive)
  for tree in "$@"; do
    name=$(tree_name "$tree")
    python3 "$tree/bench/ppo_vs_trl.py" $A --work $WORK/a_$name --out "$OUT/a64_$name" 2>&1 | grep -E "^\| A" | tee -a "$OUT/ppo_log.txt"
  done
}
ppo_summary() {  # each of our runs in $OUT/$1/ppo_vs_trl.json: median and fastest step, phases, host waits
  python3 - "$OUT" "$1" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], sys.argv[2], "ppo_vs_trl.json"))):
    o = json.load(open(f))["configs"][0].get("ours")
    if not o:
        continue
    if o.get("error"):  # with the timed steps when only a later pass failed (o["pending"] names it)
        print(f, o.get("pending"), o["error"][-500:])
    if "step_times_s" not in o:
        continue
    t = o["step_times_s"][1:]
    print(os.path.basename(os.path.dirname(f)), "median", round(o["median_step_s"], 4), "min", round(min(t), 4),
          {k: round(v, 4) for k, v in o["median_phases_s"].items()}, "host waits", (o.get("syncs") or {}).get("per_phase"),
          "GiB", round(o.get("peak_allocated_gib", float("nan")), 2))
    print("   ", [round(x, 3) for x in t], [(n, k) for k, n in (o.get("syncs") or {}).get("top", [])[:6]])
PY
}
gen_summary() {  # gen_summary GENERATION_JSON LABEL: each variant's median, fastest, decode step, floor ratio
  python3 - "$1" "$2" <<'PY'
import json, sys
for c in json.load(open(sys.argv[1]))["configs"]:
    for k, v in c["backends"].items():
        if "median_s" in v:
            print(sys.argv[2], c["config"], k, "median", round(v["median_s"], 4), "min", round(min(v["times_s"]), 4),
                  "decode ms", round(v["decode_ms_per_step"], 3), "floor x", round(v["median_s"] / c["floor_s"], 3),
                  "lp err", round(v.get("logprob_mean_abs_diff", -1), 5))
        else:
            print(sys.argv[2], c["config"], k, str(v)[-600:])
PY
}
case "$phase" in i|k|l|m|n|o|p|q|r) check_tree "${BASE:-.base}" ;; esac
if [ "$phase" = c ]; then  # session 3, config A: TRL, ours --keep-cache, + --compile-blocks, + --master-weights
  A="python3 bench/ppo_vs_trl.py --configs A --keep-cache --timeout 240"
  $A --systems trl ours --trl-site /tmp/site112 --work $WORK/k --out "$OUT/keep" 2>&1 | tee "$OUT/ppo_log.txt"
  $A --systems ours --compile-blocks --work $WORK/c --out "$OUT/compile" 2>&1 | tee -a "$OUT/ppo_log.txt"
  $A --systems ours --compile-blocks --master-weights --profile --work $WORK/cm --out "$OUT/compile_master" 2>&1 | tee -a "$OUT/ppo_log.txt"
  cat "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = d ]; then  # session 3, config B: TRL and ours --keep-cache --compile-blocks --master-weights (+ --offload-idle)
  B="python3 bench/ppo_vs_trl.py --configs B --keep-cache --compile-blocks --master-weights --timeout 240"
  $B --systems trl ours --trl-site /tmp/site112 --work $WORK/b --out "$OUT/b" 2>&1 | tee "$OUT/ppo_log.txt"
  $B --systems ours --offload-idle --work $WORK/bo --out "$OUT/b_offload" 2>&1 | tee -a "$OUT/ppo_log.txt"
  cat "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = f ]; then  # session 11, config B memory: 8-bit AdamW over bf16 weights (torchao, in .whl/)
  python3 bench/lowbit_check.py --out "$OUT/lowbit_check.json" 2>&1 | tail -1 | tee "$OUT/lowbit_log.txt"
  B="python3 bench/ppo_vs_trl.py --configs B --keep-cache --compile-blocks --timeout 240"
  $B --systems trl ours --optimizer adamw8bit --trl-site /tmp/site112 --work $WORK/b8 --out "$OUT/b_8bit" 2>&1 | tee "$OUT/ppo_log.txt"
  $B --systems ours --master-weights --work $WORK/bm --out "$OUT/b_master" 2>&1 | tee -a "$OUT/ppo_log.txt"
  cat "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = g ]; then  # session 13: rlhf_kit.training.lowbit.AdamW8bit (torchao's wheel in .whl/), the kept cache
  python3 bench/optimizer_step.py --config B --variants ours_compiled torchao master_fused --out "$OUT/optimizer_step.json" 2>&1 | tee "$OUT/opt_log.txt"
  python3 bench/cache_check.py --config A --out "$OUT/cache_check.json" 2>&1 | tail -1
  B="python3 bench/ppo_vs_trl.py --configs B --keep-cache --compile-blocks --timeout 240"
  $B --systems ${SYSTEMS:-ours} --optimizer adamw8bit --trl-site /tmp/site112 --work $WORK/b8 --out "$OUT/b_8bit" 2>&1 | tee "$OUT/ppo_log.txt"
  python3 bench/lowbit_check.py --out "$OUT/lowbit_check.json" 2>&1 | tail -1
  cat "$OUT"/*/*.md; rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = h ]; then  # session 13, second call: PPO config B with master weights (the default), same machine
  B="python3 bench/ppo_vs_trl.py --configs B --keep-cache --compile-blocks --timeout 240"
  $B --systems ours --master-weights --work $WORK/bm --out "$OUT/b_master" 2>&1 | tee "$OUT/ppo_log.txt"
  cat "$OUT"/*/*.md; rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = i ]; then  # session 14, one call, most important first: PPO config A (ours profiled per phase, the
  # session's starting code at BASE, a git archive, and TRL), the table-read AdamW8bit step, A at micro-batches 64
  # and 32, config B with adamw8bit, the GPU codes check
  A="python3 bench/ppo_vs_trl.py --configs A --systems ours --keep-cache --compile-blocks --master-weights --timeout 200"
  $A --micro 16 --profile --work $WORK/a16 --out "$OUT/a_micro16" 2>&1 | tee -a "$OUT/ppo_log.txt"
  python3 "${BASE:-.base}/bench/ppo_vs_trl.py" --configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 16 --timeout 200 --work $WORK/base --out "$OUT/a_base16" 2>&1 | tee -a "$OUT/ppo_log.txt"
  python3 bench/ppo_vs_trl.py --configs A --systems trl --trl-site /tmp/site112 --timeout 240 --work $WORK/t --out "$OUT/a_trl" 2>&1 | tee -a "$OUT/ppo_log.txt"
  python3 bench/optimizer_step.py --config B --variants ours_compiled torchao --out "$OUT/optimizer_step.json" 2>&1 | tee "$OUT/opt_log.txt"
  for micro in 64 32; do
    $A --micro $micro --work $WORK/a$micro --out "$OUT/a_micro$micro" 2>&1 | tee -a "$OUT/ppo_log.txt"
  done
  python3 bench/ppo_vs_trl.py --configs B --systems ours --keep-cache --compile-blocks --optimizer adamw8bit --timeout 240 --work $WORK/b8 --out "$OUT/b_8bit" 2>&1 | tee -a "$OUT/ppo_log.txt"
  python3 bench/lowbit_check.py --out "$OUT/lowbit_check.json" 2>&1 | tail -1
  cat "$OUT"/*/*.md; rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = k ]; then  # A/B of two trees in one call: this tree and $BASE (a git archive of another commit or
  # branch, e.g. git archive maskless-ppo-layout rlhf_kit bench/common.py bench/ppo_vs_trl.py | tar -x -C .base)
  for tree in . "${BASE:-.base}"; do
    name=$(tree_name "$tree")
    python3 "$tree/bench/ppo_vs_trl.py" --configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --timeout 200 --work $WORK/a_$name --out "$OUT/a64_$name" 2>&1 | grep -E "^\[ours|^\| A" | tee -a "$OUT/ppo_log.txt"
    python3 "$tree/bench/ppo_vs_trl.py" --configs B --systems ours --keep-cache --compile-blocks --optimizer adamw8bit --micro 32 --timeout 240 --work $WORK/b_$name --out "$OUT/b32_$name" 2>&1 | grep -E "^\[ours|^\| B" | tee -a "$OUT/ppo_log.txt"
  done
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = l ] || [ "$phase" = m ]; then  # session 15: the Triton decode attention
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --timeout 200"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/generation/test_decode_kernel.py tests/unit/generation/test_static_cache.py 2>&1 | tail -2
  if [ "$phase" = l ]; then
    timeout 240 python3 bench/generation.py --configs A 1B --only compiled_graphs compiled_graphs_matmul --profile --no-cudnn --warmup 1 --runs 5 --out "$OUT/gen" 2>&1 | grep -v "^\[" | tail -8
    rm -f "$OUT"/gen/*.md "$OUT"/gen/1B_*profile.txt
    trees=". ${BASE:-.base}"
  else
    timeout 120 python3 bench/decode_attention.py --out "$OUT/decode_attention.json" 2>&1 | tail -6
    trees="${BASE:-.base} ."
  fi
  ppo_a_trees $trees
  [ "$phase" = l ] && python3 bench/ppo_vs_trl.py --configs B --systems ours --keep-cache --compile-blocks --optimizer adamw8bit --micro 32 --timeout 240 --work $WORK/b_this --out "$OUT/b32_this" 2>&1 | grep -E "^\| B" | tee -a "$OUT/ppo_log.txt"
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = n ]; then  # session 16, one call, each part under its own time limit
  timeout 150 python3 bench/decode_attention.py --out "$OUT/decode_attention.json" 2>&1 | tail -6
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --timeout 200"
  ppo_a_trees "${BASE:-.base}" .
  python3 bench/ppo_vs_trl.py --configs A --systems trl --trl-site /tmp/site112 --timeout 200 --work $WORK/t --out "$OUT/a_trl" 2>&1 | grep -E "^\| A" | tee -a "$OUT/ppo_log.txt"
  timeout ${GEN_S:-150} python3 bench/generation.py --configs A 1B --only compiled_graphs compiled_graphs_autotune --no-cudnn --warmup 1 --runs 5 --out "$OUT/gen" 2>&1 | grep -v "^\[" | tail -8
  rm -f "$OUT"/*/*.md "$OUT"/gen/*profile.txt; exit 0
fi
if [ "$phase" = o ]; then  # session 16, second call
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/generation/test_decode_kernel.py tests/unit/generation/test_static_cache.py tests/unit/generation/test_backends.py 2>&1 | tail -3
  timeout 220 python3 bench/generation.py --configs A 1B --only compiled_graphs compiled_graphs_eager_prefill compiled_graphs_matmul compiled_graphs_kernel_config --kernel-config "${KCFG:-{\"MODE\": \"native\"\}}" --no-cudnn --warmup 1 --runs 5 --out "$OUT/gen" 2>&1 | grep -v "^\[" | tail -10
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --profile --timeout 150"
  ppo_a_trees . "${BASE:-.base}"
  timeout 120 python3 bench/decode_attention.py --out "$OUT/decode_attention.json" 2>&1 | tail -6
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = p ]; then  # session 16, third call
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/generation/test_decode_kernel.py tests/unit/generation/test_static_cache.py tests/unit/generation/test_backends.py 2>&1 | tail -4
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --timeout 150"
  ppo_a_trees "${BASE:-.base}" .
  python3 bench/ppo_vs_trl.py --configs A --systems trl --trl-site /tmp/site112 --timeout 150 --work $WORK/t --out "$OUT/a_trl" 2>&1 | grep -E "^\| A" | tee -a "$OUT/ppo_log.txt"
  timeout 120 python3 bench/generation.py --configs A 1B --only compiled_graphs compiled_graphs_matmul --no-cudnn --warmup 1 --runs 5 --out "$OUT/gen" 2>&1 | grep -v "^\[" | tail -6
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = q ]; then  # the old log-probs from the sampler, and a second tree
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --timeout 150"
  B="--configs B --systems ours --keep-cache --compile-blocks --optimizer adamw8bit --micro 32 --timeout 200"
  for cfg in A B; do
    args=$([ $cfg = A ] && echo "$A" || echo "$B")
    for lp in recompute sampler; do
      python3 bench/ppo_vs_trl.py $args --old-logprobs $lp --work $WORK/${cfg}_$lp --out "$OUT/${cfg}_$lp" 2>&1 | grep -E "^\| $cfg" | tee -a "$OUT/ppo_log.txt"
    done
    python3 "${BASE:-.base}/bench/ppo_vs_trl.py" $args --work $WORK/${cfg}_base --out "$OUT/${cfg}_base" 2>&1 | grep -E "^\| $cfg" | tee -a "$OUT/ppo_log.txt"
  done
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = r ]; then  # session 17: the decode kernel reading no left padding and rotating q/k itself
  # (this tree against $BASE2, the commit before it), the maskless branch ($BASE), --old-logprobs sampler
  check_tree "${BASE2:-.base4}"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/generation/test_decode_kernel.py tests/unit/generation/test_fused.py tests/unit/generation/test_static_cache.py tests/unit/generation/test_backends.py 2>&1 | tail -4
  for tree in "${BASE2:-.base4}" .; do
    timeout 150 python3 "$tree/bench/generation.py" --configs A 1B --only compiled_graphs --no-cudnn --warmup 1 --runs 5 --out "$OUT/gen_$(tree_name "$tree")" 2>&1 | grep -v "^\[" | tail -4
  done
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --timeout 150"
  ppo_a_trees "${BASE2:-.base4}" "${BASE:-.base}" .
  python3 bench/ppo_vs_trl.py $A --old-logprobs sampler --work $WORK/a_sampler --out "$OUT/a64_sampler" 2>&1 | grep -E "^\| A" | tee -a "$OUT/ppo_log.txt"
  B="--configs B --systems ours --keep-cache --compile-blocks --optimizer adamw8bit --micro 32 --timeout 150"
  for tree in . "${BASE:-.base}"; do
    python3 "$tree/bench/ppo_vs_trl.py" $B --work $WORK/b_$(tree_name "$tree") --out "$OUT/b32_$(tree_name "$tree")" 2>&1 | grep -E "^\| B" | tee -a "$OUT/ppo_log.txt"
  done
  rm -f "$OUT"/*/*.md; (cd "$OUT" && tar czf results.tgz */ && rm -rf -- */); exit 0
fi
if [ "$phase" = s ]; then  # session 17, second call: the merged tree (decode kernel + maskless layout)
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --timeout 150"
  python3 bench/ppo_vs_trl.py $A --profile --work $WORK/a --out "$OUT/a64_this" 2>&1 | grep -E "^\| A" | tee -a "$OUT/ppo_log.txt"
  python3 bench/ppo_vs_trl.py $A --old-logprobs sampler --work $WORK/as --out "$OUT/a64_sampler" 2>&1 | grep -E "^\| A" | tee -a "$OUT/ppo_log.txt"
  python3 bench/ppo_vs_trl.py --configs A --systems trl --trl-site /tmp/site112 --timeout 150 --work $WORK/t --out "$OUT/a_trl" 2>&1 | grep -E "^\| A" | tee -a "$OUT/ppo_log.txt"
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = t ]; then  # PPO config B: ours (8-bit AdamW, micro 32), then TRL 1.12 at its micro-batch of 16
  # (--micro applies to both systems: TRL at 32 ran out of the H100's 80 GB in session 17)
  python3 bench/ppo_vs_trl.py --configs B --systems ours --keep-cache --compile-blocks --optimizer adamw8bit --micro 32 --timeout 200 --work $WORK/b --out "$OUT/b32" 2>&1 | grep -E "^\| B" | tee -a "$OUT/ppo_log.txt"
  python3 bench/ppo_vs_trl.py --configs B --systems trl --trl-site /tmp/site112 --timeout 200 --work $WORK/bt --out "$OUT/b_trl" 2>&1 | grep -E "^\| B" | tee -a "$OUT/ppo_log.txt"
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = v ]; then  # session 18: warm start with a bytecode cache (cold, warm, warm profiled to step 1), the
  # import times, then generation A and 1B (profiled) of this tree and .edges (the branch decode-edges-compiled)
  export PYTHONPYCACHEPREFIX=/tmp/pycache   # the lent machine sets PYTHONDONTWRITEBYTECODE=1; a user's does not
  unset PYTHONDONTWRITEBYTECODE
  OUT=$OUT/ws RUNS="auto_cold auto_warm auto_prof" timeout 330 bash bench/warm_start_gpu.sh > $OUT/ws_log.txt 2>&1
  tail -8 $OUT/ws_log.txt
  python3 -X importtime -c "import recipes.ppo" 2> $OUT/importtime.txt
  check_tree .edges
  for tree in . .edges; do
    timeout 150 python3 "$tree/bench/generation.py" --configs A 1B --only compiled_graphs --no-cudnn --warmup 1 --runs 5 \
      --profile --out "$OUT/gen_$(tree_name "$tree")" 2>&1 | grep -v "^\[" | tail -4
  done
  (cd "$OUT" && tar czf results.tgz * && find . -mindepth 1 ! -name results.tgz -delete); exit 0
fi
if [ "$phase" = w ]; then  # session 18, second call: warm start of .base5w (a full archive of main before the session,
  # df3b39f) and this tree, each with its own Inductor cache; then PPO A of this tree and TRL 1.12
  export PYTHONPYCACHEPREFIX=/tmp/pycache; unset PYTHONDONTWRITEBYTECODE   # as on a user's machine
  (cd .base5w && sed -i 's|W=/tmp/ws;|W=/tmp/ws_base;|' bench/warm_start_gpu.sh && ln -sfn ../.whl .whl &&
    OUT=$OUT/ws_base RUNS="auto_cold auto_warm" timeout 200 bash bench/warm_start_gpu.sh > $OUT/ws_base_log.txt 2>&1)
  OUT=$OUT/ws RUNS="auto_cold auto_warm" timeout 200 bash bench/warm_start_gpu.sh > $OUT/ws_log.txt 2>&1
  tail -5 $OUT/ws_base_log.txt; tail -5 $OUT/ws_log.txt
  (cd "$OUT" && tar czf results.tgz *)
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --timeout 120"
  ppo_a_trees .
  timeout 150 python3 bench/ppo_vs_trl.py --configs A --systems trl --trl-site /tmp/site112 --timeout 140 --work $WORK/t \
    --out "$OUT/a_trl" 2>&1 | grep -E "^\| A" | tee -a "$OUT/ppo_log.txt"
  (cd "$OUT" && rm -f results.tgz && tar czf results.tgz * && find . -mindepth 1 ! -name results.tgz -delete); exit 0
fi
if [ "$phase" = x ]; then  # SmolLM2-135M-Instruct from the joined GGUF; 7 PPO steps (step 6 profiled) with padded, then
  # packed score and train passes (the reward model and critic: the instruct model with a fresh score head), for the
  # phase times, peak memory and the step-1 KL. Two calls on one warm machine: carry .whl .whl112 .gguf/part_aa
  # (stored), then .whl .whl112 .gguf/part_ab
  R=/tmp/real; mkdir -p $R; cp .gguf/part_a* $R/
  if [ ! -d $R/smollm2 ] && ! { [ -f $R/part_aa ] && [ -f $R/part_ab ]; }; then
    echo "stored: $(ls $R | tr '\n' ' '); carry the other GGUF part in the next call"; exit 0
  fi
  if [ ! -d $R/smollm2 ]; then
    cat $R/part_aa $R/part_ab > $R/smol.gguf && md5sum $R/smol.gguf   # a1231443440b107ff29f02bdb38c9d0a
    python3 bench/gguf_to_hf.py $R/smol.gguf $R/smollm2 2>&1 | tail -1
  fi
  python3 recipes/download_and_process.py --source default --format messages --output-dir $R/data > /dev/null
  for name in padded packed; do
    flag="--packed-passes $([ $name = padded ] && echo off || echo on)"
    timeout 150 python3 recipes/ppo.py --actor $R/smollm2 --reward-model $R/smollm2 $flag \
      --train-prompts $R/data/train_prompts.jsonl --val-prompts $R/data/test_prompts.jsonl --output-dir $R/ppo_${name}_$$ \
      --max-steps 7 --num-rollout-samples 64 --rollout-micro-batch-size 64 --global-batch-size 16 --micro-batch-size 16 \
      --max-new-tokens 128 --val-check-interval 1000 --save-interval 100000 --profile-steps 6 \
      > $OUT/ppo_$name.log 2>&1; echo "$name rc=$?"
    cp $R/ppo_${name}_$$/metrics.jsonl $OUT/ppo_${name}_metrics.jsonl
    cp $R/ppo_${name}_$$/profile/step_6.json $OUT/ppo_${name}_profile6.json  # the split of step 6: busy, top ops
    cp $R/ppo_${name}_$$/profile/step_6.txt $OUT/ppo_${name}_profile6.txt
    python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[1], 'wall', round(d['wall_s'], 3), 'busy', round(d['busy_s'], 3), [(t['op'][:40], round(t['s'], 4), t['calls']) for t in d['top'][:10]])" $OUT/ppo_${name}_profile6.json
    python3 - $OUT/ppo_${name}_metrics.jsonl <<'PY'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    if "time/generate" in r:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()
               if k == "step" or k.startswith(("kl/", "time/", "memory/", "compile/", "reward/", "policy/loss", "value/loss"))})
PY
  done
  (cd "$OUT" && tar czf results.tgz * && find . -mindepth 1 ! -name results.tgz -delete); exit 0
fi
if [ "$phase" = x2 ]; then  # session 21, after stage x on the same warm machine (its /tmp/real): the reward-model
  # recipe on SmolLM2-135M-Instruct, packed (varlen) then padded passes, one epoch each at the recipe's defaults plus
  # --compile-blocks; pairs/s per step, peak memory, test accuracy
  R=/tmp/real; [ -d $R/smollm2 ] || { echo "no /tmp/real/smollm2: run stage x first on this machine"; exit 1; }
  for name in packed padded; do
    flag="--packed-passes $([ $name = padded ] && echo off || echo on)"
    timeout 200 python3 recipes/reward_model.py --model $R/smollm2 $flag --compile-blocks --epochs 1 \
      --train-data $R/data/train_comparisons.jsonl --test-data $R/data/test_comparisons.jsonl \
      --output-dir $R/rm_${name}_$$ > $OUT/rm_$name.log 2>&1; echo "$name rc=$?"
    cp $R/rm_${name}_$$/metrics.jsonl $OUT/rm_${name}_metrics.jsonl
    python3 - $OUT/rm_${name}_metrics.jsonl <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if "throughput/pairs_per_s" in r]
late = [r["throughput/pairs_per_s"] for r in steps[len(steps) // 2:]]
print(len(steps), "steps; pairs/s median of the second half", round(statistics.median(late), 1),
      "first step s", round(steps[0]["time/step_s"], 2))
print([{k: v for k, v in r.items() if "test" in k or "memory" in k} for r in rows if any("test" in k for k in r)][-1:])
print({k: v for k, v in steps[-1].items() if "memory" in k})
print("compile frames per step", [r.get("compile/frames") for r in steps])
PY
  done
  (cd "$OUT" && tar czf results.tgz * && find . -mindepth 1 ! -name results.tgz -delete); exit 0
fi
if [ "$phase" = s24 ]; then  # session 24, call 1: the decode kernel split over the slots (CONFIG["SPLITS"]): its GPU
  # tests, the kernel alone at each setting, then generation A and 1B with 1 (the default), 2, 4 and 8 splits, twice.
  # The split lost and was reverted: s24 and s24b run on a checkout of commit 00cb91e (kernel, tests and bench of then)
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/generation/test_decode_kernel.py 2>&1 | tail -3
  timeout 200 python3 bench/decode_attention.py --modes native --splits 1 2 4 8 --blocks 32 64 --pos 128 192 255 \
    --out "$OUT/decode_attention.json" 2>&1 | tail -8
  K=('{"SPLITS": 2}' '{"SPLITS": 4}' '{"SPLITS": 4, "BLOCK_N": 32}' '{"SPLITS": 8, "BLOCK_N": 32}')
  V="compiled_graphs compiled_graphs_kernel_config compiled_graphs_kernel_config1 compiled_graphs_kernel_config2 compiled_graphs_kernel_config3"
  for round in 1 2; do
    timeout 200 python3 bench/generation.py --configs A 1B --only $V --kernel-config "${K[@]}" --no-cudnn --warmup 1 \
      --runs 5 --out "$OUT/gen$round" 2>&1 | grep -E "median|FAILED" | sed "s/^/round $round /"
  done
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s24b ]; then  # session 24, call 2: the split kernel at small batches (8 and 16 rows), PPO A (micro 64)
  # at the defaults and TRL A in the same call, then stage s23r (the recipe with its defaults on the GPU)
  for b in 8 16; do
    timeout 120 python3 bench/decode_attention.py --batch $b --modes native --splits 1 2 4 8 --blocks 64 --pos 192 255 \
      --out "$OUT/decode_attention_b$b.json" 2>&1 | grep -E "^g=" | sed "s/^/batch $b /"
  done
  A="--configs A --keep-cache --compile-blocks --master-weights --micro 64 --steps 8 --timeout 150"
  python3 bench/ppo_vs_trl.py $A --systems ours --work $WORK/a_def --out "$OUT/a64_ours" 2>&1 | grep -E "^\| A"
  python3 bench/ppo_vs_trl.py $A --systems trl --trl-site /tmp/site112 --work $WORK/a_trl --out "$OUT/a64_trl" 2>&1 | grep -E "^\| A"
  ours_summary "$OUT" steps
  OUT=$OUT/s23r MMS=0.8 SYNC=${SYNC:-0} bash bench/vs_trl_gpu.sh s23r
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s24c ]; then  # session 24, call 3: PPO A (micro 64: the rollout is one micro-batch) scoring first against
  # --score-in-update (the update's forward scores it), alternating, twice each
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --steps 8 --timeout 150"
  for run in ${RUNS:-first_1 inupd_1 first_2 inupd_2}; do
    flag=$([ "${run%_*}" = inupd ] && echo --score-in-update)
    python3 bench/ppo_vs_trl.py $A $flag --work $WORK/a_$run --out "$OUT/a64_$run" 2>&1 | grep -E "^\| A" | sed "s/^/$run /"
  done
  ours_summary "$OUT" steps
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s26 ]; then  # session 26: where the host spends PPO A's score and train phases (micro 64,
  # --score-in-update): one step under torch.profiler (device-busy time per phase), then 4 under cProfile
  python3 bench/ppo_vs_trl.py --configs A --keep-cache --compile-blocks --master-weights --micro 64 --score-in-update \
    --steps 8 --profile --cprofile 4 --timeout 200 --systems ours --work $WORK/a_prof --out "$OUT/a64_prof" 2>&1 | grep -E "^\| A"
  python3 - "$OUT/a64_prof/ppo_vs_trl.json" <<'PY'
import json, sys
o = json.load(open(sys.argv[1]))["configs"][0]["ours"]
if o.get("error"):
    sys.exit(o["error"][-2000:])
p = o["profile"]
print("profiled step", round(p["step_s"], 4), {k: round(v, 4) for k, v in p["phases_s"].items()}, "device busy", round(p["device_busy_s"], 4))
for name, ph in p["phases"].items():
    print(" ", name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ph.items() if k != "top_kernels"})
c = o["cprofile"]
print("cProfile steps", [{k: round(v, 4) for k, v in x.items()} for x in c["phases_s"]])
print("\n".join(c["tottime"][:40]))
print("\n".join(c["cumulative"][:60]))
PY
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s26b ]; then  # session 26: this tree (GAE as one product per 256 positions; scoring's statistics
  # read with the update's, not between its forward and backward) against $BASE (.base26 = main before it), PPO A
  # (micro 64, --score-in-update), alternating, each with a host-wait report; then TRL 1.12 in the same call
  check_tree "${BASE:-.base26}"
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --score-in-update --steps 16 --sync-report --timeout 150"
  for run in ${RUNS:-base_1 this_1 base_2 this_2 base_3 this_3}; do
    tree=$([ "${run%_*}" = base ] && echo "${BASE:-.base26}" || echo .)
    extra=$([ "${run%_*}" = nofuse ] && echo "--fused-logprobs off")  # session 30: this tree, log-probs unfused
    python3 "$tree/bench/ppo_vs_trl.py" $A $extra --work $WORK/a_$run --out "$OUT/a64_$run" 2>&1 | grep -E "^\| A \| ours \|" | sed "s/^/$run /"
  done
  [ "${TRL:-1}" = 1 ] && python3 bench/ppo_vs_trl.py --configs A --systems trl --trl-site /tmp/site112 --micro 64 --steps 8 --timeout 150 --work $WORK/a_trl --out "$OUT/a64_trl" 2>&1 | grep -E "^\| A" | sed "s/^/trl /"
  ppo_summary "a64_*"
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s28 ]; then  # session 28: 1) generation A and 1B: the defaults (each block's last residual add
  # deferred into the next block's first norm) against the same without the deferral, in one process; and, in
  # the pdl processes, with programmatic dependent launch (TORCHINDUCTOR_ENABLE_PDL=1 for Inductor's kernels, the
  # decode kernel's "PDL" setting for ours); 2) PPO A (--score-in-update), this tree (the deferral, session 27's
  # gradient fold and one-copy weight update) against $BASE (.base28 = 4b749e1, before them), alternating
  check_tree "${BASE:-.base28}"
  python3 -c "import torch._inductor.config as c, triton; print('inductor enable_pdl available:', hasattr(c.triton, 'enable_pdl'), 'triton', triton.__version__)"
  for run in ${GENRUNS:-off_1 pdl_1 off_2}; do
    if [ "${run%_*}" = pdl ]; then
      V="compiled_graphs compiled_graphs_kernel_config"; P=1
    else
      V="compiled_graphs compiled_graphs_nodefer"; P=0
    fi
    TORCHINDUCTOR_ENABLE_PDL=$P timeout 170 python3 bench/generation.py --configs ${GEN:-A 1B} --only $V \
      --kernel-config '{"PDL": true}' --no-cudnn --warmup 1 --runs 5 --out "$OUT/gen_$run" > "$OUT/gen_$run.log" 2>&1
    echo "gen $run rc=$?"
    gen_summary "$OUT/gen_$run/generation.json" "$run"
  done
  RUNS=${RUNS:-base_1 this_1 base_2 this_2} TRL=${TRL:-0} BASE=${BASE:-.base28} bash "$0" s26b 2>&1 | grep -E "^(base|this|trl)_?|median"
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s30c ]; then  # session 30, at b0475b9 (the setting was reverted after this stage measured it slower):
  # the decode kernel with its first block of cached keys and values loaded
  # before the PDL wait (CONFIG PREFETCH), against the defaults (no PDL) and PDL alone: the kernel's GPU tests, then
  # generation A and 1B, the three in one process (carry .whl .whl112)
  timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short tests/unit/generation/test_decode_kernel.py 2>&1 | grep -E "Error|^E |passed|failed" | tail -8
  timeout 330 python3 bench/generation.py --configs ${GEN:-A 1B} --only compiled_graphs compiled_graphs_kernel_config \
    compiled_graphs_kernel_config1 --kernel-config '{"PDL": true, "PREFETCH": true}' '{"PDL": true}' --no-cudnn \
    --warmup 1 --runs 5 --out "$OUT/gen" > "$OUT/gen.log" 2>&1
  echo "gen rc=$?"
  gen_summary "$OUT/gen/generation.json" gen
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s34 ]; then  # session 34: FP8 products in the backward pass (the forward unchanged) against bf16, ours
  # alone, the three settings alternating per config; the train phase's MFU is still against the bf16 matmul rate
  [ "${GAPS:-0}" = 1 ] && GAP_RUNS=a WS=0 bash "$0" s31
  for cfg in ${CONFIGS:-B A}; do
    base="--configs B --keep-cache --compile-blocks --optimizer adamw8bit --micro 32"
    [ "$cfg" = A ] && base="--configs A --keep-cache --compile-blocks --master-weights --micro 64 --score-in-update"
    for i in $(seq 1 ${PAIRS:-1}); do
      for mode in off weights all; do
        python3 bench/ppo_vs_trl.py $base --systems ours --fp8-backward $mode --steps 8 --timeout 200 --work $WORK/f_$cfg \
          --out "$OUT/f${cfg}_${mode}_$i" 2>&1 | grep -E "^\| [AB] \| ours" | sed "s/^/${cfg}_${mode}_$i /"
      done
    done
    ppo_summary "f${cfg}_*"
  done
  if [ "${TRL:-0}" = 1 ]; then
    python3 bench/ppo_vs_trl.py --configs B --systems trl --trl-site /tmp/site112 --timeout 200 --work $WORK/bt \
      --out "$OUT/b_trl" 2>&1 | grep -E "^\| B"
  fi
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s32 ]; then  # session 32: PPO A (--score-in-update) with the blocks compiled dynamic from the start
  # (--compile-dynamic: no recompilation when step 2 brings a new packed length) against the default (first static,
  # then recompiled dynamic at step 2), alternating, PAIRS (default 2) pairs; step 1's time holds the recompilation
  # GAPS=1 first runs stage s31 on config A alone, without the warm start (about 150 s more): one machine start, both answers
  [ "${GAPS:-0}" = 1 ] && GAP_RUNS=a WS=0 bash "$0" s31
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --score-in-update --steps 12 --timeout 200"
  for i in $(seq 1 ${PAIRS:-2}); do
    for run in static dyn; do
      extra=$([ $run = dyn ] && echo --compile-dynamic)
      python3 bench/ppo_vs_trl.py $A $extra --work $WORK/a_$run --out "$OUT/a64_${run}_$i" 2>&1 | grep -E "^\| A \| ours \|" | sed "s/^/${run}_$i /"
    done
  done
  ppo_summary "a64_*"
  python3 - "$OUT" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "a64_*", "ppo_vs_trl.json"))):
    o = json.load(open(f))["configs"][0]["ours"]
    print(os.path.basename(os.path.dirname(f)), "compiled frames per step", [s.get("compile", {}).get("frames") for s in o.get("steps", [])])
PY
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s31 ]; then  # session 31: where the device waits. PPO A (--score-in-update) and B (8-bit, micro 32),
  # ours, each with one step profiled plainly and one with Python stacks (--profile --trace-gaps: the idle gaps of each
  # phase charged to the host's stacks, bench/trace_gaps.py); WS=1 adds the recipe's warm start (auto_cold, auto_warm)
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --score-in-update --steps 8 --timeout 240"
  B="--configs B --systems ours --keep-cache --compile-blocks --optimizer adamw8bit --micro 32 --steps 6 --timeout 240"
  for run in ${GAP_RUNS:-a b}; do
    args=$([ $run = a ] && echo "$A" || echo "$B")
    python3 bench/ppo_vs_trl.py $args --profile --trace-gaps --work $WORK/g_$run --out "$OUT/gaps_$run" 2>&1 | grep -E "^\| [AB] \| ours \|" | sed "s/^/$run /"
    python3 - "$OUT/gaps_$run/ppo_vs_trl.json" <<'PY'
import json, sys
o = json.load(open(sys.argv[1]))["configs"][0]["ours"]
if o.get("error"):  # the timed steps and the passes before the failing one may still be there
    print(o["error"], "during", o.get("pending"), o.get("log_tail", "")[-800:])
if "median_step_s" not in o:
    sys.exit()
print("median", round(o["median_step_s"], 4), o["median_phases_s"])
for key in ("profile", "trace_gaps"):
    g = o.get(key, {}).get("gaps")
    if not g:
        continue
    print(key, "step", round(o[key]["step_s"], 4))
    for ph, v in g["phases"].items():
        print("  ", ph, {k: v[k] for k in ("wall_us", "busy_us", "host_us", "queued_us", "tail_us", "gaps", "gaps_ge_min")})
    for name in ("host_stacks", "host_ops", "queued_stacks", "largest"):
        print("  ", name)
        for row in g[name][:12 if key == "profile" else 25]:
            print("     ", row)
PY
  done
  if [ "${WS:-1}" = 1 ]; then
    RUNS="auto_cold auto_warm" OUT=$OUT/ws bash bench/warm_start_gpu.sh 2>&1 | grep -E "^\|" | head -8
  fi
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s30b ]; then  # session 30: 1) the GPU cases of test_varlen.py (the packed passes call aten's flash
  # forward directly, not varlen_attn), test_logprobs.py (compiled log-probs on CUDA); 2) PPO A (--score-in-update) of this tree against $BASE (.base30 = 95521a5,
  # through varlen_attn) and this tree with the log-probs unfused (nofuse), alternating, then TRL 1.12 A; 3) PROF=1: stage s26 (profile, cProfile) on this tree
  check_tree "${BASE:-.base30}"
  timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/unit/models/test_varlen.py tests/unit/test_logprobs.py tests/unit/test_ppo_score_in_update.py 2>&1 | grep -E "Error|^E |passed|failed" | tail -8
  RUNS=${RUNS:-this_1 base_1 nofuse_1 this_2 base_2} TRL=${TRL:-1} BASE=${BASE:-.base30} bash "$0" s26b 2>&1 | grep -E "^(base|this|trl)_?|median"
  if [ "${PROF:-1}" = 1 ]; then
    bash "$0" s26 2>&1 | grep -v "^torch \|^name,\|^NVIDIA"
    python3 -c "import json; print('\n'.join(json.load(open('$OUT/a64_prof/ppo_vs_trl.json'))['configs'][0]['ours']['cprofile'].get('named_modules_callers', [])[:40]))"
  fi
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s30 ]; then  # written in session 29 for the next call: PPO A (--score-in-update) at the defaults and TRL
  # 1.12 A, alternating, PAIRS (default 3) pairs in one call (about 140 s a pair), so the ratio's spread is measured
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --score-in-update --steps 16 --sync-report --timeout 150"
  for i in $(seq 1 ${PAIRS:-3}); do
    python3 bench/ppo_vs_trl.py $A --work $WORK/a_this_$i --out "$OUT/a64_this_$i" 2>&1 | grep -E "^\| A \| ours \|" | sed "s/^/this_$i /"
    python3 bench/ppo_vs_trl.py --configs A --systems trl --trl-site /tmp/site112 --micro 64 --steps 8 --timeout 150 --work $WORK/a_trl_$i --out "$OUT/a64_trl_$i" 2>&1 | grep -E "^\| A" | sed "s/^/trl_$i /"
  done
  ppo_summary "a64_this_*"
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s29b ]; then  # session 29, calls 2 and 3 (PPO_RUNS=this): PPO A (--score-in-update) at the defaults,
  # then TRL 1.12 A in the same call. PPO_RUNS="this chains" adds two decode chains; "gemm" (the decode-GEMM kernel at
  # $GEMM's settings, JSON over decode_gemm.CONFIG) runs only on the branch decode-gemm, where that kernel lives
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --score-in-update --steps 16 --sync-report --timeout 150"
  for run in ${PPO_RUNS:-this}; do
    extra=$(case $run in gemm*) echo --decode-gemm --gemm-config "${GEMM:-{\}}" ;; chains*) echo --decode-chains 2 ;; esac)
    python3 bench/ppo_vs_trl.py $A $extra --work $WORK/a_$run --out "$OUT/a64_$run" 2>&1 | grep -E "^\| A \| ours \|" | sed "s/^/$run /"
  done
  [ "${TRL:-1}" = 1 ] && python3 bench/ppo_vs_trl.py --configs A --systems trl --trl-site /tmp/site112 --micro 64 --steps 8 --timeout 150 --work $WORK/a_trl --out "$OUT/a64_trl" 2>&1 | grep -E "^\| A" | sed "s/^/trl /"
  ppo_summary "a64_*"
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s29 ]; then  # session 29, first call (on the branch decode-gemm only: its kernel, tests and bench are
  # not on main): 0) the GPU cases of the decode-GEMM tests; 1) the decode-GEMM
  # kernel alone against cuBLAS on A's and 1B's four projections, a sweep of its settings (bench/decode_gemm.py);
  # 2) generation A and 1B in one process: the defaults, the kernel at its defaults, the sweep's best settings for
  # A and for 1B, two decode chains
  [ "${TESTS:-1}" = 1 ] && timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/unit/generation/test_decode_gemm.py \
    tests/unit/generation/test_fused.py 2>&1 | grep -E "Error|^E |passed|failed" | tail -20
  timeout 170 python3 bench/decode_gemm.py --replays 20 --out "$OUT/decode_gemm.json" 2>&1 | grep -v "^\[" | tail -12
  BEST=$(python3 - "$OUT/decode_gemm.json" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["variant"] == "triton" and "us" in r]
keys = ("BN", "KC", "WAVES", "num_warps", "num_stages", "PDL")
for config in ("A", "1B"):
    total = {}
    for r in rows:
        if r["shape"].startswith(config + "/"):
            k = tuple(r[x] for x in keys); total.setdefault(k, []).append(r["us"])
    best = min((v for v in total.items() if len(v[1]) == 4), key=lambda v: sum(v[1]), default=None)
    print(json.dumps(dict(zip(keys, best[0])) if best else {}).replace(" ", ""), end=" ")
PY
)
  [ -n "$BEST" ] || BEST="{} {}"
  echo "best settings (A, 1B): $BEST"
  timeout 260 python3 bench/generation.py --configs ${GEN:-A 1B} --only compiled_graphs compiled_graphs_gemm \
    compiled_graphs_gemm_config compiled_graphs_gemm_config1 ${CHAINS:-compiled_graphs_chains2} --gemm-config $BEST \
    --no-cudnn --warmup 1 --runs 5 --out "$OUT/gen" > "$OUT/gen.log" 2>&1
  echo "gen rc=$?"
  gen_summary "$OUT/gen/generation.json" gen
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s28c ]; then  # session 28, third call: 1) generation A and 1B, the defaults against two decode
  # chains on two streams (decode_chains=2; CHAINS="compiled_graphs_chains2 compiled_graphs_chains4" adds four), one process; 2) PPO A (--score-in-update), this tree's defaults
  # (Inductor's PDL in generation and, through dependent_launch, in the scoring and training blocks), then with
  # --decode-chains 2; 3) TRL 1.12 A in the same call
  timeout 200 python3 bench/generation.py --configs ${GEN:-A 1B} --only compiled_graphs ${CHAINS:-compiled_graphs_chains2} \
    --no-cudnn --warmup 1 --runs 5 --out "$OUT/gen" > "$OUT/gen.log" 2>&1
  echo "gen rc=$?"
  gen_summary "$OUT/gen/generation.json" gen
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --score-in-update --steps 16 --sync-report --timeout 150"
  for run in ${PPO_RUNS:-this chains}; do
    python3 bench/ppo_vs_trl.py $A $([ $run = chains ] && echo --decode-chains 2) --work $WORK/a_$run --out "$OUT/a64_$run" \
      2>&1 | grep -E "^\| A \| ours \|" | sed "s/^/$run /"
  done
  [ "${TRL:-1}" = 1 ] && python3 bench/ppo_vs_trl.py --configs A --systems trl --trl-site /tmp/site112 --micro 64 --steps 8 --timeout 150 --work $WORK/a_trl --out "$OUT/a64_trl" 2>&1 | grep -E "^\| A" | sed "s/^/trl /"
  ppo_summary "a64_*"
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s28b ]; then  # session 28, second call: 0) the GPU cases of the new tests; 1) generation A and 1B,
  # the defaults (Inductor's PDL now on in the backend's compile on Hopper) against the same without PDL and with
  # two decode chains on two streams, in one process (GENRUNS="1 2": twice), the first profiled; 2) PPO A (--score-in-update), this tree against this tree with TORCHINDUCTOR_ENABLE_PDL=1 (PDL in the training
  # and scoring blocks too), alternating
  timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=short tests/unit/generation/test_decode_step.py \
    tests/unit/generation/test_deferred.py tests/unit/generation/test_decode_kernel.py 2>&1 | grep -E "Error|^E |passed|failed" | tail -20
  for run in ${GENRUNS:-1}; do
    timeout 200 python3 bench/generation.py --configs ${GEN:-A 1B} --only compiled_graphs compiled_graphs_nopdl compiled_graphs_chains2 \
      $([ "$run" = 1 ] && echo --profile) --no-cudnn --warmup 1 --runs 5 --out "$OUT/gen_$run" > "$OUT/gen_$run.log" 2>&1
    echo "gen $run rc=$?"
    gen_summary "$OUT/gen_$run/generation.json" "gen_$run"
  done
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --score-in-update --steps 16 --sync-report --timeout 150"
  for run in ${RUNS:-this_1 pdl_1 this_2 pdl_2}; do
    TORCHINDUCTOR_ENABLE_PDL=$([ "${run%_*}" = pdl ] && echo 1 || echo 0) python3 bench/ppo_vs_trl.py $A --work $WORK/a_$run \
      --out "$OUT/a64_$run" 2>&1 | grep -E "^\| A \| ours \|" | sed "s/^/$run /"
  done
  ppo_summary "a64_*"
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s27 ]; then  # written in session 26 for the next call: what it built after its last device call.
  # 1) the CUDA paths of its tests (discounted_cumsum in float64, batch_to_device under sync-debug "error", the
  # Averager); 2) the reward-model recipe's embedded default (a host-bound tiny model: where the waits cost most),
  # this tree against $BASE (.base27 = git archive a0df768 rlhf_kit recipes bench: before the pinned copies and the
  # one read per step), alternating, time/step_s per step; 3) PPO A (--score-in-update), this tree against .base26
  # (before the module walks were made cheap), alternating
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/test_advantages.py tests/unit/models/test_transfer.py \
    tests/unit/training/test_metrics.py tests/unit/models/test_varlen.py 2>&1 | tail -3
  for run in ${RMRUNS:-base_1 this_1 base_2 this_2}; do
    tree=$([ "${run%_*}" = base ] && echo "${BASE:-.base27}" || echo .)
    PYTHONPATH=/tmp/site:$(cd "$tree" && pwd) timeout 200 python3 "$tree/recipes/reward_model.py" --output-dir $WORK/rm_$run \
      --max-steps ${RMSTEPS:-40} --val-check-interval 1000 --save-interval 1000 > "$OUT/rm_$run.log" 2>&1
    echo "rm $run rc=$?"
    python3 - "$WORK/rm_$run/metrics.jsonl" <<'PY'
import json, statistics, sys
t = [r["time/step_s"] for r in map(json.loads, open(sys.argv[1])) if "time/step_s" in r][5:]
print("   median step s", round(statistics.median(t), 5), "min", round(min(t), 5), "steps", len(t))
PY
  done
  RUNS=${RUNS:-base_1 this_1 base_2 this_2} TRL=0 BASE=.base26 bash "$0" s26b 2>&1 | grep -E "^(base|this)_|median"
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s23r ]; then  # session 23: recipes/ppo.py itself on the GPU (embedded tiny default, 64 prompts x 64
  # new tokens, one mini-batch, micro-batches of 4): --micro-batch-memory 0.8 (the default) against 0, then
  # MemoryBudget on a real CUDA forward and backward (bytes per token; the peak kept across its reset)
  export PYTHONPATH=/tmp/site:$PWD
  for mm in ${MMS:-0.8 0}; do  # MMS=0.8: the default only
    python3 recipes/ppo.py --output-dir $WORK/ppo_$mm --max-steps 6 --num-rollout-samples 64 --global-batch-size 64 \
      --max-new-tokens 64 --micro-batch-memory $mm --val-check-interval 6 --save-interval 6 > "$OUT/recipe_$mm.log" 2>&1
    echo "recipe --micro-batch-memory $mm: rc=$?"; tail -3 "$OUT/recipe_$mm.log"
    python3 - "$WORK/ppo_$mm/metrics.jsonl" <<'PY'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    if "time/train" in r:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k.split("/")[0] in
               ("step", "time", "batch", "memory") or k in ("step", "value/loss", "policy/loss")})
PY
  done
  python3 - <<'PY'
import torch
from torch import nn
from rlhf_kit.training.memory_budget import MemoryBudget, cuda_probe, peak_memory
dev = torch.device("cuda")
big = torch.empty(2 * 2**30, dtype=torch.uint8, device=dev); del big  # a 2 GiB peak before the probe
model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).to(dev)
budget = MemoryBudget(tokens=1024, fraction=0.8, max_tokens=10**9, probe=cuda_probe(dev))
budget.update_done()
x = torch.randn(1024, 1024, device=dev)
with budget.measure(1024, list(model.parameters())):
    model(x).square().mean().backward()
print("bytes per token", budget.bytes_per_token, "budget tokens", budget.tokens,
      "peak kept GiB", peak_memory(dev)[0] / 2**30, "counter GiB", torch.cuda.max_memory_allocated(dev) / 2**30)
PY
  # then config S padded at micro-batches of 16 with the sync report (the host waits after this session)
  [ "${SYNC:-1}" = 1 ] && python3 bench/ppo_vs_trl.py --configs S --systems ours --keep-cache --compile-blocks --master-weights --micro 16 \
    --packed-passes off --sync-report --timeout 100 --work $WORK/s_sync --out "$OUT/s16_sync" > "$OUT/s16_sync.log" 2>&1
  [ "${SYNC:-1}" = 1 ] && grep -E "^\| S" "$OUT/s16_sync.log" && python3 -c "import json,sys; o=json.load(open(sys.argv[1]))['configs'][0]['ours']; [print(v, k) for k, v in o['syncs']['top']]" \
    "$OUT/s16_sync/ppo_vs_trl.json"
  rm -f "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = s23 ]; then  # session 23: the update's micro-batches grown to the GPU's memory (MemoryBudget, the
  # recipe's --micro-batch-memory 0.8), this tree: config S (SmolLM2-135M widths) and A at fixed micro-batches of 16,
  # then 16 grown after step 1 (--micro-tokens 16 x 256 --micro-memory 0.8), and A at a fixed 64; padded passes on S
  C="--systems ours --keep-cache --compile-blocks --master-weights --steps 8 --timeout 100"
  for run in S_16 S_16grow A_16 A_16grow A_64; do
    cfg=${run%%_*}; m=${run#*_}; m=${m%grow}
    grow=$([ "${run%grow}" != "$run" ] && echo "--micro-tokens $((m * 256)) --micro-memory 0.8")
    pp=$([ "$cfg" = S ] && echo "--packed-passes off")
    python3 bench/ppo_vs_trl.py --configs $cfg $C --micro $m $grow $pp --work $WORK/m_$run --out "$OUT/m_$run" \
      > "$OUT/m_$run.log" 2>&1
    grep -E "^\| $cfg" "$OUT/m_$run.log" | sed "s/^/$run /" | tee -a "$OUT/ppo_log.txt"
  done
  ours_summary "$OUT" steps
  rm -f "$OUT"/*/*.md; (cd "$OUT" && tar czf results.tgz * && find . -mindepth 1 ! -name results.tgz -delete); exit 0
fi
if [ "$phase" = s22 ]; then  # session 22: PPO on SmolLM2-135M's widths (config S: 30 layers of 576, launch-bound at
  # micro 16), packed and padded passes, this tree (host-to-device copies without a wait, the update's row lengths
  # from its one read) against $BASE (.base22: main before it, with this bench/); this tree's runs add a sync report
  # TREES=. runs this tree only (no $BASE to carry)
  trees=${TREES:-. ${BASE:-.base22}}; [ "$trees" = . ] || check_tree "${BASE:-.base22}"
  S="--configs S --systems ours --keep-cache --compile-blocks --master-weights --micro 16 --timeout 100"
  for mode in ${MODES:-on off}; do  # MODES=off: padded passes only
    for tree in $trees; do
      name=$(tree_name "$tree")_$mode; extra=$([ "$tree" = . ] && echo --sync-report)
      python3 "$tree/bench/ppo_vs_trl.py" $S $extra --packed-passes $mode --work $WORK/s_$name --out "$OUT/s16_$name" \
        > "$OUT/s16_$name.log" 2>&1
      grep -E "^\| S" "$OUT/s16_$name.log" | sed "s/^/$name /" | tee -a "$OUT/ppo_log.txt"
    done
  done
  for m in ${MICROS:-}; do  # MICROS="32 64": this tree, padded, one micro-batch size each (the launch-bound lever)
    S="${S/--micro 16/--micro $m}"
    python3 bench/ppo_vs_trl.py $S --packed-passes off --work $WORK/s_m$m --out "$OUT/s${m}_this_off" \
      > "$OUT/s${m}_this_off.log" 2>&1
    grep -E "^\| S" "$OUT/s${m}_this_off.log" | sed "s/^/this_off_micro$m /" | tee -a "$OUT/ppo_log.txt"
  done
  ours_summary "$OUT" syncs
  rm -f "$OUT"/*/*.md; (cd "$OUT" && tar czf results.tgz * && find . -mindepth 1 ! -name results.tgz -delete); exit 0
fi
if [ "$phase" = y ]; then  # session 19: the padding-free passes (branch packed-passes) on the GPU: its tests, then
  # PPO A (micro 64) packed / padded / packed, then B (8-bit, micro 32) packed / padded; results in results.tgz
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/unit/models/test_varlen.py tests/unit/bench/test_bench_tiny.py 2>&1 | tail -3
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --timeout 150"
  for run in packed padded packed2; do
    flag="--packed-passes $([ $run = padded ] && echo off || echo on)"
    python3 bench/ppo_vs_trl.py $A $flag --work $WORK/a_$run --out "$OUT/a64_$run" > "$OUT/a64_$run.log" 2>&1
    grep -E "^\| A" "$OUT/a64_$run.log" | sed "s/^/$run /" | tee -a "$OUT/ppo_log.txt"
  done
  B="--configs B --systems ours --keep-cache --compile-blocks --optimizer adamw8bit --micro 32 --timeout 170"
  for run in packed padded; do
    flag="--packed-passes $([ $run = padded ] && echo off || echo on)"
    python3 bench/ppo_vs_trl.py $B $flag --work $WORK/b_$run --out "$OUT/b32_$run" > "$OUT/b32_$run.log" 2>&1
    grep -E "^\| B" "$OUT/b32_$run.log" | sed "s/^/$run /" | tee -a "$OUT/ppo_log.txt"
  done
  python3 - "$OUT" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/*/ppo_vs_trl.json")):
    o = json.load(open(f))["configs"][0].get("ours")
    if o is None:  # a TRL-only run
        continue
    print(f.split("/")[-2], {k: o.get(k) for k in ("median_step_s", "median_phases_s", "peak_allocated_gib",
          "real_token_fraction", "dynamo", "error")})
    for s in o.get("steps", []):
        print("   ", {k: s.get(k) for k in ("step_s", "policy_loss", "value_loss", "kl")})
PY
  rm -f "$OUT"/*/*.md; (cd "$OUT" && tar czf results.tgz * && find . -mindepth 1 ! -name results.tgz -delete); exit 0
fi
if [ "$phase" = rm2 ]; then  # session 20: the reward model's packed passes (varlen) against padded, both under the
  # recipe's gradient checkpointing, master weights and compiled blocks, twice, alternating; results in results.tgz
  R="python3 bench/rm_vs_trl.py --systems ours_grouped --gradient-checkpointing --master-weights --compile-blocks --timeout 150"
  for round in 1 2; do
    for mode in on off; do
      $R --packed-passes $mode --work $WORK/rm_$mode --out "$OUT/rm_${mode}_$round" > "$OUT/rm_${mode}_$round.log" 2>&1
      grep -E "^\| ours" "$OUT/rm_${mode}_$round.log" | sed "s/^/$mode $round /" | tee -a "$OUT/rm_log.txt"
    done
  done
  rm -f "$OUT"/*/*.md; (cd "$OUT" && tar czf results.tgz * && find . -mindepth 1 ! -name results.tgz -delete); exit 0
fi
if [ "$phase" = u ]; then  # written in session 17 for the branch decode-edges-compiled: generation A and 1B, then
  # PPO A, of $BASE2 (main before the branch) and this tree, twice each, alternating
  check_tree "${BASE2:-.base5}"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/generation/test_backends.py tests/unit/generation/test_decode_kernel.py 2>&1 | tail -3
  for round in 1 2; do
    for tree in "${BASE2:-.base5}" .; do
      timeout 150 python3 "$tree/bench/generation.py" --configs A 1B --only compiled_graphs --no-cudnn --warmup 1 --runs 5 --out "$OUT/gen_$(tree_name "$tree")_$round" 2>&1 | grep -v "^\[" | tail -3
    done
  done
  A="--configs A --systems ours --keep-cache --compile-blocks --master-weights --micro 64 --timeout 150"
  ppo_a_trees "${BASE2:-.base5}" .
  rm -f "$OUT"/*/*.md; (cd "$OUT" && tar czf results.tgz */ && rm -rf -- */); exit 0
fi
if [ "$phase" = e ]; then  # session 3, RM: TRL (checkpointing off / default on) and ours with checkpointing, master weights, compile
  R="python3 bench/rm_vs_trl.py --timeout 150"
  $R --systems trl trl_default ours_grouped --gradient-checkpointing --work $WORK/r1 --out "$OUT/rm_ckpt" 2>&1 | tee "$OUT/rm_log.txt"
  $R --systems ours_grouped --gradient-checkpointing --master-weights --work $WORK/r2 --out "$OUT/rm_ckpt_master" 2>&1 | tee -a "$OUT/rm_log.txt"
  $R --systems ours_grouped --gradient-checkpointing --master-weights --compile-blocks --work $WORK/r3 --out "$OUT/rm_ckpt_master_compile" 2>&1 | tee -a "$OUT/rm_log.txt"
  $R --systems ours_grouped --master-weights --compile-blocks --work $WORK/r4 --out "$OUT/rm_master_compile" 2>&1 | tee -a "$OUT/rm_log.txt"
  cat "$OUT"/*/*.md; exit 0
fi
if [ "$phase" = a ]; then
  python3 bench/ppo_vs_trl.py --configs A --trl-site /tmp/site112 --profile --timeout 240 --work $WORK --out "$OUT" 2>&1 | tee "$OUT/ppo_log.txt"
  python3 bench/rm_vs_trl.py --timeout 150 --work $WORK --out "$OUT" 2>&1 | tee "$OUT/rm_log.txt"
else
  python3 bench/ppo_vs_trl.py --configs B --systems trl ours --trl-site /tmp/site112 --timeout 180 --work $WORK --out "$OUT" 2>&1 | tee "$OUT/ppo_log.txt"
  mv "$OUT/ppo_vs_trl.json" "$OUT/ppo_b.json"
  for budget in 4096 2048; do  # our RM at lower activation memory (TRL's default uses gradient checkpointing)
    python3 bench/rm_vs_trl.py --systems ours_grouped --token-budget $budget --timeout 90 --work $WORK --out "$OUT" 2>&1 | tee -a "$OUT/rm_log.txt"
    mv "$OUT/rm_vs_trl.json" "$OUT/rm_budget_$budget.json"
  done
  python3 bench/ppo_vs_trl.py --configs B --systems ours --offload-idle --timeout 130 --work $WORK --out "$OUT" 2>&1 | tee -a "$OUT/ppo_log.txt"
  mv "$OUT/ppo_vs_trl.json" "$OUT/ppo_b_offload.json"
  cat "$OUT"/*.md; rm -f "$OUT"/*.md
  exit 0
fi
python3 bench/common.py chart "$OUT" "$OUT/benchmarks_vs_trl.png" || true
cat "$OUT"/*.md
