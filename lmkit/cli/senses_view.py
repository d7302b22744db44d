"""Rich tables of a ``senses`` result (``lmkit eval --task senses``): per word token, sense ×
top and bottom vocabulary items by ``E·C(x)_ℓ``; then, per sense, the val-loss change when that
sense's weights are zeroed (:mod:`lmkit.evaluation.senses`)."""

from __future__ import annotations

from typing import Any


def _piece(text: str) -> str:
    """A vocabulary piece as shown: surrounding spaces dropped (word starts read as words),
    a piece of nothing but whitespace or an empty one as its repr."""
    return text.strip() or repr(text)


def print_sense_tables(record: dict[str, Any], console: Any) -> None:
    """Print the sense tables and the zeroing table of one ``senses`` result record."""
    from rich.table import Table

    details = record.get("details") or {}
    for word in details.get("words", []):
        tokens = word["tokens"]
        for n, token in enumerate(tokens):
            label = f"{word['word']!r}" + (f", token {n + 1}/{len(tokens)} {token['token']!r}" if len(tokens) > 1
                                          else f" (token {token['token']!r}, id {token['token_id']})")
            table = Table(title=f"senses of {label}: top / bottom of E·C(x)_ℓ", title_justify="left")
            table.add_column("sense", justify="right")
            table.add_column("top words")
            table.add_column("bottom words")
            for row in token["senses"]:
                table.add_row(str(row["sense"]), ", ".join(_piece(t) for t in row["top"]),
                              ", ".join(_piece(t) for t in row["bottom"]))
            console.print(table)
    zeroed = details.get("zeroed") or []
    if zeroed:
        base = record["metrics"].get("base_loss")
        table = Table(title=f"zeroing one sense: val loss (base {base:.4f} nats/token)", title_justify="left")
        for col in ("sense", "loss", "Δ loss"):
            table.add_column(col, justify="right")
        for row in zeroed:
            table.add_row(str(row["sense"]), f"{row['loss']:.4f}", f"{row['delta']:+.4f}")
        console.print(table)
