"""Training throughput: lmkit's GPT against Hugging Face ``GPT2LMHeadModel`` and a nanoGPT-style
peer (``benchmarks/nanogpt_peer.py``) of the same shape.

All three get the same shape (vocab 8192, 4 layers, 4 heads, n_embd 256, block 256, tanh
GELU, tied head, no dropout), fp32 AdamW over lmkit's parameter groups (lr 3e-4, wd 0.1) --
lmkit the one ``lmkit train`` builds (fused, also on the CPU), the peers torch's default
(fused on CUDA only, as nanoGPT chooses; ``--same-optimizer`` gives all three lmkit's) --
the same random token ids (batch 8), and are timed in interleaved rounds in one
process, so machine noise hits them alike. Prints the median training tokens/s of each, the
ratios lmkit / HF and lmkit / nanoGPT, and on the CPU each model's MFU against this
machine's measured fp32 matmul rate.

``--gpt2-124m`` times GPT-2 124M (vocab 50304, 12 layers, 12 heads, n_embd 768, block 1024,
batch 16, tied head, no dropout) in bf16 autocast, TF32 on for fp32 matmuls, in interleaved
rounds: ``lmkit`` (eager), ``lmkit+compile`` (``torch.compile`` through the strategy
``lmkit train --compile`` uses), ``nanogpt`` and ``nanogpt+compile`` (the peer, compiled as
nanoGPT's ``train.py`` does), and with ``--gpt2-hf`` HF's ``GPT2LMHeadModel`` (SDPA, eager).
MFU = tokens/s x flops_per_token / peak, with one ``flops_per_token`` for every contender
(lmkit's ``flops_per_token()`` of the shape: the matmuls are the same) and the device's dense
bf16 peak (:func:`lmkit.device.peak_flops`, named in the output). ``--profile DIR`` then
records a ``torch.profiler`` trace of 3 steps of the faster lmkit contender (the code:
``benchmarks/train_throughput_gpt2.py``). On the CPU,
``--gpt2-shape N_LAYER,N_HEAD,N_EMBD,BLOCK,BATCH[,VOCAB]`` runs the same code on a tiny shape
(a dry run of the GPU command; MFU is null there: no peak).

Usage::

    pip install -e ".[bench]"
    python benchmarks/train_throughput.py                 # CPU or GPU, whatever is there
    python benchmarks/train_throughput.py --device cuda --skip-small --gpt2-124m --json --profile OUT
    python benchmarks/train_throughput.py --device cpu --skip-small --gpt2-124m --gpt2-shape 2,2,64,64,2

This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from lmkit.config import ModelConfig
from lmkit.device import resolve_device
from lmkit.models import build_model
from lmkit.training.optim import param_groups


def lmkit_model(vocab: int, n_layer: int, n_head: int, n_embd: int, block: int) -> torch.nn.Module:
    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, d_ff=4 * n_embd, block_size=block,
                      vocab_size=vocab, pos_encoding="learned", activation="gelu_tanh", bias=True,
                      tie_embeddings=True, dropout=0.0)
    return build_model(cfg)


def hf_model(vocab: int, n_layer: int, n_head: int, n_embd: int, block: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = GPT2Config(vocab_size=vocab, bos_token_id=0, eos_token_id=0, n_positions=block, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     n_inner=4 * n_embd, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"  # HF's fastest attention on CPU and GPU alike
    return GPT2LMHeadModel(cfg)


def make_optimizer(model: torch.nn.Module, kind: str, device: torch.device, same: bool) -> torch.optim.Optimizer:
    """lmkit: the optimizer ``lmkit train`` builds (:func:`lmkit.training.optim.build_optimizer`:
    fused AdamW on CUDA and the CPU). The peers: ``torch.optim.AdamW`` over the same decay /
    no-decay groups, fused on CUDA only -- nanoGPT's ``configure_optimizers`` rule, and torch's
    default for HF's ``adamw_torch``. ``same``: every model gets lmkit's (the models alone compared)."""
    if kind == "lmkit" or same:
        from lmkit.config import TrainConfig
        from lmkit.training.optim import build_optimizer

        return build_optimizer(model, TrainConfig(lr=3e-4, weight_decay=0.1, max_steps=1), device)
    return torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, fused=device.type == "cuda")


def make_step(model: torch.nn.Module, kind: str, device: torch.device, dtype: torch.dtype | None,
              same_optimizer: bool = False, call: torch.nn.Module | None = None):
    """One training step of ``model`` (forward through ``call``, e.g. its ``torch.compile``,
    when given; the optimizer is built over ``model``'s parameters, which are on ``device``)."""
    opt = make_optimizer(model, kind, device, same_optimizer)
    forward = call if call is not None else model
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast:
            if kind in ("lmkit", "nanogpt"):
                _, loss = forward(x, y)
            else:  # HF shifts labels internally: pass the window the same way a user would
                loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_rates(step_fns: dict, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                      rounds: int, steps: int) -> dict[str, list[float]]:
    """Tokens/s of each step function per round; the order reverses every other round."""
    rates: dict[str, list[float]] = {name: [] for name in step_fns}
    order = list(step_fns)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step_fns[name](x, y)
            sync(device)
            rates[name].append(x.numel() * steps / (time.perf_counter() - t0))
    return rates


def time_models(builders: dict, *, device, dtype, batch, block, vocab, rounds, steps, warmup,
                same_optimizer: bool = False):
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (batch, block), device=device)
    y = torch.randint(0, vocab, (batch, block), device=device)
    steps_fns = {}
    for name, build in builders.items():
        model = build().to(device).train()
        steps_fns[name] = make_step(model, name.split("-")[0], device, dtype, same_optimizer)
        for _ in range(warmup):
            steps_fns[name](x, y)
    sync(device)
    rates = interleaved_rates(steps_fns, x, y, device, rounds, steps)
    return {name: statistics.median(v) for name, v in rates.items()}, rates


def matmul_flops(device: torch.device, n: int = 1024, reps: int = 20) -> float:
    """FLOP/s of an ``n x n`` fp32 matmul on ``device`` (the best of 3 timings of ``reps``)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = math.inf
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * reps / best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="training steps per model per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-small", action="store_true", help="skip the small fp32 comparison")
    parser.add_argument("--gpt2-124m", action="store_true", help="also time GPT-2 124M in bf16 (CUDA)")
    parser.add_argument("--gpt2-shape", default=None, metavar="L,H,D,T,B[,V]",
                        help="another shape for the --gpt2-124m code (a CPU dry run), e.g. 2,2,64,64,2")
    parser.add_argument("--gpt2-rounds", type=int, default=3)
    parser.add_argument("--gpt2-steps", type=int, default=5, help="steps per contender per round")
    parser.add_argument("--gpt2-warmup", type=int, default=3, help="warm-up steps, the compile included")
    parser.add_argument("--gpt2-contenders", default="lmkit,lmkit+compile,nanogpt,nanogpt+compile",
                        help="a comma-separated subset of the default")
    parser.add_argument("--gpt2-hf", action="store_true", help="add HF GPT2LMHeadModel (SDPA, eager)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="write a torch.profiler trace and table of the faster lmkit contender to DIR")
    parser.add_argument("--same-optimizer", action="store_true",
                        help="give every model lmkit's optimizer (compare the models alone)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sys.modules.setdefault("train_throughput", sys.modules[__name__])  # run as a script: import it once
    from train_throughput_gpt2 import GPT2_CONTENDERS, parse_shape, print_gpt2, run_gpt2

    device, _ = resolve_device(args.device)
    if args.gpt2_124m:
        parse_shape(args.gpt2_shape)  # bad input fails before any timing
        bad = [n for n in args.gpt2_contenders.split(",") if n not in GPT2_CONTENDERS]
        if bad:
            raise SystemExit(f"--gpt2-contenders: unknown {','.join(bad)} (choose from {','.join(GPT2_CONTENDERS)})")
        if device.type != "cuda" and args.gpt2_shape is None:
            raise SystemExit("--gpt2-124m needs CUDA (or --gpt2-shape for a dry run of the same code on a small shape)")
    elif args.profile or args.gpt2_shape:
        raise SystemExit("--profile and --gpt2-shape go with --gpt2-124m")

    report = {"device": str(device), "torch": str(torch.__version__), "threads": torch.get_num_threads()}
    medians = None
    if not args.skip_small:
        shape = dict(vocab=8192, n_layer=4, n_head=4, n_embd=256, block=256)
        from nanogpt_peer import NanoGPT

        builders = {
            "lmkit": lambda: lmkit_model(**shape),
            "hf": lambda: hf_model(**shape),
            "nanogpt": lambda: NanoGPT(**shape),
        }
        medians, rates = time_models(builders, device=device, dtype=None, batch=8, block=shape["block"],
                                     vocab=shape["vocab"], rounds=args.rounds, steps=args.steps, warmup=args.warmup,
                                     same_optimizer=args.same_optimizer)
        report.update({
            "shape": {**shape, "batch": 8, "precision": "fp32"},
            "optimizers": "lmkit's for all" if args.same_optimizer else "lmkit's for lmkit; torch AdamW (fused on CUDA only) for the peers",
            "tok_per_s": medians,
            "ratio_lmkit_over_hf": medians["lmkit"] / medians["hf"],
            "ratio_lmkit_over_nanogpt": medians["lmkit"] / medians["nanogpt"],
            "rounds": rates,
        })
        if device.type == "cpu":
            # CPU MFU: training FLOP/s against this machine's measured fp32 matmul rate
            rate = matmul_flops(device)
            model_flops = lmkit_model(**shape).flops_per_token()
            report["cpu_matmul_flops"] = rate
            report["cpu_mfu"] = {name: v * model_flops / rate for name, v in medians.items()}

    if args.gpt2_124m:
        report["gpt2_124m_bf16"] = run_gpt2(args, device)

    if args.json:
        print(json.dumps(report, indent=2))
        return
    if medians is not None:
        print(f"device {report['device']} (torch {report['torch']}, {report['threads']} threads), fp32, "
              f"batch 8 x block 256, vocab 8192, 4 layers x 256; optimizers: {report['optimizers']}")
        for name, value in medians.items():
            print(f"  {name:6s} {value:10,.0f} tok/s (median of {args.rounds} rounds)")
        print(f"  ratio lmkit/hf = {report['ratio_lmkit_over_hf']:.2f}x, "
              f"lmkit/nanogpt = {report['ratio_lmkit_over_nanogpt']:.2f}x")
        if "cpu_mfu" in report:
            print(f"  CPU MFU (against a measured {report['cpu_matmul_flops'] / 1e9:.0f} GFLOP/s fp32 matmul): "
                  + ", ".join(f"{k} {100 * v:.0f}%" for k, v in report["cpu_mfu"].items()))
    if "gpt2_124m_bf16" in report:
        print_gpt2(report["gpt2_124m_bf16"])


if __name__ == "__main__":
    main()
