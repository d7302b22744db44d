"""``lmkit export RUN --to hf|safetensors OUT``: a verified Hugging Face folder, or plain weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from lmkit.cli._common import handle_errors


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


@handle_errors
def export_command(
    run: str = typer.Argument(..., help="Run directory (runs/NAME) or a run name under --out-dir."),
    out: Path = typer.Argument(..., help="Folder to write (must be empty or absent unless --force)."),
    to: str = typer.Option(..., "--to", help="hf (transformers folder) or safetensors (plain weights + config.yaml)."),
    checkpoint: str = typer.Option("best", "--checkpoint", "-c", help="best, latest, step_…, epoch_… or a path."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16 (saved weights)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the check against the native model; the "
                                   "folder is marked unverified."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty OUT."),
    out_dir: str = typer.Option("runs", "--out-dir", help="Where run names are looked up."),
    sample_text: Path = typer.Option(None, "--sample-text", help="UTF-8 text to verify with, when the run's "
                                     "validation data is no longer readable."),
    json_out: bool = typer.Option(False, "--json", help="Print lmkit_export.json on stdout at the end."),
    threads: int = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: the cores "
                                "that other processes leave free; also LMKIT_THREADS, OMP_NUM_THREADS)."),
    legacy_hf_tokenizer: bool = typer.Option(False, "--legacy-hf-tokenizer", help="gpt2+mul baseline runs: add "
                                             "the 47 padding and 45 <MUL_a_b_c> strings to the HF tokenizer as "
                                             "the original's HF builder did (lmkit's baseline tokenization then differs)."),
) -> None:
    """Export a run's checkpoint. --to hf writes a folder that transformers' AutoModelForCausalLM and
    AutoTokenizer load offline (GPT-2 for learned positions, GPT-NeoX for rotary), then proves it: native vs
    HF logits on real validation ids and random ids (max |Δ| < 1e-4, float32, CPU) and tokenizer ids on the
    run's validation text. A failed check exits 1 and marks the folder failed. --to safetensors writes
    model.safetensors + config.yaml for lmkit itself."""
    from lmkit.errors import ConfigError
    from lmkit.events import Notice
    from lmkit.threads import apply_threads, choose_threads

    apply_threads(choose_threads(threads))
    stream = sys.stderr if json_out else sys.stdout

    def emit(event: object) -> None:
        if isinstance(event, Notice):
            prefix = f"{event.level}: " if event.level in ("warning", "error") else ""
            stream.write(f"  {prefix}{event.message}\n")
            stream.flush()

    if to == "hf":
        from lmkit.export.hf import export_hf

        result = export_hf(run, out, checkpoint=checkpoint, dtype=dtype, verify=not no_verify, force=force,
                           out_dir=out_dir, sample_text=sample_text, emit=emit,
                           legacy_hf_tokenizer=legacy_hf_tokenizer)
    elif to == "safetensors":
        if legacy_hf_tokenizer:
            raise ConfigError("--legacy-hf-tokenizer is for --to hf (a safetensors export copies lmkit's tokenizer)")
        from lmkit.export.safetensors_export import export_safetensors

        result = export_safetensors(run, out, checkpoint=checkpoint, dtype=dtype, verify=not no_verify,
                                    force=force, out_dir=out_dir, emit=emit)
    else:
        raise ConfigError(f"--to {to}: unknown target (choose hf or safetensors)")
    meta = result.metadata
    source = meta["source"]
    check = meta.get("verification") or {}
    if result.status == "verified":
        diffs = ", ".join(f"{k} {_fmt(v)}" for k, v in check.get("max_abs_diff", {}).items())
        tok = "; tokenizer ids equal" if check.get("tokenizer_ids_equal") else ""
        if meta["kind"] == "safetensors":
            verdict = "verified: the reloaded folder gives bit-identical logits"
        else:
            verdict = f"verified: max |Δ logit| {diffs} (< {check.get('tolerance', 0):g}){tok}"
        if check.get("rounding_max_abs_diff") is not None:
            verdict += (f"\n{meta['dtype']} weights move the logits by up to "
                        f"{_fmt(check['rounding_max_abs_diff'])} from the float32 model (reported, not judged)")
    else:
        verdict = "UNVERIFIED (--no-verify): nothing checked that this folder computes what the run computes"
    stream.write(f"exported {source['run_name']} {source['checkpoint_name']} (step {source['step']:,}, "
                 f"val loss {'n/a' if source['val_loss'] is None else format(source['val_loss'], '.4f')}) -> {result.out} [{meta.get('hf_class', 'safetensors')}, "
                 f"{meta['dtype']}]\n{verdict}\n")
    mul = (meta.get("tokenizer") or {}).get("mul_tokens")
    if mul:
        stream.write(f"tokenizer: {mul['condition']} condition, {meta['tokenizer']['vocab_size']:,} ids in the HF "
                     f"tokenizer; padding and mul strings: {mul['mul_strings']}\n")
    if json_out:
        sys.stdout.write(json.dumps(meta, indent=2) + "\n")
