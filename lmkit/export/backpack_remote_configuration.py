"""configuration_backpack.py of an lmkit Backpack export (``lmkit export RUN --to hf OUT``).

Copied into the export folder as ``configuration_backpack.py`` and loaded by transformers'
``AutoConfig.from_pretrained(OUT, trust_remote_code=True)`` through ``config.json``'s
``auto_map``. Self-contained: it imports transformers only, never lmkit.

The keys are those of lmkit's ``BackpackConfig`` (``lmkit.config.backpack``): the paper's
Backpack (Hewitt, Thickstun, Manning & Liang, ACL 2023, arXiv 2305.16765) with a GPT
contextualiser.
"""

from transformers import PretrainedConfig


class LmkitBackpackConfig(PretrainedConfig):
    """An lmkit Backpack: ``n_senses`` sense vectors per word from a sense network over the tied
    word embedding, mixed by causal contextualisation weights from an ``n_layer`` GPT.

    Args (as lmkit's ``BackpackConfig``): ``vocab_size``, ``n_embd``, ``n_layer``, ``n_head``,
    ``n_senses``, ``sense_mlp_ratio``, ``block_size`` (context), ``d_ff`` (MLP hidden size),
    ``pos_encoding`` (``learned``/``rope``), ``rope_theta``, ``activation``
    (``gelu``/``gelu_tanh``/``relu2``), ``norm`` (``layernorm``/``rmsnorm``), ``norm_affine``,
    ``norm_bias``, ``attn_bias``, ``mlp_bias``, ``layer_norm_eps``, ``qk_norm``, ``qkv``
    (``fused``/``separate``), ``embed_norm``, ``dropout``.
    """

    model_type = "lmkit_backpack"

    def __init__(self, vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_senses=16, sense_mlp_ratio=4,
                 block_size=1024, d_ff=None, pos_encoding="learned", rope_theta=10000.0, activation="gelu",
                 norm="layernorm", norm_affine=True, norm_bias=True, attn_bias=True, mlp_bias=True,
                 layer_norm_eps=1e-5, qk_norm=False, qkv="fused", embed_norm=False, dropout=0.0,
                 tie_word_embeddings=True, **kwargs):
        self.vocab_size = vocab_size
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_senses = n_senses
        self.sense_mlp_ratio = sense_mlp_ratio
        self.block_size = block_size
        self.d_ff = d_ff if d_ff is not None else 4 * n_embd
        self.pos_encoding = pos_encoding
        self.rope_theta = rope_theta
        self.activation = activation
        self.norm = norm
        self.norm_affine = norm_affine
        self.norm_bias = norm_bias
        self.attn_bias = attn_bias
        self.mlp_bias = mlp_bias
        self.layer_norm_eps = layer_norm_eps
        self.qk_norm = qk_norm
        self.qkv = qkv
        self.embed_norm = embed_norm
        self.dropout = dropout
        # the names transformers' generic code reads
        self.hidden_size = n_embd
        self.num_hidden_layers = n_layer
        self.num_attention_heads = n_head
        self.max_position_embeddings = block_size
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
