"""lmkit tokenizers as Hugging Face tokenizer files (``tokenizer.json`` + ``tokenizer_config.json``).

Every lmkit tokenizer becomes a ``tokenizers.Tokenizer`` that gives the same ids as
lmkit's own ``encode`` (checked on the run's validation text by the export's verification):

* ``char`` -- a ``WordLevel`` model over ``<PAD> <BOS> <EOS> <UNK>`` + the alphabet, with a
  pre-tokenizer that isolates every character; unknown characters map to ``<UNK>`` (id 3),
  as in lmkit. A ``Fuse`` decoder joins characters without spaces.
* ``byte`` -- a ``BPE`` model without merges over GPT-2's byte-to-unicode alphabet, so id
  ``b`` is the byte ``b``; ``<|endoftext|>`` = 256.
* ``bpe`` / ``hf:NAME`` -- already ``tokenizers`` tokenizers: their ``tokenizer.json`` is used as is.
* ``gpt2`` -- the standard GPT-2 files (``vocab.json`` + ``merges.txt``, found in the run's
  tokenizer folder or ``$LMKIT_GPT2_DIR``, used only when their vocabulary equals the run's),
  otherwise ``vocab.json`` + ``merges.txt`` derived from the run's own tiktoken ranks; a
  ``tokenizer.json`` is built from them with GPT-2's byte-level pre-tokenizer.

* ``gpt2+mul`` (the multiplication-tokens study) -- the ``gpt2`` files, plus per condition
  (:func:`_hf_added_tokens`): ``mul_tokens`` gets the 47 ``<|padding_i|>`` strings at
  50257..50303 as special added tokens and the 45 ``<MUL_a_b_c>`` strings at 50304..50348 as
  non-special ones (the seed's ``add_tokens``: ``skip_special_tokens=True`` keeps them; length
  50,349); ``baseline`` gets none (its model was trained on the strings as plain text), unless
  ``legacy_hf_tokenizer``.

**Prompts** get what lmkit puts before them (:func:`adds_bos`): a tokenizer with a BOS id
(``char``: every arithmetic training sequence starts with ``<BOS>``, and ``lmkit eval``
prompts are ``[<BOS>] + encode(text)``, :func:`lmkit.evaluation.sample.prompt_ids`) gets a
``TemplateProcessing`` post-processor ``<BOS> $A`` and ``add_bos_token: true`` in
``tokenizer_config.json``, so ``tok(prompt)`` gives lmkit's ids. The others (``byte``, ``bpe``,
``gpt2``, ``gpt2+mul``, ``hf:NAME``) have no BOS in lmkit: training and prompts are the bare
text, so they get no post-processor (an ``hf:NAME`` tokenizer's own, e.g. ``<s> $A </s>``, is
removed, as lmkit encodes without it) and ``add_bos_token: false``. :func:`check_prompt_ids`
(part of the export's verification) compares ``tok(prompt)["input_ids"]`` with lmkit's.

Special tokens are registered as added tokens, so a Hugging Face tokenizer turns the literal
text ``<|endoftext|>`` (or ``<EOS>`` for ``char``; ``<|padding_i|>`` for ``gpt2+mul``) into its
special id, where lmkit's ``encode`` spells it out character by character. That is the only
difference, and validation text does not contain these strings.

Tokens added with :meth:`lmkit.data.tokenizers.Tokenizer.add_tokens` become added tokens of
``tokenizer.json`` at their own ids (``special`` as in lmkit). ``tokenizers`` numbers added
tokens consecutively, so unused ids between the vocabulary and them are filled with
special placeholders ``<|padding_0|>``, ``<|padding_1|>``, ... (domain-token-gpt2's names: for GPT-2
with the 45 mul tokens, 47 placeholders at 50257..50303).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmkit.data.token_bytes import bytes_to_unicode
from lmkit.data.tokenizers import CHAR_SPECIALS, ENDOFTEXT, GPT2_PATTERN, Tokenizer

__all__ = ["adds_bos", "bytes_to_unicode", "check_prompt_ids", "mul_condition", "prompt_texts", "save_hf_tokenizer",
           "special_tokens"]

#: An added token of ``tokenizer.json``: ``(id, text, special)``.
AddedTokenSpec = tuple[int, str, bool]


def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """``{"bos_token": ..., "eos_token": ..., "pad_token": ..., "unk_token": ...}`` for the
    ids the tokenizer defines (GPT-2 convention: ``bos = eos = unk = <|endoftext|>``)."""
    kind = tokenizer.kind
    if kind == "char":
        pad, bos, eos, unk = CHAR_SPECIALS
        return {"pad_token": pad, "bos_token": bos, "eos_token": eos, "unk_token": unk}
    if kind in ("byte", "bpe", "gpt2", "gpt2+mul"):
        return {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    out: dict[str, str] = {}
    backend = getattr(tokenizer, "backend", None)
    for name, tid in (("eos_token", tokenizer.eos_id), ("bos_token", tokenizer.bos_id), ("pad_token", tokenizer.pad_id)):
        if tid is not None and backend is not None:
            token = backend.id_to_token(tid)
            if token is not None:
                out[name] = token
    return out


def adds_bos(tokenizer: Tokenizer, bos: bool | None = None) -> bool:
    """Whether lmkit puts the tokenizer's BOS id before a prompt: it has one (``char``) and the
    run's training sequences begin with it (``bos``, :func:`lmkit.data.sequences_start_with_bos`:
    arithmetic examples do, a char-level text stream does not; ``None``: not known, assume so).

    The same rule as :func:`lmkit.evaluation.sample.prompt_ids`, the arithmetic evaluations
    (``[bos_id, *encode(prompt)]``) and training on arithmetic examples
    (:func:`lmkit.data.arithmetic.encode_example`: ``[BOS] prompt answer [EOS]``).
    """
    return tokenizer.bos_id is not None and bos is not False


def _with_prompt_template(backend: Any, tokenizer: Tokenizer, bos: bool | None = None) -> Any:
    """``backend`` whose post-processor does what lmkit does to a prompt: ``<BOS> $A`` when
    :func:`adds_bos`, else nothing (a pretrained tokenizer's own template is dropped)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    if adds_bos(tokenizer, bos):
        token = backend.id_to_token(tokenizer.bos_id)
        if token is None or backend.token_to_id(token) != tokenizer.bos_id:
            raise ValueError(f"tokenizer.json: no token for the BOS id {tokenizer.bos_id}")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{token}:0 $A:0", pair=f"{token}:0 $A:0 {token}:1 $B:1",
            special_tokens=[(token, tokenizer.bos_id)])
        return backend
    spec = json.loads(backend.to_str())
    if spec.get("post_processor") is None:
        return backend
    spec["post_processor"] = None
    return Backend.from_str(json.dumps(spec))


def prompt_texts(texts: list[str], *, limit: int = 200, width: int = 64) -> list[str]:
    """Up to ``limit`` prompts cut from ``texts``: every non-empty line, long lines cut before a
    space into pieces of at most ``width`` characters (a validation sample of running text is
    one long string; this gives as many prompts as an arithmetic sample has examples)."""
    out: list[str] = []
    for text in texts:
        for line in text.splitlines():
            while line and len(out) < limit:
                cut = len(line) if len(line) <= width else line.rfind(" ", 1, width)
                cut = width if cut <= 0 else cut
                piece, line = line[:cut], line[cut:]
                if piece.strip():
                    out.append(piece)
    return out


def check_prompt_ids(hf_tok: Any, tokenizer: Tokenizer, texts: list[str], problems: list[str], *,
                     bos: bool | None = None) -> dict[str, Any]:
    """Compare ``hf_tok(prompt)["input_ids"]`` (special tokens on, as a user calls it) with the ids
    lmkit starts a sample from (:func:`lmkit.evaluation.sample.prompt_ids`) on
    :func:`prompt_texts` of ``texts``; a mismatch is appended to ``problems``.

    Returns:
        ``{"prompt_texts": n, "prompt_ids_equal": bool, "adds_bos": bool}`` for the verification.
    """
    from lmkit.evaluation.sample import prompt_ids

    prompts = prompt_texts(texts)
    mismatched = [(p, hf_tok(p)["input_ids"], prompt_ids(tokenizer, p, bos=bos)) for p in prompts]
    mismatched = [m for m in mismatched if list(m[1]) != m[2]]
    if mismatched:
        text, theirs, ours = mismatched[0]
        problems.append(f"tokenizer: {len(mismatched)} of {len(prompts)} prompts get other ids from "
                        f"tokenizer(prompt) than lmkit's prompt ids (first: {text[:30]!r}: {list(theirs)[:4]}... "
                        f"vs {ours[:4]}...)")
    return {"prompt_texts": len(prompts), "prompt_ids_equal": not mismatched, "adds_bos": adds_bos(tokenizer, bos)}


def _char_backend(tokenizer: Any) -> Any:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    vocab = {token: i for i, token in enumerate(tokenizer.itos)}
    backend = Backend(models.WordLevel(vocab, unk_token=CHAR_SPECIALS[3]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in CHAR_SPECIALS])
    return backend


def _byte_backend() -> Any:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab[ENDOFTEXT] = 256
    backend = Backend(models.BPE(vocab, [], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return backend


def _gpt2_files_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``vocab.json`` and ``merges.txt`` contents equivalent to tiktoken's byte-pair ranks.

    A token of rank ``r`` made of more than one byte comes from merging the split
    ``(left, right)`` that tiktoken's own BPE reaches with ranks below ``r``: we rerun
    tiktoken's merge loop on the token's bytes, stopping before rank ``r``, which leaves
    exactly two parts. Merges are ordered by the rank of their result, as in GPT-2's file.
    """
    b2u = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    def parts_below(token: bytes, max_rank: int) -> list[bytes]:
        pieces = [bytes([b]) for b in token]
        while True:
            best_i, best_rank = None, None
            for i in range(len(pieces) - 1):
                rank = ranks.get(pieces[i] + pieces[i + 1])
                if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                    best_i, best_rank = i, rank
            if best_i is None:
                return pieces
            pieces = pieces[:best_i] + [pieces[best_i] + pieces[best_i + 1]] + pieces[best_i + 2:]

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = parts_below(token, rank)
            if len(parts) == 2:
                merges.append((text(parts[0]), text(parts[1])))
    return vocab, merges


def _standard_gpt2_files(candidates: list[Path], vocab: dict[str, int]) -> tuple[Path, Path] | None:
    """The first folder holding ``vocab.json``/``encoder.json`` equal to ``vocab`` and a merges file."""
    for directory in candidates:
        for vocab_name, merges_name in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            vocab_file, merges_file = directory / vocab_name, directory / merges_name
            if vocab_file.is_file() and merges_file.is_file():
                try:
                    theirs = json.loads(vocab_file.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                theirs.pop(ENDOFTEXT, None)
                if theirs == vocab:
                    return vocab_file, merges_file
    return None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        left, right = line.split(" ")
        merges.append((left, right))
    return merges


def _gpt2_backend(tokenizer: Any, run_tokenizer_dir: Path | None, directory: Path) -> tuple[Any, str]:
    """Write ``vocab.json`` + ``merges.txt`` into ``directory`` and return the backend and
    where the files came from."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    b2u = bytes_to_unicode()
    ranks: dict[bytes, int] = tokenizer.mergeable_ranks
    vocab = {"".join(b2u[b] for b in token): rank for token, rank in ranks.items()}
    candidates = [p for p in (run_tokenizer_dir, Path(os.environ["LMKIT_GPT2_DIR"]).expanduser()
                              if os.environ.get("LMKIT_GPT2_DIR") else None) if p is not None]
    found = _standard_gpt2_files(candidates, vocab)
    if found is not None:
        merges = _read_merges(found[1])
        origin = f"standard GPT-2 files from {found[0].parent}"
    else:
        vocab, merges = _gpt2_files_from_ranks(ranks)
        origin = "derived from the run's tiktoken ranks"
    full_vocab = {**vocab, ENDOFTEXT: tokenizer.eos_id}
    (directory / "vocab.json").write_text(json.dumps(full_vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    backend = Backend(models.BPE(full_vocab, merges, fuse_unk=False))
    # tiktoken splits with the GPT-2 regex, then byte-level BPE within each piece.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return backend, origin


def mul_condition(tokenizer: Tokenizer) -> str | None:
    """``"mul_tokens"``, ``"baseline"`` or ``None`` (not the multiplication-tokens study).

    A ``gpt2+mul`` tokenizer says its condition (``tokenizer.condition``); any other tokenizer
    whose added tokens include a mul string at its id (``<MUL_6_9_54>`` at 50342) matches them
    in text, i.e. the ``mul_tokens`` condition.
    """
    condition = getattr(tokenizer, "condition", None)
    if condition in ("baseline", "mul_tokens"):
        return condition
    from lmkit.data.mul_tokens import is_mul_id, mul_strings

    strings = mul_strings()
    return "mul_tokens" if any(is_mul_id(t.id) and strings.get(t.text) == t.id for t in tokenizer.added_tokens) \
        else None


def _hf_added_tokens(tokenizer: Tokenizer, legacy_hf_tokenizer: bool) -> tuple[list[AddedTokenSpec], dict[str, Any]]:
    """The added tokens ``tokenizer.json`` gets, and what was decided (for the metadata).

    The multiplication-tokens study (SEEDS_SPEC §1.1, HF side): in the ``mul_tokens``
    condition the 45 mul strings (50304..50348) are added as the seed's builder did, with
    ``add_tokens`` -- NOT special, so ``decode(..., skip_special_tokens=True)`` keeps them --
    and the 47 padding strings ``<|padding_i|>`` (50257..50303) as SPECIAL added tokens, as
    lmkit's own tokenizer marks them: a decode with ``skip_special_tokens=True`` drops them as
    lmkit's decode does. Like ``<|endoftext|>``, the HF tokenizer still reads the literal text
    ``<|padding_3|>`` as its id (``tokenizers`` matches every added token in text, special or
    not) where lmkit spells it out; text holding these strings is left out of the export's
    tokenizer comparison, and its verification says so. (The seed's builder added the padding
    strings non-special: ``legacy_hf_tokenizer`` keeps that.) In the ``baseline`` condition the
    strings were plain text in training, so they are left out (the model still has 50,349
    rows; an id above 50256 has no text); ``legacy_hf_tokenizer`` adds them anyway, as the
    seed's builder did for both conditions -- then the HF tokenizer reads ``<MUL_6_9_54>`` as
    one id where lmkit's baseline tokenizer (and the baseline's training data) spells it out.
    """
    condition = mul_condition(tokenizer)
    tokens = [(t.id, t.text, t.special) for t in tokenizer.added_tokens]
    info: dict[str, Any] = {"condition": condition, "legacy_hf_tokenizer": bool(legacy_hf_tokenizer)}
    if condition is None:
        return tokens, info
    from lmkit.data.mul_tokens import MUL_IDS, MUL_VOCAB_SIZE, PADDING_IDS

    study = range(PADDING_IDS[0], MUL_VOCAB_SIZE)
    if condition == "baseline" and not legacy_hf_tokenizer:
        tokens = [t for t in tokens if t[0] not in study]
        info["mul_strings"] = "plain text (as the baseline was trained)"
        return tokens, info
    padding_special = not legacy_hf_tokenizer
    tokens = [(i, text, False if i in MUL_IDS else padding_special if i in PADDING_IDS else special)
              for i, text, special in tokens]
    info["mul_strings"] = "added tokens (add_tokens, not special)"
    info["padding_strings"] = ("special added tokens (skip_special_tokens drops them, as lmkit's decode)"
                               if padding_special else "added tokens (add_tokens, not special, as the original)")
    return tokens, info


def save_hf_tokenizer(tokenizer: Tokenizer, directory: Path, *, run_tokenizer_dir: Path | None = None,
                      model_max_length: int | None = None, legacy_hf_tokenizer: bool = False,
                      bos: bool | None = None) -> dict[str, Any]:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
    (plus ``vocab.json``/``merges.txt`` for ``gpt2`` and ``gpt2+mul``) into ``directory``.

    ``gpt2+mul`` (the multiplication-tokens study): see :func:`_hf_added_tokens` for what the
    ``mul_tokens`` and ``baseline`` conditions get and what ``legacy_hf_tokenizer`` changes.
    Prompts: ``tok(text)`` prepends BOS exactly when lmkit does (:func:`adds_bos`, module docstring;
    ``bos``: the run's :func:`lmkit.data.sequences_start_with_bos`).

    Returns:
        ``{"kind", "class", "special_tokens", "origin", "add_bos_token", "added_tokens", "vocab_size"}`` (and ``"mul_tokens"``
        for the study: condition, how the strings were written) for ``lmkit_export.json``.

    Raises:
        ValueError: an lmkit tokenizer kind this function does not know, or a BOS id without a token.
    """
    kind = tokenizer.kind
    tokenizer_class = "PreTrainedTokenizerFast"
    origin = "built by lmkit"
    if kind == "char":
        backend = _char_backend(tokenizer)
    elif kind == "byte":
        backend = _byte_backend()
    elif kind == "bpe" or kind.startswith("hf:"):
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_str(tokenizer.backend.to_str())  # type: ignore[attr-defined]
        origin = "the run's own tokenizer.json"
    elif kind in ("gpt2", "gpt2+mul"):
        backend, origin = _gpt2_backend(tokenizer, run_tokenizer_dir, directory)
        tokenizer_class = "GPT2Tokenizer"
    else:
        raise ValueError(f"no Hugging Face form for the {kind!r} tokenizer")
    added, mul_info = _hf_added_tokens(tokenizer, legacy_hf_tokenizer)
    backend = _with_prompt_template(_with_added_tokens(backend, added), tokenizer, bos)
    backend.save(str(directory / "tokenizer.json"))
    specials = special_tokens(tokenizer)
    config: dict[str, Any] = {
        "tokenizer_class": tokenizer_class,
        **specials,
        "add_prefix_space": False,
        "add_bos_token": adds_bos(tokenizer, bos),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "lmkit_tokenizer": kind,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    out = {"kind": kind, "class": tokenizer_class, "special_tokens": specials, "origin": origin,
           "add_bos_token": adds_bos(tokenizer, bos),
           "added_tokens": len(added), "vocab_size": backend.get_vocab_size(with_added_tokens=True)}
    if mul_info["condition"] is not None:
        out["mul_tokens"] = mul_info
    return out


def _added_entry(token_id: int, content: str, special: bool) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def _with_added_tokens(backend: Any, added: list[AddedTokenSpec]) -> Any:
    """``backend`` with ``added`` (``(id, text, special)`` in id order) at their ids
    (special placeholders fill unused ids).

    Raises:
        ValueError: the rebuilt tokenizer does not give an added token its id.
    """
    if not added:
        return backend
    from tokenizers import Tokenizer as Backend

    spec = json.loads(backend.to_str())
    entries = list(spec.get("added_tokens") or [])
    taken = set(backend.get_vocab(with_added_tokens=True)) | {text for _, text, _ in added}
    by_id = {i: (text, special) for i, text, special in added}
    n_pad = 0
    for token_id in range(backend.get_vocab_size(with_added_tokens=True), added[-1][0] + 1):
        token = by_id.get(token_id)
        if token is not None:
            entries.append(_added_entry(token_id, *token))
            continue
        while f"<|padding_{n_pad}|>" in taken:
            n_pad += 1
        entries.append(_added_entry(token_id, f"<|padding_{n_pad}|>", True))
        n_pad += 1
    spec["added_tokens"] = entries
    rebuilt = Backend.from_str(json.dumps(spec))
    wrong = [text for i, text, _ in added if rebuilt.token_to_id(text) != i]
    if wrong:
        raise ValueError(f"tokenizer.json: added token(s) {', '.join(wrong[:3])} did not keep their ids")
    return rebuilt
