#!/usr/bin/env bash
# Prepare the one GPU call of benchmarks/gpu_check.sh (issue 15), on THIS machine: the one with
# the package registry and ../shared/data.
#
# The GPU machine (one NVIDIA H200, Python 3.12, torch 2.11 + CUDA 13) reaches no registry and
# gets only the repository's working tree plus the ignored paths a call carries. This fills the
# ignored folder .gpucheck/ with
#   wheels/  the Python 3.12 manylinux x86-64 wheels of what lmkit needs and that machine lacks,
#            at the versions installed HERE (the ones the CPU tests passed with);
#   data/    the HellaSwag validation JSONL, the GPT-2 tokenizer files and Tiny Shakespeare.
# Then (device tool): run(command="bash benchmarks/gpu_check.sh $OUT", carry=[".gpucheck"]).
#
# Usage: bash benchmarks/gpu_prepare.sh        (idempotent; prints the folder's size, < 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.gpucheck
SHARED=${LMKIT_SHARED:-../shared}
mkdir -p "$DIR/wheels" "$DIR/data"

# What the H200 image lacks (its package list: the device tool's KINDS.md): pydantic and its
# three helpers, datasets and its two, powerlaw; typer and rich are there but of unknown
# versions, so ours travel too (typer's CLI rendering is what the tests check); pyte (+wcwidth)
# renders the dashboard's terminal output as text in stage 7.
PKGS="pydantic pydantic-core annotated-types typing-inspection typing-extensions typer rich
      datasets dill multiprocess powerlaw pyte wcwidth"
specs=$(python3 - $PKGS <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"gpu_prepare: {name} is not installed here; pip install -e '.[dev,bench]' first")
print(" ".join(out))
EOF
)
rm -f "$DIR"/wheels/*.whl
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR/wheels" $specs 2>&1 \
    | grep -v "^WARNING: Location" || true
n=$(ls "$DIR"/wheels/*.whl | wc -l)
[ "$n" -eq "$(echo $PKGS | wc -w)" ] || { echo "gpu_prepare: expected $(echo $PKGS | wc -w) wheels, got $n" >&2; exit 1; }

cp "$SHARED/data/hellaswag/hellaswag_val.jsonl" "$DIR/data/"
mkdir -p "$DIR/data/gpt2-tokenizer"
cp "$SHARED"/data/gpt2-tokenizer/{encoder.json,vocab.bpe,vocab.json,merges.txt} "$DIR/data/gpt2-tokenizer/"
cp "$SHARED/data/tinyshakespeare/input.txt" "$DIR/data/tinyshakespeare.txt"

grep -qx '.gpucheck/' .gitignore || echo "gpu_prepare: add .gpucheck/ to .gitignore" >&2
echo "$specs" | tr ' ' '\n' > "$DIR/wheels/VERSIONS"
du -sh "$DIR" "$DIR"/*
