#!/bin/sh
# The README's screenshot of `qprobe report`: a pg probe on MBPP-train (L18_mean), reported on the
# first 10 MBPP-test problems of the committed run (run order, no choice by reward), drawn by the
# system chromium. Usage: sh benchmarks/report_screenshot.sh  (about 30 s on 2 cores)
set -eu
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
qprobe train --run runs/repro/mbpp-train --loss pg --feature L18_mean --cv-folds 2 --out "$tmp/pg"
python -c "
from qprobe.store.run import Run
ids = dict.fromkeys(Run.open('runs/repro/mbpp-test').table(['prompt_id']).column('prompt_id').to_pylist())
print('\n'.join(list(ids)[:10]))" > "$tmp/ids.txt"
qprobe report runs/repro/mbpp-test --probe "$tmp/pg" --greedy-run runs/repro/mbpp-test-greedy -k 4 \
    --prompts "$tmp/ids.txt" --out "$tmp/report"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
    --user-data-dir="$tmp/profile" --window-size=1280,1300 \
    --screenshot="$PWD/benchmarks/results/report_screenshot.png" "file://$tmp/report/index.html#filter=mixed"
