#!/usr/bin/env bash
# Collection for the Table 1 / Figures 2-4 reproduction (benchmarks/repro/REPORT.md).
# Every stage is `qprobe collect` into its own run: re-running this script resumes where it
# stopped (a stage that is complete takes a second). Stages go from cheap-and-useful to the full
# paper sizes, so a partial collection is still a usable one.
#   QPROBE=.venv/bin/qprobe bash benchmarks/repro/collect.sh [RUNS_DIR [COPIES_DIR]]
# RUNS_DIR (default runs/repro-full) holds every feature (seven per sample: the layer sweep's); stage c
# writes COPIES_DIR (default runs/repro, the committed one): rows (texts, rewards) plus only the
# headline feature and MiniLM (the API-setting table), about 2.9 kB a sample instead of 12.7.
set -euo pipefail
cd "$(dirname "$0")/../.."
QPROBE=${QPROBE:-qprobe}
RUNS=${1:-runs/repro-full}
COPIES=${2:-runs/repro}
KEEP=${KEEP:-L18_mean Eminilm_mean}
DATA=${QPROBE_MBPP:-../shared/data/mbpp/mbpp.jsonl}
GSM8K=${QPROBE_GSM8K:-../shared/data/gsm8k}
N=${N:-16}
common=(--n "$N" --temperature 0.8 --top-p 0.95 --max-new-tokens 300 --feature-dtype float16
        --allow-code-execution --shard-samples 64)
# Layers read inside llama.cpp while generating (hidden_states numbering; -1 = after the final norm).
# The first 64 prompts of mbpp-train were collected with -1:last and -1:mean only, the other layers and
# MiniLM added by stage e (`qprobe embed`); a resume must name every feature the run holds.
layers=(--feature -1:last --feature -1:mean --feature 12:mean --feature 18:mean --feature 18:last --feature 21:last)
mbpp() {  # split limit
  "$QPROBE" collect "${layers[@]}" --feature embed=minilm:mean --task mbpp --split "$1" --limit "$2" --task-option "data=$DATA" \
    --task-option prompt_format=chat --out "$RUNS/mbpp-$1" "${common[@]}" "${@:3}"
}
he() {  # limit
  "$QPROBE" collect --task humaneval --split test --limit "$1" --task-option prompt_format=chat \
    --out "$RUNS/humaneval" "${common[@]}" "${layers[@]}" --feature embed=minilm:mean "${@:2}"
}
gsm8k() {  # split limit ; the preference issue's best-of-k on the model's own GSM8K samples
  "$QPROBE" collect --task gsm8k --split "$1" --limit "$2" --task-option "data=$GSM8K" \
    --task-option prompt_format=chat --out "$RUNS/gsm8k-$1" --n 8 --temperature 0.8 --top-p 0.95 \
    --max-new-tokens 320 --feature -1:last --feature -1:mean --feature-dtype float16 --shard-samples 64 "${@:3}"
}
greedy() {  # task-args... ; one temperature-0 sample per prompt
  "$QPROBE" collect "$@" --n 1 --temperature 0 --top-p 1 --max-new-tokens 300 \
    "${layers[@]}" --feature-dtype float16 --allow-code-execution --shard-samples 64
}
fewshot() {  # task-args... ; the same prompts with 5 solved MBPP-train examples in context (fewer features: size)
  "$QPROBE" collect "$@" --shots-from "$RUNS/mbpp-train" --shots 5 --shots-seed 0 \
    --max-new-tokens 300 --feature -1:last --feature 21:last --feature 18:mean --feature-dtype float16 --allow-code-execution --shard-samples 64 --no-progress
}
embed() {  # run features... ; adds features to a stored run (resumable)
  "$QPROBE" embed "$1" "${@:2}" --feature-dtype float16 --no-progress
}
mbpp_test=(--task mbpp --split test --limit 64 --task-option "data=$DATA" --task-option prompt_format=chat)
he_test=(--task humaneval --split test --limit 64 --task-option prompt_format=chat)
copies() {  # the committed copies: every run with only the $KEEP features it has (GSM8K runs: all, they are small)
  for dir in "$RUNS"/*/; do
    r=$(basename "$dir"); keep=()
    for k in $KEEP; do [ -d "$dir/features/$k" ] && keep+=(--feature "$k"); done
    [[ $r == gsm8k-* ]] && for k in "$dir"/features/*/; do keep+=(--feature "$(basename "$k")"); done
    "$QPROBE" copy "$dir" "$COPIES/$r" "${keep[@]}" --replace
  done
}
# The loop is one function, parsed whole before it runs: editing this file during a collection is safe.
main() {
  for stage in ${STAGES:-1 2 e 3 g 4 5 6 m s f a 7 8 9 10 11 c}; do
    case $stage in
      1) mbpp train 64 --no-progress ;;
      2) mbpp test 64 --no-progress ;;
      e) embed "$RUNS/mbpp-train" --feature 12:mean --feature 18:mean --feature 18:last --feature 21:last
         for r in mbpp-train mbpp-test; do embed "$RUNS/$r" --feature embed=minilm:mean; done ;;
      3) greedy --task mbpp --split test --limit 64 --task-option "data=$DATA" --task-option prompt_format=chat \
           --out "$RUNS/mbpp-test-greedy" --no-progress ;;
      g) gsm8k train 32 --no-progress
         gsm8k test 32 --no-progress ;;
      4) he 64 --no-progress ;;
      5) greedy --task humaneval --split test --limit 64 --task-option prompt_format=chat \
           --out "$RUNS/humaneval-greedy" --no-progress ;;
      6) mbpp train 128 --no-progress ;;
      m) embed "$RUNS/humaneval" --feature embed=minilm:mean ;;  # no-op once stage 4 collects MiniLM too
      s) # Table 1's "5-shot on successes": greedy, 5 successful training completions in context
         fewshot "${mbpp_test[@]}" --out "$RUNS/mbpp-test-5shot-greedy" --n 1 --temperature 0 --top-p 1
         fewshot "${he_test[@]}" --out "$RUNS/humaneval-5shot-greedy" --n 1 --temperature 0 --top-p 1 ;;
      f) # "5-shot + Q-probe": 8 samples of the 5-shot prompts
         fewshot "${mbpp_test[@]}" --out "$RUNS/mbpp-test-5shot" --n 8 --temperature 0.8 --top-p 0.95
         fewshot "${he_test[@]}" --out "$RUNS/humaneval-5shot" --n 8 --temperature 0.8 --top-p 0.95 ;;
      a) # API setting: the same model behind llama-cpp-python's OpenAI-compatible server, MiniLM features;
         # the generator's own states added afterwards from the same GGUF
         "$QPROBE" collect "${he_test[@]}" --limit 32 --backend openai --backend-option serve=default \
           --out "$RUNS/humaneval-api" --n 8 --temperature 0.8 --top-p 0.95 --max-new-tokens 300 \
           --feature embed=minilm:mean --feature-dtype float16 --allow-code-execution --shard-samples 32 --no-progress
         "$QPROBE" embed "$RUNS/humaneval-api" --backend llamacpp --feature -1:last --feature -1:mean --feature 21:last \
           --feature 18:mean --feature-dtype float16 --no-progress ;;
      7) mbpp test 128 --no-progress ;;
      8) he 164 --no-progress ;;
      9) greedy --task humaneval --split test --task-option prompt_format=chat --out "$RUNS/humaneval-greedy" --no-progress ;;
      10) mbpp train 464 --no-progress ;;
      11) mbpp test 500 --no-progress
          greedy --task mbpp --split test --limit 500 --task-option "data=$DATA" --task-option prompt_format=chat \
            --out "$RUNS/mbpp-test-greedy" --no-progress ;;
      c) copies ;;
    esac
    echo "stage $stage done $(date -u +%FT%TZ)"
  done
}
main; exit
