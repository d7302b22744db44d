"""A sample of a run's own validation data, for checking an export against the native model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmkit.config import RunConfig
from lmkit.data.tokenizers import Tokenizer
from lmkit.errors import DataError, LmkitError, first_line


@dataclass
class ValidationSample:
    """Texts from the run's validation split and real token ids made from them.

    Attributes:
        texts: validation texts (arithmetic examples, or rows of a text data set).
        ids: one flat list of real token ids (the texts encoded the way training encodes
            them: ``[BOS] text [EOS]`` per arithmetic example, rows joined by newlines).
        source: where the texts came from, for messages.
    """

    texts: list[str]
    ids: list[int]
    source: str


def validation_sample(config: RunConfig, tokenizer: Tokenizer, *, max_chars: int = 4000,
                      sample_text: Path | None = None) -> ValidationSample:
    """Read up to ``max_chars`` characters of the run's validation split.

    ``sample_text`` (a UTF-8 file) replaces the run's data, for runs whose data set is no
    longer reachable.

    Raises:
        DataError: the data set cannot be read (with what to pass instead).
    """
    if sample_text is not None:
        try:
            text = Path(sample_text).read_text(encoding="utf-8")[:max_chars]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"--sample-text {sample_text}: cannot read it ({first_line(exc)})") from None
        if not text.strip():
            raise DataError(f"--sample-text {sample_text}: the file is empty")
        return ValidationSample([text], tokenizer.encode(text), str(sample_text))
    data = config.data
    try:
        from lmkit.data import _is_arithmetic_jsonl
        from lmkit.data.arithmetic import encode_example, generate_arithmetic, load_arithmetic_files

        if data.dataset == "arithmetic" or _is_arithmetic_jsonl(data.dataset):
            splits = (generate_arithmetic(data.arithmetic) if data.dataset == "arithmetic"
                      else load_arithmetic_files(Path(data.dataset)))
            examples = splits.get("val") or splits["train"][-max(1, len(splits["train"]) // 10):]
            texts, ids, used = [], [], 0
            for example in examples:
                text = example.prompt + example.answer
                texts.append(text)
                ids.extend(encode_example(example, tokenizer))
                used += len(text)
                if used >= max_chars:
                    break
            return ValidationSample(texts, ids, f"{data.dataset} validation examples")
        from lmkit.data.sources import load_text_source

        source = load_text_source(data)
        split = "val" if "val" in source.splits else next(iter(source.splits))
        rows: list[str] = []
        used = 0
        for row in source.splits[split]():
            if not row.strip():
                continue
            rows.append(row)
            used += len(row)
            if used >= max_chars:
                break
    except LmkitError as exc:
        raise DataError(f"cannot read the run's validation text ({first_line(exc)}); "
                        "pass --sample-text FILE or --no-verify") from None
    if not rows:
        raise DataError(f"the {split} split of {data.dataset} has no text; pass --sample-text FILE or --no-verify")
    text = "\n".join(rows)[:max_chars]
    return ValidationSample([text], tokenizer.encode(text), f"{source.description}, {split} split")
