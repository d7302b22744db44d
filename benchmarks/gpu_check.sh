#!/usr/bin/env bash
# The one GPU call of issue 15: lmkit's CUDA paths run, measured, in one command.
#
#   bash benchmarks/gpu_prepare.sh                 # HERE first: wheels + data into .gpucheck/
#   bash benchmarks/gpu_check.sh OUTDIR --dry-run  # HERE: every stage on the CPU, small shapes
#   device run: bash benchmarks/gpu_check.sh "$OUT"   (carry: [".gpucheck"], timeout_s 600)
#
# Seven stages, in order, each under its own time limit, each writing its result into OUTDIR as
# soon as it ends (a stage that overruns costs only itself). OUTDIR gets at most 8 files, named in
# letters, digits, '.', '_' and '-' (what the device tool brings back):
#   1_setup.txt       install, versions, nvidia-smi, `lmkit doctor --json`
#   2_pytest.txt      `pytest -m gpu` (no -x: every failure recorded)
#   3_resume.txt      seed 000's command shape (scale_10m, --gpu-only --fp16, 200 steps) straight and
#                     SIGTERM'd at step ~100 then resumed, with default and with deterministic
#                     kernels: bitwise comparisons
#   4_throughput.json GPT-2 124M bf16 tokens/s and MFU, eager and compiled, lmkit vs a nanoGPT peer
#   5_memory.json     the memory estimate vs max_memory_allocated, ~12 rows, every term measured
#   6_hellaswag.txt   `lmkit eval --task hellaswag` on all 10,042 items, medium (124M) shape: items/s
#   7_dashboard.txt   a 60-step `lmkit train` under a pseudo-terminal: the dashboard's GPU panel
#   8_logs.tar        each stage's stderr, the profiler table and trace, JUnit XML, the summary
# stdout: one line per stage (exit code, seconds) and the headline figures.
set -uo pipefail

OUTDIR=${1:?usage: gpu_check.sh OUTDIR [--dry-run]}
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
G=$REPO/.gpucheck
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpucheck.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS"
T_START=$(date +%s)

[ -d "$G/wheels" ] && [ -f "$G/data/hellaswag_val.jsonl" ] || {
    echo "gpu_check: $G is missing or incomplete; run bash benchmarks/gpu_prepare.sh first (and carry .gpucheck)" >&2
    exit 2
}

if [ "$DRY" = 1 ]; then
    PY=python DEV=cpu
else
    PY=python3 DEV=cuda
fi
export PY DEV DRY REPO G WORK LOGS OUTDIR
export LMKIT_GPT2_DIR=$G/data/gpt2-tokenizer HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONDONTWRITEBYTECODE=1

summary() { echo "$*" | tee -a "$LOGS/summary.txt"; }

# stage FILE LIMIT FUNCTION: run FUNCTION under `timeout LIMIT`, its stdout+stderr into OUTDIR/FILE,
# or with FILE "-" (a stage that writes its own files into OUTDIR) into the logs folder; then
# rewrite the logs tar, so what has ended so far comes back even if a later stage is killed.
stage() {
    local file=$1 limit=$2 fn=$3 t0 rc secs note="" dest
    dest=$OUTDIR/$file
    [ "$file" = - ] && dest=$LOGS/${fn#s_}.log
    t0=$(date +%s.%N)
    timeout --kill-after=5 "$limit" bash -c "$fn" >>"$dest" 2>&1
    rc=$?
    secs=$(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $t0 }")
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then note=" (TIMED OUT at $limit s)"; fi
    summary "stage ${fn#s_}: exit $rc, $secs s$note -> ${dest#"$WORK"/}"
    tar -C "$WORK" -cf "$OUTDIR/8_logs.tar" logs 2>/dev/null
    return 0
}

# ---------------------------------------------------------------------------------------------
# 1. install (in this shell: PYTHONPATH must reach every later stage), versions, doctor
# ---------------------------------------------------------------------------------------------
{
    echo "# gpu_check $(date -u +%FT%TZ) dry_run=$DRY repo=$REPO"
    git -C "$REPO" log -1 --oneline 2>/dev/null
    git -C "$REPO" status --short 2>/dev/null | head -20
    if [ "$DRY" = 0 ]; then
        echo "# pip install --no-index --target /tmp/site ($(ls "$G"/wheels/*.whl | wc -l) wheels)"
        timeout 30 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$G"/wheels/*.whl 2>&1 | grep -v "^WARNING: Running pip as" | tail -20
    fi
} >"$OUTDIR/1_setup.txt" 2>&1
if [ "$DRY" = 0 ]; then
    export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi

s_setup() {
    cd "$REPO" || exit 1
    echo "# PYTHONPATH=$PYTHONPATH"
    $PY - <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.machine(), sys.executable)
for name in ("torch", "triton", "lmkit", "pydantic", "typer", "rich", "datasets", "transformers", "tokenizers",
             "tiktoken", "safetensors", "pyarrow", "fsspec", "huggingface_hub", "pynvml", "numpy", "scipy",
             "powerlaw", "pyte", "pytest"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name:16s} {getattr(mod, '__version__', '?'):12s} {getattr(mod, '__file__', '')}")
    except Exception as exc:  # noqa: BLE001 - report every import problem, keep going
        print(f"  {name:16s} IMPORT FAILED: {type(exc).__name__}: {exc}")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-",
      "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "")
EOF
    # torch.compile's Triton builds a C stub on its first CUDA compile: it needs a C compiler and Python.h
    echo "C compiler: $(command -v gcc || command -v cc || echo NONE)"
    $PY -c "import os, sysconfig; h = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); print('Python.h:', h if os.path.exists(h) else 'MISSING')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    echo "# lmkit doctor --json"
    $PY -m lmkit doctor --json
    echo "# lmkit doctor --preset gpt2-124m --bf16 -b 16"
    $PY -m lmkit doctor --preset gpt2-124m --bf16 -b 16
}
export -f s_setup
stage 1_setup.txt 40 s_setup

# ---------------------------------------------------------------------------------------------
# 2. the gpu-marked tests, all of them
# ---------------------------------------------------------------------------------------------
s_pytest() {
    cd "$REPO" || exit 1
    $PY -m pytest -m gpu -q -ra -p no:cacheprovider --timeout 100 --junitxml="$LOGS/junit_gpu.xml"
}
export -f s_pytest
stage 2_pytest.txt 105 s_pytest

# ---------------------------------------------------------------------------------------------
# 3. seed 000's command, straight twice and cut at step ~100 + resumed: bitwise?
# ---------------------------------------------------------------------------------------------
s_resume() {
    mkdir -p "$WORK/s3" && cd "$WORK/s3" || exit 1
    local args cut code det
    if [ "$DRY" = 1 ]; then
        args=(--preset pilot --max-steps 40) cut=20
    else
        args=(--preset scale_10m --gpu-only --fp16 --max-steps 200) cut=100
    fi
    # default kernels, then training.deterministic: each straight, and cut by SIGTERM after
    # micro-batch $cut then resumed. Default GPU kernels (attention backward, index_add) use atomic
    # adds, so default runs may differ from each other; deterministic ones must not.
    for det in false true; do
        local a=straight_$det b=resumed_$det
        echo "# lmkit train ${args[*]} --set training.deterministic=$det: straight; cut after micro-batch $cut, resumed"
        $PY -m lmkit train "${args[@]}" --set training.deterministic=$det --name "$a" --json >"$a.json" \
            2>"$LOGS/3_train_$a.err"
        echo "train $a: exit $?"
        LMKIT_TEST_SIGNAL="$cut:SIGTERM" $PY -m lmkit train "${args[@]}" --set training.deterministic=$det \
            --name "$b" --json >"$b.cut.json" 2>"$LOGS/3_train_$b.err"
        code=$?
        echo "train $b (SIGTERM after micro-batch $cut): exit $code (143 expected)"
        tail -1 "$LOGS/3_train_$b.err"
        $PY -m lmkit resume "runs/$b" --json >"$b.json" 2>"$LOGS/3_resume_$b.err"
        echo "resume $b: exit $?"
        $PY -c "import json; s=json.load(open('$a.json')); print('$a summary:', {k: s.get(k) for k in ('device_name','precision','steps','final_val_loss','train_tok_per_s','train_time_s','wall_time_s','mfu')})"
        $PY "$REPO/benchmarks/runs_equal.py" "runs/$a" "runs/$b" --label "straight_vs_resumed_deterministic_$det"
    done
}
export -f s_resume
stage 3_resume.txt 80 s_resume

# ---------------------------------------------------------------------------------------------
# 4. GPT-2 124M throughput and MFU, eager and compiled, lmkit vs the nanoGPT peer; a trace
# ---------------------------------------------------------------------------------------------
s_throughput() {
    cd "$REPO" || exit 1
    mkdir -p "$LOGS/profile"
    local shape=()
    [ "$DRY" = 1 ] && shape=(--gpt2-shape 2,2,64,64,2)
    $PY benchmarks/train_throughput.py --device "$DEV" --skip-small --gpt2-124m "${shape[@]}" --json \
        --profile "$LOGS/profile" >"$OUTDIR/4_throughput.json" 2>"$LOGS/4_throughput.err"
    local rc=$?
    tail -5 "$LOGS/4_throughput.err"
    exit $rc
}
export -f s_throughput
stage - 160 s_throughput

# ---------------------------------------------------------------------------------------------
# 5. memory: the estimate against max_memory_allocated, every term's raw measurement
# ---------------------------------------------------------------------------------------------
s_memory() {
    cd "$REPO" || exit 1
    local extra=()
    [ "$DRY" = 1 ] && extra=(--dry-run)
    $PY benchmarks/memory_estimate.py --device "$DEV" --terms "${extra[@]}" --json \
        >"$OUTDIR/5_memory.json" 2>"$LOGS/5_memory.err"
    local rc=$?
    tail -5 "$LOGS/5_memory.err"
    exit $rc
}
export -f s_memory
stage - 55 s_memory

# ---------------------------------------------------------------------------------------------
# 6. HellaSwag, all 10,042 items, on the medium preset's shape (1 training step: the time counts)
# ---------------------------------------------------------------------------------------------
s_hellaswag() {
    mkdir -p "$WORK/s6" && cd "$WORK/s6" || exit 1
    local shape=() limit=()
    if [ "$DRY" = 1 ]; then
        shape=(--set model.n_layer=1 --set model.n_head=2 --set model.n_embd=64 --set model.d_ff=256
               --set model.block_size=128)
        limit=(--limit 64)
    fi
    $PY -m lmkit train --preset medium "${shape[@]}" --data "$G/data/tinyshakespeare.txt" --max-steps 1 \
        --set training.eval_iters=1 --device "$DEV" --name med --json >med.json 2>"$LOGS/6_train.err"
    echo "train medium (1 step): exit $?"
    local t0=$SECONDS
    $PY -m lmkit eval runs/med --task hellaswag --checkpoint latest --data "$G/data/hellaswag_val.jsonl" \
        "${limit[@]}" --device "$DEV" 2>&1 | tail -5
    echo "eval: exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s wall (process start and model load included)"
    $PY - <<'PYEOF'
import json
r = json.load(open("runs/med/eval/hellaswag.json"))
print(json.dumps({k: r.get(k) for k in ("n_items", "metrics", "wall_time_s", "items_per_s", "device", "checkpoint")}, indent=1))
PYEOF
}
export -f s_hellaswag
stage 6_hellaswag.txt 75 s_hellaswag

# ---------------------------------------------------------------------------------------------
# 7. the dashboard on a terminal: its GPU panel (NVML) as text
# ---------------------------------------------------------------------------------------------
s_dashboard() {
    mkdir -p "$WORK/s7" && cd "$WORK/s7" || exit 1
    local args=(--preset small --data "$G/data/tinyshakespeare.txt" --bf16 --max-steps 60 --set training.log_interval=2)
    [ "$DRY" = 1 ] && args=(--preset pilot --max-steps 30)
    $PY "$REPO/benchmarks/pty_capture.py" --out "$OUTDIR/7_dashboard.txt" --cols 150 --rows 70 --every 0.5 --keep 4 \
        --timeout 30 -- $PY -m lmkit train "${args[@]}" --name dash
}
export -f s_dashboard
stage - 35 s_dashboard

# ---------------------------------------------------------------------------------------------
# headline figures
# ---------------------------------------------------------------------------------------------
python3 - "$OUTDIR" <<'EOF' 2>&1 | tee -a "$LOGS/summary.txt"
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: unreadable ({type(exc).__name__})")
        return None
pytest = (out / "2_pytest.txt").read_text() if (out / "2_pytest.txt").exists() else ""
tail = [l for l in pytest.splitlines() if re.search(r"(passed|failed|error|skipped)", l)]
print("pytest -m gpu:", tail[-1] if tail else "no summary line")
resume = (out / "3_resume.txt").read_text() if (out / "3_resume.txt").exists() else ""
for label in ("straight_vs_resumed_deterministic_false", "straight_vs_resumed_deterministic_true"):
    m = re.search(r'"label": "%s".*?"equal": (true|false)' % label, resume, re.S)
    print(f"{label}: {'equal' if m and m.group(1) == 'true' else 'DIFFERENT' if m else 'not run'}")
tp = load("4_throughput.json")
if tp and "gpt2_124m_bf16" in tp:
    g = tp["gpt2_124m_bf16"]
    print("GPT-2 124M bf16:", g.get("peak_name"))
    for name, c in (g.get("contenders") or {}).items():
        mfu = c.get("mfu")
        if c.get("tok_per_s") is None:
            print(f"  {name:18s} FAILED: {str(c.get('error'))[:200]}")
            continue
        print(f"  {name:18s} {c['tok_per_s']:>12,.0f} tok/s  MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}"
              f"  (compile {c.get('compile_s') or 0:.0f} s)")
    print("  compiled lmkit / nanoGPT:", g.get("ratio_compiled_lmkit_over_nanogpt"))
mem = load("5_memory.json")
rows = mem.get("rows", mem) if isinstance(mem, dict) else mem
if isinstance(rows, list) and rows:
    errs = [(r.get("err_pct") or {}).get("peak") for r in rows if isinstance(r, dict)]
    errs = [e for e in errs if e is not None]
    print(f"memory: {len(rows)} rows" + (f", largest |err| {max(abs(e) for e in errs):.1f}% (target 5%)" if errs else ""))
hs = (out / "6_hellaswag.txt").read_text() if (out / "6_hellaswag.txt").exists() else ""
m = re.search(r'"items_per_s": ([0-9.]+)', hs)
n = re.search(r'"n_items": ([0-9]+)', hs)
w = re.search(r'"wall_time_s": ([0-9.]+)', hs)
print("hellaswag:", f"{n.group(1) if n else '?'} items in {w.group(1) if w else '?'} s, {m.group(1)} items/s (target: 10,042 in <= 60 s)" if m else "no result")
dash = (out / "7_dashboard.txt").read_text() if (out / "7_dashboard.txt").exists() else ""
print("dashboard:", "GPU panel seen" if re.search(r"─ GPU \(", dash) else "no GPU panel in the capture",
      f"({len(dash.splitlines())} lines)")
EOF
summary "total: $(( $(date +%s) - T_START )) s"
tar -C "$WORK" -cf "$OUTDIR/8_logs.tar" logs 2>/dev/null
ls -la "$OUTDIR"
