"""The Qwen3 text encoder's state dict, as transformers saves it (with or without the ``model.`` prefix)."""

from __future__ import annotations

from typing import Any

from imgpack.architectures.base import ConfigProblem, bool_field, int_field, linear


def qwen3_tensors(config: dict[str, Any], file: str = "text_encoder/config.json") -> tuple[dict, dict]:
    """(required, optional) state dict of a Qwen3 text encoder, keyed without the ``model.`` prefix."""
    hidden = int_field(config, "hidden_size", file)
    n_layers = int_field(config, "num_hidden_layers", file)
    n_heads = int_field(config, "num_attention_heads", file)
    n_kv = int_field(config, "num_key_value_heads", file, n_heads)
    intermediate = int_field(config, "intermediate_size", file)
    vocab = int_field(config, "vocab_size", file)
    if n_heads == 0:
        raise ConfigProblem(file, "num_attention_heads must be positive")
    head_dim = config.get("head_dim")
    head_dim = int_field(config, "head_dim", file) if head_dim is not None else hidden // n_heads
    bias = bool_field(config, "attention_bias", file, False)
    req: dict[str, list[int]] = {"embed_tokens.weight": [vocab, hidden], "norm.weight": [hidden]}
    for i in range(n_layers):
        p = f"layers.{i}"
        linear(req, f"{p}.self_attn.q_proj", n_heads * head_dim, hidden, bias)
        linear(req, f"{p}.self_attn.k_proj", n_kv * head_dim, hidden, bias)
        linear(req, f"{p}.self_attn.v_proj", n_kv * head_dim, hidden, bias)
        linear(req, f"{p}.self_attn.o_proj", hidden, n_heads * head_dim, bias)
        req[f"{p}.self_attn.q_norm.weight"] = [head_dim]
        req[f"{p}.self_attn.k_norm.weight"] = [head_dim]
        linear(req, f"{p}.mlp.gate_proj", intermediate, hidden, bias=False)
        linear(req, f"{p}.mlp.up_proj", intermediate, hidden, bias=False)
        linear(req, f"{p}.mlp.down_proj", hidden, intermediate, bias=False)
        req[f"{p}.input_layernorm.weight"] = [hidden]
        req[f"{p}.post_attention_layernorm.weight"] = [hidden]
    optional = {"lm_head.weight": [vocab, hidden]}
    return req, optional


