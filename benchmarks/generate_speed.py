"""Generation speed: lmkit's KV-cached ``generate`` against full recomputation and HF.

One model shape (default: vocab 256, 4 layers, 4 heads, n_embd 256, block 512, learned
positions, random weights), a batch of prompts of mixed lengths (left-padded), greedy
decoding of exactly ``--new`` tokens per prompt (no EOS). Timed, in interleaved rounds:

- ``cache``: :func:`lmkit.evaluation.generate.generate_ex` (prefill once, one token/step);
- ``no_cache``: the same function with ``use_cache=False`` (whole sequence every step);
- ``hf`` (``--hf``): Hugging Face ``GPT2LMHeadModel.generate`` with its cache, same shape.

Prints new tokens/s of each (median of ``--rounds``) and the ratios.

Usage::

    python benchmarks/generate_speed.py                    # CPU or GPU, whatever is there
    python benchmarks/generate_speed.py --device cuda --n-embd 768 --n-layer 12 --batch 32 --hf

This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lmkit.config import ModelConfig
from lmkit.evaluation.generate import generate_ex
from lmkit.models import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=128, help="new tokens per prompt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hf", action="store_true", help="also time transformers GPT2LMHeadModel.generate")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, d_ff=4 * args.n_embd,
                      block_size=args.block, vocab_size=args.vocab, pos_encoding="learned",
                      activation="gelu_tanh", dropout=0.0)
    model = build_model(cfg).to(device).eval()
    lengths = [32 + (37 * i) % 33 for i in range(args.batch)]  # 32..64 tokens
    prompts = [torch.randint(0, args.vocab, (n,)).tolist() for n in lengths]

    runners = {
        "cache": lambda: generate_ex(model, prompts, max_new_tokens=args.new, batch_size=args.batch),
        "no_cache": lambda: generate_ex(model, prompts, max_new_tokens=args.new, batch_size=args.batch,
                                        use_cache=False),
    }
    if args.hf:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf = GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_positions=args.block, n_embd=args.n_embd,
                                        n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=0.0,
                                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                        eos_token_id=None)).to(device).eval()
        width = max(lengths)
        ids = torch.zeros(args.batch, width, dtype=torch.long)
        attn = torch.zeros(args.batch, width, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            attn[r, width - len(p):] = 1
        ids, attn = ids.to(device), attn.to(device)

        def run_hf():
            with torch.no_grad():
                return hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=args.new,
                                   min_new_tokens=args.new, do_sample=False, pad_token_id=0)

        runners["hf"] = run_hf

    for fn in runners.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.rounds):
        for name, fn in runners.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    new_tokens = args.batch * args.new
    result = {
        "device": str(device), "shape": {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                                         "block_size": args.block, "vocab_size": args.vocab},
        "batch": args.batch, "new_tokens_per_prompt": args.new, "prompt_lengths": lengths,
        "tokens_per_s": {k: new_tokens / statistics.median(v) for k, v in times.items()},
    }
    tps = result["tokens_per_s"]
    result["speedup_cache_vs_no_cache"] = tps["cache"] / tps["no_cache"]
    if "hf" in tps:
        result["ratio_cache_vs_hf"] = tps["cache"] / tps["hf"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in tps.items():
            print(f"{k:>9}: {v:10.1f} new tokens/s")
        print(f"cache / no_cache: {result['speedup_cache_vs_no_cache']:.2f}x")
        if "ratio_cache_vs_hf" in result:
            print(f"cache / hf:       {result['ratio_cache_vs_hf']:.2f}x")


if __name__ == "__main__":
    main()
