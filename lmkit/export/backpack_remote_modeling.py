"""modeling_backpack.py of an lmkit Backpack export (``lmkit export RUN --to hf OUT``).

Copied into the export folder as ``modeling_backpack.py`` and loaded by
``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` through ``config.json``'s
``auto_map`` (the way published Backpack checkpoints, e.g. ``stanfordnlp/backpack-gpt2``, are
shared). Self-contained: torch and transformers only, never lmkit. Its parameter names are
lmkit's (``lmkit.models.backpack.Backpack``), so the weights load unchanged.

The model (Hewitt, Thickstun, Manning & Liang, "Backpack Language Models", ACL 2023, arXiv
2305.16765; ``B`` batch, ``T`` tokens, ``d`` = ``n_embd``, ``k`` = ``n_senses``)::

    C(x) = FF(E x) reshaped to (k, d)                     sense vectors (sense_network)
    h = GPT(x)                                            the contextualiser (transformer.h, ln_f)
    α_ℓ[i, j] = softmax_{j <= i}(q_iℓ · k_jℓ / sqrt(d/k))  q, k = split(Linear(h) -> 2d) (sense_weight_net)
    o_i = Σ_ℓ Σ_{j <= i} α_ℓ[i, j] C(x_j)_ℓ ;  logits_i = E o_i   (lm_head tied to transformer.wte)

Generation recomputes the whole prefix at every step (no KV cache: ``use_cache`` is
ignored), which gives the same tokens as a cached decoder, only slower. Written for
transformers 5.x (``GenerationMixin``, ``_tied_weights_keys`` as a dict); 4.x works too.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_backpack import LmkitBackpackConfig


def _act(name):
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu2":
        return lambda x: F.relu(x).square()
    raise ValueError(f"unknown activation {name!r}")


def _norm(config):
    d = config.n_embd
    if config.norm == "rmsnorm":
        return nn.RMSNorm(d, eps=config.layer_norm_eps, elementwise_affine=config.norm_affine)
    if config.norm_affine:
        return nn.LayerNorm(d, eps=config.layer_norm_eps, bias=config.norm_bias)
    return nn.LayerNorm(d, eps=config.layer_norm_eps, elementwise_affine=False)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention (``c_attn`` stacks ``[q | k | v]``, or ``c_q/c_k/c_v``)."""

    def __init__(self, config):
        super().__init__()
        d = config.n_embd
        self.n_head, self.head_dim = config.n_head, d // config.n_head
        self.separate = config.qkv == "separate"
        if self.separate:
            self.c_q = nn.Linear(d, d, bias=config.attn_bias)
            self.c_k = nn.Linear(d, d, bias=config.attn_bias)
            self.c_v = nn.Linear(d, d, bias=config.attn_bias)
        else:
            self.c_attn = nn.Linear(d, 3 * d, bias=config.attn_bias)
        self.c_proj = nn.Linear(d, d, bias=config.attn_bias)
        self.qk_eps = config.layer_norm_eps if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask):
        B, T, C = x.shape
        q, k, v = (self.c_q(x), self.c_k(x), self.c_v(x)) if self.separate else self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            cos, sin = (t.to(q.dtype) for t in rope)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if self.qk_eps is not None:
            q = F.rms_norm(q, (self.head_dim,), eps=self.qk_eps)
            k = F.rms_norm(k, (self.head_dim,), eps=self.qk_eps)
        p = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    """``dropout(c_proj(act(c_fc(x))))``."""

    def __init__(self, d_in, d_hidden, d_out, config):
        super().__init__()
        self.c_fc = nn.Linear(d_in, d_hidden, bias=config.mlp_bias)
        self.c_proj = nn.Linear(d_hidden, d_out, bias=config.mlp_bias)
        self.act = _act(config.activation)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm residual block of the contextualiser."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = Attention(config)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config.n_embd, config.d_ff, config.n_embd, config)

    def forward(self, x, rope, mask):
        x = x + self.attn(self.ln_1(x), rope, mask)
        return x + self.mlp(self.ln_2(x))


class SenseBlock(nn.Module):
    """The sense network's residual block: ``r = dropout(x) + residual; r += mlp(ln_1(r)); ln_2(r)``."""

    def __init__(self, config):
        super().__init__()
        d = config.n_embd
        self.ln_1 = _norm(config)
        self.mlp = MLP(d, config.sense_mlp_ratio * d, d, config)
        self.ln_2 = _norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, residual):
        residual = self.dropout(x) + residual
        residual = residual + self.mlp(self.ln_1(residual))
        return self.ln_2(residual)


class SenseNetwork(nn.Module):
    """``C(x) = FF(E x)``: ``(..., d) -> (..., k, d)``."""

    def __init__(self, config):
        super().__init__()
        d = config.n_embd
        self.n_senses = config.n_senses
        self.dropout = nn.Dropout(config.dropout)
        self.ln = _norm(config)
        self.block = SenseBlock(config)
        self.final_mlp = MLP(d, config.sense_mlp_ratio * d, config.n_senses * d, config)

    def forward(self, emb):
        residual = self.dropout(emb)
        return self.final_mlp(self.block(self.ln(residual), residual)).unflatten(-1, (self.n_senses, emb.size(-1)))


class SenseWeightNetwork(nn.Module):
    """Queries and keys of α: ``c_attn`` ``Linear(d, 2d)`` -> ``(B, k, T, d/k)`` each."""

    def __init__(self, config):
        super().__init__()
        self.n_senses = config.n_senses
        self.c_attn = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.attn_bias)

    def forward(self, h):
        B, T, d = h.shape
        q, k = self.c_attn(h).view(B, T, 2, self.n_senses, d // self.n_senses).unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2)


class LmkitBackpackPreTrainedModel(PreTrainedModel):
    config_class = LmkitBackpackConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class LmkitBackpackForCausalLM(LmkitBackpackPreTrainedModel, GenerationMixin):
    """The Backpack LM (module docstring). ``forward(input_ids (B, T), attention_mask (B, T)
    optional, labels optional) -> CausalLMOutput(loss, logits (B, T, V))``; ``labels`` are
    the inputs (shifted inside, ``-100`` ignored), as for any ``*ForCausalLM``."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        d = config.n_embd
        modules = {"wte": nn.Embedding(config.vocab_size, d)}
        if config.pos_encoding == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, d)
        if config.embed_norm:
            modules["ln_emb"] = _norm(config)
        modules["drop"] = nn.Dropout(config.dropout)
        modules["h"] = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        modules["ln_f"] = _norm(config)
        self.transformer = nn.ModuleDict(modules)
        self.sense_network = SenseNetwork(config)
        self.sense_weight_net = SenseWeightNetwork(config)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.post_init()

    def _rope(self, positions):
        """Cos/sin tables ``(B, 1, T, head_dim)`` of ``positions`` (RoFormer, rotate-half form), computed
        here rather than kept as buffers (transformers builds the model on the meta device)."""
        hd = self.config.n_embd // self.config.n_head
        inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32,
                                                             device=positions.device) / hd))
        freqs = torch.outer(torch.arange(self.config.block_size, dtype=torch.float32, device=positions.device), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[positions].unsqueeze(1), emb.sin()[positions].unsqueeze(1)

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # no KV cache: every step recomputes the prefix

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **kwargs):
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        mask, positions = None, torch.arange(T, device=input_ids.device).expand(B, T)
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask.bool()
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = (causal & keep[:, None, :]) | torch.eye(T, dtype=torch.bool, device=input_ids.device)
            mask = mask[:, None]  # (B, 1, T, T); a padding row sees itself only (no empty softmax)
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        emb = self.transformer.wte(input_ids)
        senses = self.sense_network(emb).transpose(1, 2)  # (B, k, T, d)
        x = emb
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(positions)
        if "ln_emb" in self.transformer:
            x = self.transformer.ln_emb(x)
        x = self.transformer.drop(x)
        rope = None
        if self.config.pos_encoding == "rope":
            rope = self._rope(positions)
        for block in self.transformer.h:
            x = block(x, rope, mask)
        q, k = self.sense_weight_net(self.transformer.ln_f(x))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
        visible = mask if mask is not None else torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        alpha = torch.softmax(scores.masked_fill(~visible, float("-inf")).float(), dim=-1)
        o = (alpha.to(senses.dtype) @ senses).sum(1)
        logits = self.lm_head(o)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
