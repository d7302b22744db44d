#!/usr/bin/env bash
# The multiplication-tokens study end to end, at CPU size: pretrain both conditions, fine-tune
# both on GSM8K, evaluate both, compare. Run from the lmkit checkout with ../shared beside it:
#   bash examples/mul_tokens/run.sh            (runs go to runs/; OUT=dir to change)
set -euo pipefail
OUT=${OUT:-runs}
export LMKIT_GPT2_DIR=${LMKIT_GPT2_DIR:-../shared/data/gpt2-tokenizer}   # GPT-2's BPE files, offline

for c in baseline mul_tokens; do
  # 1. pretraining: GSM8K train (question + answer) + Tiny Shakespeare + the synthetic drills
  lmkit train --preset gpt2-mul-tiny --set data.condition=$c --name $c-pt --out-dir $OUT \
    --set training.checkpoint_interval=100 --no-tui
  # 2. supervised fine-tuning on GSM8K train from the pretrained weights (a short run at a
  #    learning rate for a 3M model: the preset's 2e-5 is the 124M recipe's)
  lmkit train --preset sft-gsm8k --init-from $OUT/$c-pt --name $c --out-dir $OUT \
    --max-steps 150 --lr 1e-3 --set training.grad_accum_steps=1 --set training.warmup_steps=15 --no-tui
  # 3. evaluation: the fine-tuned model on GSM8K test and the 281 probes; the pretrained one
  #    on its val split (bits per byte) and HellaSwag at every checkpoint
  lmkit eval $OUT/$c --task gsm8k --data ../shared/data/gsm8k/test.jsonl --limit 200 --out-dir $OUT
  lmkit eval $OUT/$c --task arithmetic-probes --out-dir $OUT
  lmkit eval $OUT/$c-pt --task perplexity --out-dir $OUT
  lmkit eval $OUT/$c-pt --task hellaswag --data ../shared/data/hellaswag/hellaswag_val.jsonl \
    --limit 500 --checkpoint all --out-dir $OUT
done
# 4. the comparison (both fine-tuned runs; HellaSwag and the data stats come from their sources)
lmkit compare baseline mul_tokens --out-dir $OUT --out $OUT/compare_mul.png --json-out $OUT/compare_mul.json
