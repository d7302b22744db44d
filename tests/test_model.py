"""The GPT model: shapes, causality, weight tying, checkpointing, init (FLOPs: test_flops.py;
the interface: test_model_interface.py)."""

import math

import pytest
import torch

from lmkit.config import ModelConfig
from lmkit.models import build_model
from lmkit.models.gpt import GPT


def cfg(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=32, d_ff=48, block_size=16, vocab_size=50, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_shapes_and_loss(pos):
    torch.manual_seed(0)
    model = build_model(cfg(pos_encoding=pos))
    idx = torch.randint(0, 50, (3, 16))
    targets = torch.randint(0, 50, (3, 16))
    no_logits, loss = model(idx, targets)
    assert no_logits is None  # with targets the (B, T, V) logits are neither returned nor kept
    assert loss.ndim == 0 and abs(loss.item() - math.log(50)) < 0.3  # near-uniform at init
    logits, none = model(idx)
    assert logits.shape == (3, 16, 50) and none is None
    last, none = model(idx, last_only=True)
    assert last.shape == (3, 1, 50) and none is None
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    hidden, _ = model(idx, return_hidden=True)
    assert hidden.shape == (3, 16, 32)
    torch.testing.assert_close(model.output_head()(hidden), logits)
    with pytest.raises(ValueError, match="return_hidden"):
        model(idx, targets, return_hidden=True)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_causal(pos):
    torch.manual_seed(0)
    model = build_model(cfg(pos_encoding=pos)).eval()
    idx = torch.randint(0, 50, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_rope_changes_with_position_learned_count():
    rope = build_model(cfg(pos_encoding="rope"), device="meta")
    learned = build_model(cfg(pos_encoding="learned"), device="meta")
    assert learned.num_params() - rope.num_params() == 16 * 32


def test_ignore_index_positions_do_not_count():
    torch.manual_seed(0)
    model = build_model(cfg())
    idx = torch.randint(0, 50, (2, 8))
    targets = idx.clone()
    targets[:, 4:] = -100
    _, loss = model(idx, targets)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 50), idx[:, :4].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_tied_and_untied_heads():
    tied = build_model(cfg(tie_embeddings=True))
    assert tied.output_head().weight is tied.input_embedding().weight and tied.tied_embeddings
    untied = build_model(cfg(tie_embeddings=False))
    assert untied.output_head().weight is not untied.input_embedding().weight and not untied.tied_embeddings
    assert untied.num_params() - tied.num_params() == 50 * 32
    # without the token and position tables: a tied head goes with wte, an untied one stays
    blocks = sum(p.numel() for name, p in tied.named_parameters() if not name.startswith("transformer.w"))
    assert tied.num_params(exclude_embeddings=True) == blocks
    assert untied.num_params(exclude_embeddings=True) == blocks + 50 * 32
    assert tied.num_params(exclude_position_embeddings=True) == tied.num_params() - 16 * 32


def test_bias_switches_match_seed_000_layout():
    # seed 000: no attention biases, MLP biases, LayerNorm biases.
    model = build_model(cfg(bias=True, attn_bias=False))
    block = model.transformer.h[0]
    assert block.attn.c_attn.bias is None and block.attn.c_proj.bias is None
    assert block.mlp.c_fc.bias is not None and block.ln_1.bias is not None
    nobias = build_model(cfg(bias=False))
    assert all(p.ndim > 1 or name.endswith(".weight") for name, p in nobias.named_parameters())
    assert nobias.transformer.h[0].ln_1.bias is None


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = build_model(cfg())
    b = build_model(cfg())
    b.load_state_dict(a.state_dict())
    b.grad_checkpointing = True
    idx = torch.randint(0, 50, (2, 16))
    for model in (a, b):
        model.train()
        _, loss = model(idx, idx)
        loss.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = build_model(cfg(n_layer=8, n_embd=256, n_head=4, d_ff=1024, vocab_size=1000))
    c_proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    c_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert c_fc == pytest.approx(0.02, rel=0.05)
    assert c_proj == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_too_long_sequence_raises():
    model = build_model(cfg())
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gelu_tanh_differs_from_exact():
    torch.manual_seed(0)
    exact = build_model(cfg(activation="gelu"))
    tanh = GPT(cfg(activation="gelu_tanh"))
    tanh.load_state_dict(exact.state_dict())
    idx = torch.randint(0, 50, (1, 8))
    assert not torch.equal(exact(idx)[0], tanh(idx)[0])
