"""generate(): KV-cached, batched, left-padded decoding equals plain full recomputation."""

from __future__ import annotations

import pytest
import torch
from gen_fixtures import train_arith_run

from lmkit.evaluation.generate import generate, generate_ex
from lmkit.runs import load_run

EXPRS = ["1+2", "(3*4)-5", "7", "12+(3*(4-1))", "9*9", "((2+3)*4)-(6*7)", "5-8", "4*(1+1)"]


@pytest.fixture(scope="module", params=["learned", "rope"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"gen_{request.param}")
    return load_run(train_arith_run(root, request.param), "latest")


def _prompts(tok) -> list[list[int]]:
    return [[tok.bos_id, *tok.encode(e + " = ")] for e in EXPRS]


def _reference(model, prompt: list[int], max_new: int, eos_id: int | None) -> list[int]:
    """Greedy decoding by full recomputation: argmax of model(whole sequence) each step."""
    idx = torch.tensor([prompt])
    out: list[int] = []
    block = model.config.block_size
    with torch.no_grad():
        while len(out) < max_new and idx.size(1) <= block:
            logits, _ = model(idx)
            tok = int(logits[0, -1].argmax())
            if tok == eos_id:
                break
            out.append(tok)
            idx = torch.cat([idx, torch.tensor([[tok]])], dim=1)
    return out


def test_cached_batched_equals_full_recompute(run):
    model, tok = run.model, run.tokenizer
    prompts = _prompts(tok)
    # no EOS: every row runs until its context is full (block_size 32), exercising long caches
    got = generate_ex(model, prompts, max_new_tokens=64, eos_id=None, batch_size=len(prompts))
    for p, ids, finish in zip(prompts, got.tokens, got.finish, strict=True):
        ref = _reference(model, p, 64, None)
        assert ids == ref
        assert len(ids) == model.config.block_size - len(p) + 1 and finish == "context"
    # with EOS: the trained model answers and stops; EOS is not in the output
    got = generate_ex(model, prompts, max_new_tokens=20, eos_id=tok.eos_id, batch_size=3)
    assert got.tokens == [_reference(model, p, 20, tok.eos_id) for p in prompts]
    assert "eos" in got.finish
    assert all(tok.eos_id not in ids for ids in got.tokens)


def test_left_padding_does_not_change_a_row(run):
    model, tok = run.model, run.tokenizer
    prompts = _prompts(tok)
    alone = [generate(model, [p], max_new_tokens=24) for p in prompts]
    batched = generate(model, prompts, max_new_tokens=24, batch_size=len(prompts))
    assert batched == [a[0] for a in alone]
    # the uncached path (same masks and positions, full recompute per step) agrees too
    uncached = generate_ex(model, prompts, max_new_tokens=24, batch_size=len(prompts), use_cache=False)
    assert uncached.tokens == batched
    # and the padded prefill gives the same last-position logits as the prompt alone
    short, long_ = prompts[2], prompts[5]
    width = len(long_)
    idx = torch.tensor([[0] * (width - len(short)) + short, long_])
    pad = torch.tensor([width - len(short), 0])
    col = torch.arange(width)
    valid = col[None, :] >= pad[:, None]
    mask = (col[:, None] >= col[None, :])[None] & (valid[:, None, :] | torch.eye(width, dtype=torch.bool)[None])
    pos = (col[None, :] - pad[:, None]).clamp(min=0)
    with torch.no_grad():
        padded, _ = model(idx, position_ids=pos, attn_mask=mask[:, None])
        alone_logits, _ = model(torch.tensor([short]))
    torch.testing.assert_close(padded[0, -1], alone_logits[0, -1], rtol=1e-5, atol=1e-5)


def test_cache_in_chunks_matches_one_forward(run):
    model, tok = run.model, run.tokenizer
    ids = torch.tensor([_prompts(tok)[5]])
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.new_kv_cache(1, ids.size(1))
        a, _ = model(ids[:, :5], kv_cache=cache)
        b, _ = model(ids[:, 5:9], kv_cache=cache)  # causal within the chunk, all cached visible
        c, _ = model(ids[:, 9:10], kv_cache=cache)
    torch.testing.assert_close(torch.cat([a, b, c], dim=1), full[:, :10], rtol=1e-5, atol=1e-5)
    assert cache.length == 10


def test_stop_sequence_ends_a_row_and_is_excluded(run):
    model, tok = run.model, run.tokenizer
    prompts = _prompts(tok)
    free = generate(model, prompts, max_new_tokens=30)
    row = max(range(len(free)), key=lambda i: len(free[i]))
    assert len(free[row]) >= 6
    stop = free[row][3:5]
    got = generate_ex(model, prompts, max_new_tokens=30, stop_sequences=[stop])
    for ids, full, finish in zip(got.tokens, free, got.finish, strict=True):
        # each row is cut at the first occurrence of the stop sequence, which is not kept
        hit = next((j for j in range(len(full) - 1) if full[j : j + 2] == stop), None)
        if hit is None:
            assert ids == full and finish != "stop"
        else:
            assert ids == full[:hit] and finish == "stop"
    assert got.finish[row] == "stop" and len(got.tokens[row]) <= 3


def test_sampling_is_reproducible_with_a_seeded_generator(run):
    model, tok = run.model, run.tokenizer
    prompts = _prompts(tok)

    def sample(seed: int, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompts, max_new_tokens=16, temperature=1.5, generator=g, **kw)

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    # top_k = 1 leaves only the argmax: sampling equals greedy
    greedy = generate(model, prompts, max_new_tokens=16)
    assert sample(3, top_k=1) == greedy


def test_long_prompt_is_cut_from_the_left_and_progress_counts_prompts(run):
    model, tok = run.model, run.tokenizer
    block = model.config.block_size
    long_prompt = [tok.bos_id, *tok.encode("1+2+3+4+5+6+7+8+9+1+2+3+4+5+6+7+8 = ")]
    assert len(long_prompt) > block
    calls = []
    got = generate_ex(model, [long_prompt, _prompts(tok)[0]], max_new_tokens=5,
                      progress=lambda d, t: calls.append((d, t)))
    assert got.prompt_truncated == [True, False]
    assert got.finish[0] == "context" and len(got.tokens[0]) == 1
    assert got.tokens[0] == generate(model, [long_prompt[-block:]], max_new_tokens=5)[0]
    assert calls == [(1, 2), (2, 2)]


def test_bad_arguments_are_value_errors(run):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(run.model, [[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError, match="eos_id"):
        generate(run.model, [[]], max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        generate(run.model, [[1]], max_new_tokens=3, temperature=-1.0)


def test_stop_strings_cut_on_decoded_text(run):
    model, tok = run.model, run.tokenizer
    prompts = _prompts(tok)

    def decode(ids):  # one character per id (the char tokenizer hides its specials)
        return "".join(chr(0x100 + i) for i in ids)

    free = generate(model, prompts, max_new_tokens=30)
    text = decode(free[0])
    assert len(text) >= 6
    stop = text[2:4]
    got = generate_ex(model, prompts[:1], max_new_tokens=30, stop_strings=["never", stop], decode=decode)
    # the tokens that make up the stop string are dropped
    assert got.finish == ["stop"] and decode(got.tokens[0]) == text[: text.find(stop)]
    with pytest.raises(ValueError, match="decode"):
        generate(model, prompts, max_new_tokens=3, stop_strings=["x"])


# --------------------------------------------------------------------------------------
# the `sample` task
# --------------------------------------------------------------------------------------


def _ctx(run, **kw):
    from pathlib import Path

    from lmkit.evaluation.task import EvalContext

    return EvalContext(model=run.model, tokenizer=run.tokenizer, config=run.config, run_dir=Path("."),
                       device=torch.device("cpu"), step=run.step, **kw)


def test_sample_task_is_seeded_and_reports_its_texts(run):
    from lmkit.evaluation.sample import evaluate, prompt_ids

    tok = run.tokenizer
    opts = {"prompt": ["1+2 = ", "", "(3*4)-"], "temperature": 1.0, "top_k": 10, "max_new_tokens": 12, "seed": 5}
    a = evaluate(_ctx(run, options=opts))
    assert a == evaluate(_ctx(run, options=opts))
    b = evaluate(_ctx(run, options={**opts, "seed": 6}))
    assert [s["text"] for s in a.details["samples"]] != [s["text"] for s in b.details["samples"]]
    samples = a.details["samples"]
    assert [s["prompt"] for s in samples] == opts["prompt"] and a.n_items == 3
    assert a.metrics == {"n_samples": 3.0, "mean_new_tokens": sum(s["n_new_tokens"] for s in samples) / 3}
    assert all(s["n_new_tokens"] <= 12 for s in samples)
    # an empty prompt starts from BOS (what training sequences start with)
    assert prompt_ids(tok, "") == [tok.bos_id] and prompt_ids(tok, "1") == [tok.bos_id, *tok.encode("1")]
    # temperature 0 is greedy decoding
    greedy = evaluate(_ctx(run, options={"prompt": ["1+2 = "], "temperature": 0, "max_new_tokens": 8}))
    expected = generate(run.model, [prompt_ids(tok, "1+2 = ")], max_new_tokens=8, eos_id=tok.eos_id)[0]
    assert greedy.details["samples"][0]["text"] == tok.decode(expected)


@pytest.mark.parametrize("options", [{"temperature": -1.0}, {"top_k": 0}, {"max_new_tokens": 0}, {"prompt": []},
                                     {"seed": "x"}])
def test_sample_task_rejects_bad_options(run, options):
    from lmkit.errors import ConfigError
    from lmkit.evaluation.sample import evaluate

    with pytest.raises(ConfigError):
        evaluate(_ctx(run, options=options))


@pytest.mark.gpu
def test_cached_generation_on_cuda_matches_full_recompute(run):
    import copy

    model = copy.deepcopy(run.model).cuda()
    prompts = _prompts(run.tokenizer)
    cached = generate_ex(model, prompts, max_new_tokens=24, batch_size=len(prompts))
    full = generate_ex(model, prompts, max_new_tokens=24, batch_size=len(prompts), use_cache=False)
    assert cached.tokens == full.tokens
    g = torch.Generator(device="cuda").manual_seed(0)
    a = generate(model, prompts, max_new_tokens=8, temperature=1.0, generator=g)
    g.manual_seed(0)
    assert generate(model, prompts, max_new_tokens=8, temperature=1.0, generator=g) == a


class NoCache(torch.nn.Module):
    """A model without ``new_kv_cache`` (not an lmkit LanguageModel): generate recomputes."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, idx, targets=None, *, last_only=False, position_ids=None, attn_mask=None, kv_cache=None):
        assert kv_cache is None
        return self.inner(idx, last_only=last_only, position_ids=position_ids, attn_mask=attn_mask)


def test_a_model_without_a_kv_cache_is_generated_from_by_recomputation(run):
    prompts = _prompts(run.tokenizer)
    assert generate(NoCache(run.model), prompts, max_new_tokens=8) == generate(run.model, prompts, max_new_tokens=8)
