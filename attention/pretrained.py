"""Import of Llama-style checkpoints in the Hugging Face layout (config.json + model.safetensors).

Weights are read with `safetensors.numpy`, so PyTorch is not needed. The parameter names and the
config fields are those written by `transformers` `LlamaForCausalLM.save_pretrained`.
"""

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from attention.config import TransformerConfig
from attention.transformer import build_language_model
from models.lm import LanguageModel

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ACTIVATIONS = ("silu",)
SUPPORTED_ROPE_TYPES = ("default",)


def from_pretrained(path: str | Path, *, dtype=jnp.float32) -> LanguageModel:
    """Build a Transformer++ language model with the weights of a Llama checkpoint folder.

    `dtype` is the compute dtype, and parameters are stored in float32. Raises ValueError for a
    missing config.json or model.safetensors, unsupported settings, and missing, unexpected or
    misshaped tensors, naming the field or tensor.
    """
    folder = Path(path)
    config = config_from_hf(_read_json(folder / "config.json"), dtype=dtype)

    weights_path = folder / "model.safetensors"
    if not weights_path.is_file():
        raise ValueError(f"model.safetensors not found in {folder}")
    tensors = load_file(weights_path)

    model = build_language_model(config, rngs=nnx.Rngs(0))
    _load_weights(model, config, tensors)
    return model


def config_from_hf(hf: dict[str, Any], *, dtype=jnp.float32) -> TransformerConfig:
    """Translate a Hugging Face Llama config dict into a `TransformerConfig`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json model_type={model_type!r} is not supported. Allowed: "
            f"{SUPPORTED_MODEL_TYPES}")
    activation = hf.get("hidden_act", "silu")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"config.json hidden_act={activation!r} is not supported. Allowed: "
            f"{SUPPORTED_ACTIVATIONS}")

    num_heads = _required(hf, "num_attention_heads")
    d_model = _required(hf, "hidden_size")
    return TransformerConfig(
        vocab_size=_required(hf, "vocab_size"),
        d_model=d_model,
        num_layers=_required(hf, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or d_model // num_heads,
        ffn_dim=_required(hf, "intermediate_size"),
        flavour="transformer++",
        positions="rope",
        rope_base=_rope_base(hf),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        param_dtype=jnp.float32,
    )


def _rope_base(hf: dict[str, Any]) -> float:
    """Return rope_theta, top-level or in `rope_parameters`, after checking the RoPE type.

    `transformers` 5 writes `rope_parameters` {rope_theta, rope_type}; older versions write a
    top-level `rope_theta` and an optional `rope_scaling` dict.
    """
    for field in ("rope_parameters", "rope_scaling"):
        parameters = hf.get(field) or {}
        rope_type = parameters.get("rope_type", parameters.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"config.json {field}.rope_type={rope_type!r} is not supported. Allowed: "
                f"{SUPPORTED_ROPE_TYPES} (RoPE scaling is not implemented)")

    parameters = hf.get("rope_parameters") or {}
    return float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _required(hf: dict[str, Any], field: str) -> Any:
    if field not in hf:
        raise ValueError(f"config.json has no field {field!r}, which a Llama config needs")
    return hf[field]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config.json not found in {path.parent}")
    with path.open(encoding="utf-8") as file:
        return json.load(file)


def _expected_tensors(model: LanguageModel, config: TransformerConfig
                      ) -> dict[str, tuple[nnx.Param, bool]]:
    """Map each checkpoint tensor name to the parameter it fills and whether to transpose it.

    Hugging Face stores linear weights as (out, in), and nnx.Linear kernels are (in, out).
    """
    expected = {"model.embed_tokens.weight": (model.embedding.embedding, False),
                "model.norm.weight": (model.final_norm.scale, False)}
    if model.head is not None:
        expected["lm_head.weight"] = (model.head.kernel, True)

    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        expected[prefix + "input_layernorm.weight"] = (block.attention_norm.scale, False)
        expected[prefix + "post_attention_layernorm.weight"] = (block.ffn_norm.scale, False)
        linears = {
            "self_attn.q_proj": (block.attention.query_proj, config.attention_bias),
            "self_attn.k_proj": (block.attention.key_proj, config.attention_bias),
            "self_attn.v_proj": (block.attention.value_proj, config.attention_bias),
            "self_attn.o_proj": (block.attention.out_proj, config.attention_bias),
            "mlp.gate_proj": (block.feed_forward.gate_proj, config.mlp_bias),
            "mlp.up_proj": (block.feed_forward.up_proj, config.mlp_bias),
            "mlp.down_proj": (block.feed_forward.down_proj, config.mlp_bias),
        }
        for name, (linear, has_bias) in linears.items():
            expected[f"{prefix}{name}.weight"] = (linear.kernel, True)
            if has_bias:
                expected[f"{prefix}{name}.bias"] = (linear.bias, False)
    return expected


def _load_weights(model: LanguageModel, config: TransformerConfig,
                  tensors: dict[str, np.ndarray]) -> None:
    expected = _expected_tensors(model, config)

    # Older checkpoints store the RoPE frequencies, which are recomputed here. A tied model's
    # head is the embedding table, so a stored copy of it is not needed.
    ignored = [name for name in tensors if name.endswith("rotary_emb.inv_freq")]
    if config.tie_embeddings:
        ignored.append("lm_head.weight")
    unexpected = sorted(set(tensors) - set(expected) - set(ignored))
    if unexpected:
        raise ValueError(f"model.safetensors has unexpected tensors {unexpected[:5]}. "
                         f"This importer maps only Llama (LlamaForCausalLM) parameters")

    for name, (param, transpose) in expected.items():
        if name not in tensors:
            raise ValueError(f"model.safetensors is missing tensor {name!r}")
        value = tensors[name].T if transpose else tensors[name]
        if value.shape != param.shape:
            stored_shape = tensors[name].shape
            expected_shape = param.shape[::-1] if transpose else param.shape
            raise ValueError(
                f"tensor {name!r} has shape {stored_shape}, expected {expected_shape} "
                f"from config.json")
        param[...] = jnp.asarray(value, dtype=param.dtype)
