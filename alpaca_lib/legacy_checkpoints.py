"""weight_diff.py's naive integrity sum as transformers 4.28 (the version Alpaca used) computed it.

The original checked a recovered model by summing every tensor of its state dict in that version's key order, rotary
inv_freq buffers included (transformers <= 4.30 saved them; today they are derived from the config). These functions
give that order, those buffers and that sum, so the sum the original README printed can still be checked.
"""

import torch

INV_FREQ_SUFFIX = "rotary_emb.inv_freq"  # transformers <= 4.30 saved this buffer; today it is derived from the config


def is_inv_freq(name):
    return name.endswith(INV_FREQ_SUFFIX)


def original_state_dict_order(names, num_layers):
    """`names` in the order of LlamaForCausalLM.state_dict() in transformers 4.28, which is the order the original
    added the per-tensor sums in; float32 addition is not associative, so the order matters at the original's 1e-2
    tolerance. Names it does not know (other architectures) follow in their given order."""
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "self_attn.rotary_emb.inv_freq", "mlp.gate_proj.weight",
                 "mlp.down_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight",
                 "post_attention_layernorm.weight"]
    canonical = (["model.embed_tokens.weight"]
                 + [f"model.layers.{i}.{suffix}" for i in range(num_layers) for suffix in per_layer]
                 + ["model.norm.weight", "lm_head.weight"])
    present, known = set(names), set(canonical)
    return [n for n in canonical if n in present] + [n for n in names if n not in known]


def naive_sum(tensor_sums, num_layers):
    """The original's `sum(state_dict[key].sum() for key in state_dict)` from {name: float32 sum}: a float32 0-d
    tensor, added in transformers 4.28's key order (original_state_dict_order)."""
    order = original_state_dict_order(list(tensor_sums), num_layers)
    return sum(tensor_sums[name] for name in order)


def rotary_inv_freq(config):
    """The rotary `inv_freq` buffer every attention layer of this model holds, as transformers computes it."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[rope_type](config)[0].to(torch.float32)
    base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def inv_freq_names(config):
    """The inv_freq keys transformers 4.28 had in a Llama state dict (none for other architectures)."""
    if getattr(config, "model_type", None) != "llama":
        return []
    return [f"model.layers.{i}.self_attn.{INV_FREQ_SUFFIX}" for i in range(config.num_hidden_layers)]


def derived_inv_freq_sums(config):
    """{name: float32 sum} of the inv_freq buffers of transformers 4.28's state dict, as computed from the config."""
    return {name: rotary_inv_freq(config).sum() for name in inv_freq_names(config)}
