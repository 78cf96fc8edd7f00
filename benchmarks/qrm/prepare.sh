#!/usr/bin/env bash
# Inputs of the Q-RM study (benchmarks/qrm/study.py), resumable stage by stage; nothing here is committed.
#
#   QPROBE=.venv/bin/qprobe bash benchmarks/qrm/prepare.sh            # every stage, in order
#   STAGES="hist mbpp-tokens" bash benchmarks/qrm/prepare.sh          # some of them
#   BACKEND_OPTIONS=n_threads=1 STAGES="gsm8k-pairs math-pairs" bash benchmarks/qrm/prepare.sh &
#   BACKEND_OPTIONS=n_threads=1 STAGES="mbpp-tokens he-tokens-a" bash benchmarks/qrm/prepare.sh &
#       (two chains at once, one thread each, as the committed results were made; then he-tokens-b)
#
# hist: the committed runs at 23d19af (MBPP-train 128, MBPP-test 64, HumanEval 64 problems x 16), the
#   last commit whose runs still carried last-token states (L18_last, the ORM's feature) beside
#   L18_mean. Their rows and L18_mean are identical to today's runs (checked by study.py). On this
#   2-core machine llama.cpp evaluates about 45-90 tokens/s outside generation, so re-embedding
#   L18_last for today's full runs (1.99 M completion tokens) would take 6-12 hours; these subsets
#   cost nothing.
# mbpp-tokens / he-tokens: per-token states (L18_tokens, float16) of the test problems whose 16
#   samples have mixed rewards (the only ones where a selector can matter; on the others every
#   selector returns the same reward, and study.py fills them exactly). min-Z and the credit maps
#   need them.
# gsm8k-pairs / math-pairs: Q-RM's own test pairs (only these ship), a seeded sample of N questions
#   each (one pair per question), embedded with the default model (L18_mean, L18_last).
set -euo pipefail
cd "$(dirname "$0")/../.."
QPROBE=${QPROBE:-qprobe}
OUT=${OUT:-runs/qrm}
N_PAIRS=${N_PAIRS:-160}
STAGES=${STAGES:-"hist gsm8k-pairs mbpp-tokens math-pairs he-tokens"}
DATA=${DATA:-../shared/data/qrm}
# n_threads=1 when the machine is shared: llama.cpp's threads wait on each other at every layer,
# and one descheduled thread stalls the other (2-3x slower than one thread under load here).
read -r -a OPTS <<< "${BACKEND_OPTIONS:-}"
BOPTS=(); for o in "${OPTS[@]}"; do BOPTS+=(--backend-option "$o"); done
mkdir -p "$OUT"

mixed_ids() {  # the prompts of RUN whose samples have mixed rewards, in run order
  python - "$1" <<'PY'
import sys
from qprobe.store import Run
t = Run.open(sys.argv[1]).table(["prompt_id", "reward"]).to_pydict()
seen = {}
for p, r in zip(t["prompt_id"], t["reward"]):
    seen.setdefault(p, set()).add(r)
print("\n".join(p for p, rs in seen.items() if len(rs) > 1))
PY
}

sample_ids() {  # a seeded sample of N row ids (0-based line numbers) of a JSONL file
  python - "$1" "$2" <<'PY'
import random, sys
n_rows = sum(1 for line in open(sys.argv[1], encoding="utf-8").read().split("\n") if line.strip())
print("\n".join(str(i) for i in sorted(random.Random(0).sample(range(n_rows), min(int(sys.argv[2]), n_rows)))))
PY
}

for stage in $STAGES; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    hist)
      if [ ! -f "$OUT/hist/runs/repro/humaneval/manifest.json" ]; then
        mkdir -p "$OUT/hist"
        git archive 23d19af runs/repro/mbpp-train runs/repro/mbpp-test runs/repro/humaneval | tar -x -C "$OUT/hist"
      fi ;;
    mbpp-tokens|he-tokens|he-tokens-a|he-tokens-b)
      # he-tokens-a / -b: the odd / even mixed HumanEval problems, two runs that two single-thread
      # jobs fill at once (study.py reads every RUN-tokens* folder).
      run=$([ "$stage" = mbpp-tokens ] && echo mbpp-test || echo humaneval)
      part=${stage#he-tokens}
      mixed_ids "$OUT/hist/runs/repro/$run" > "$OUT/$run-mixed.txt"
      case $part in
        -a) awk 'NR % 2 == 1' "$OUT/$run-mixed.txt" > "$OUT/$run-mixed$part.txt" ;;
        -b) awk 'NR % 2 == 0' "$OUT/$run-mixed.txt" > "$OUT/$run-mixed$part.txt" ;;
        *) part="" ;;
      esac
      $QPROBE embed "$OUT/hist/runs/repro/$run" --feature 18:tokens --feature-dtype float16 \
        --prompts "$OUT/$run-mixed$part.txt" --out "$OUT/$run-tokens$part" "${BOPTS[@]}" --no-progress ;;
    gsm8k-pairs|math-pairs)
      name=${stage%-pairs}
      sample_ids "$DATA/$name/test_pairwise.jsonl" "$N_PAIRS" > "$OUT/$name-ids.txt"
      $QPROBE pairs embed --pairs "$DATA/$name/test_pairwise.jsonl" --format qrm --ids "$OUT/$name-ids.txt" \
        --feature 18:mean --feature 18:last --feature-dtype float16 --out "$OUT/$name-pairs" "${BOPTS[@]}" --no-progress ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
echo "== done $(date -u +%H:%M:%S)"
