#!/usr/bin/env bash
# Issue 19's experiment: REINFORCE with oracle / ORM / Q-RM (/ Q-probe value) rewards, and iterative
# Q-probing, on MBPP with the default model. Every stage is resumable: re-run the same command after a
# kill and it continues (collections skip stored samples, `qprobe rl` resumes from its last step,
# `qprobe iterate` from its last round). The settings below are the pre-registered ones of
# benchmarks/results/rl.md: change them there first, before any run, or not at all.
#
#   QPROBE=.venv/bin/qprobe bash benchmarks/rl/run.sh                     # every stage, in order
#   STAGES="rm-data rm" bash benchmarks/rl/run.sh                          # some of them
#   STAGES="oracle" SAMPLER=transformers bash benchmarks/rl/run.sh         # the slow exact sampler
#   python benchmarks/rl/report.py --runs runs/rl                          # curves + tables (any time)
#
# rm-data: base-model samples of the 200 pool problems (MBPP train split, chat format), 8 each at
#   temperature 1, 128 new tokens, layer-18 states (last and mean): the reward models' only data.
# rm: the ORM (token head, Bradley-Terry on L18_last), Q-RM (token head, margin BT on L18_mean) and
#   the Q-probe (L_PG on L18_mean), on within-problem (pass, fail) pairs / the samples of rm-data.
# oracle, orm, qrm, qprobe: `qprobe rl`, 100 steps of 8 prompts, 50 fixed MBPP-test problems
#   evaluated every 20 steps (greedy + sampled pass@1).
# iterate: 2 rounds of iterative Q-probing, the first 100 pool problems x 8 samples.
set -euo pipefail
cd "$(dirname "$0")/../.."
QPROBE=${QPROBE:-qprobe}
OUT=${OUT:-runs/rl}
DATA=${DATA:-../shared/data/mbpp/mbpp.jsonl}
SAMPLER=${SAMPLER:-llamacpp}          # llama.cpp with the exported adapter (export_gguf_lora, set_lora)
STAGES=${STAGES:-"rm-data rm oracle orm qrm qprobe iterate"}
THREADS=${THREADS:-2}
# Pre-registered (benchmarks/results/rl.md):
POOL=200; EVAL=50; EVERY=20; STEPS=100; BATCH=8; TOKENS=128; LR=5e-5; SEED=0
ITER_POOL=100; ITER_ROUNDS=2; ITER_K=8; ITER_LR=1e-4
mkdir -p "$OUT"
TASK=(--task mbpp --task-option "data=$DATA" --task-option prompt_format=chat)

for stage in $STAGES; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    rm-data)
      $QPROBE collect "${TASK[@]}" --split train --limit "$POOL" --n 8 --temperature 1.0 --top-p 1.0 \
        --max-new-tokens "$TOKENS" --feature 18:last --feature 18:mean --feature-dtype float16 \
        --out "$OUT/rm-data" --allow-code-execution --no-progress ;;
    rm)
      $QPROBE train --pairs-from "$OUT/rm-data" --arch token --loss bt --feature 18:last --seed "$SEED" --out "$OUT/probes/orm"
      $QPROBE train --pairs-from "$OUT/rm-data" --arch token --loss margin_bt --feature 18:mean --seed "$SEED" --out "$OUT/probes/qrm"
      $QPROBE train --run "$OUT/rm-data" --loss pg --feature 18:mean --seed "$SEED" --out "$OUT/probes/qprobe" ;;
    oracle|orm|qrm|qprobe)
      probe=(); [ "$stage" = oracle ] || probe=(--probe "$OUT/probes/$stage")
      $QPROBE rl --reward "$stage" "${probe[@]}" "${TASK[@]}" --pool "$POOL" --eval-size "$EVAL" --eval-every "$EVERY" \
        --steps "$STEPS" --batch "$BATCH" --max-new-tokens "$TOKENS" --lr "$LR" --seed "$SEED" --sampler "$SAMPLER" \
        --threads "$THREADS" --out "$OUT/$stage" --allow-code-execution ;;
    iterate)
      $QPROBE iterate "${TASK[@]}" --pool "$ITER_POOL" --eval-size "$EVAL" --rounds "$ITER_ROUNDS" --k "$ITER_K" \
        --feature 18:mean --max-new-tokens "$TOKENS" --lr "$ITER_LR" --seed "$SEED" --sampler "$SAMPLER" \
        --threads "$THREADS" --out "$OUT/iterate" --allow-code-execution --no-progress ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
