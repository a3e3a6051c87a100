"""Load Mamba checkpoints published in the Hugging Face layout (`config.json` + `model.safetensors`).

This is the layout of state-spaces/mamba-130m-hf through mamba-2.8b-hf, written by the
`transformers` class `MambaForCausalLM`. Tensors are read with `safetensors.numpy`, so PyTorch
is not needed. The file names its tensors as follows, with N the layer index.

  backbone.embeddings.weight                     (vocab, d)
  backbone.layers.N.norm.weight                  (d,)
  backbone.layers.N.mixer.in_proj.weight         (2e, d)      .bias (2e,) when use_bias
  backbone.layers.N.mixer.conv1d.weight          (e, 1, w)    .bias (e,) when use_conv_bias
  backbone.layers.N.mixer.x_proj.weight          (r + 2n, e)
  backbone.layers.N.mixer.dt_proj.weight         (e, r)       .bias (e,)
  backbone.layers.N.mixer.A_log                  (e, n)
  backbone.layers.N.mixer.D                      (e,)
  backbone.layers.N.mixer.out_proj.weight        (d, e)       .bias (d,) when use_bias
  backbone.norm_f.weight                         (d,)
  lm_head.weight                                 (vocab, d), only when tie_word_embeddings is false

PyTorch `Linear` stores (out, in), the transpose of an `nnx.Linear` kernel.
"""

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from models.lm import LanguageModel
from ssm.mamba import MambaConfig, build_language_model

SUPPORTED_MODEL_TYPES = ("mamba",)


def _read_config(path: str) -> dict[str, Any]:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(
            f"config.json not found in {path!r}; expected a Hugging Face Mamba checkpoint folder "
            "with config.json and model.safetensors")
    with open(config_path, encoding="utf-8") as file:
        return json.load(file)


def _require_field(hf_config: dict[str, Any], *names: str) -> Any:
    """Return the value of the first of `names` that the config contains."""
    for name in names:
        if name in hf_config:
            return hf_config[name]
    alternatives = f" (or {', '.join(names[1:])})" if len(names) > 1 else ""
    raise ValueError(f"config.json is missing the field {names[0]!r}{alternatives}")


def mamba_config_from_hf(hf_config: dict[str, Any], *, scan: str = "associative",
                         chunk_size: int = 256, dtype=jnp.float32) -> MambaConfig:
    """Translate a `transformers` MambaConfig dictionary into a `MambaConfig`."""
    model_type = hf_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")

    d_model = _require_field(hf_config, "hidden_size", "d_model")
    expand = hf_config.get("expand", 2)
    intermediate_size = hf_config.get("intermediate_size")
    if intermediate_size is not None:
        if intermediate_size % d_model != 0:
            raise ValueError(
                f"config.json intermediate_size must be a multiple of hidden_size={d_model}, "
                f"got {intermediate_size}")
        expand = intermediate_size // d_model

    # Every residual stream here is float32, so residual_in_fp32 = false (a bfloat16 residual
    # in the reference) is loaded as well, with the more precise residual.
    return MambaConfig(
        vocab_size=_require_field(hf_config, "vocab_size"),
        d_model=d_model,
        num_layers=_require_field(hf_config, "num_hidden_layers", "n_layer"),
        d_state=hf_config.get("state_size", 16),
        expand=expand,
        d_conv=hf_config.get("conv_kernel", 4),
        dt_rank=hf_config.get("time_step_rank", "auto"),
        dt_min=hf_config.get("time_step_min", 0.001),
        dt_max=hf_config.get("time_step_max", 0.1),
        dt_init_floor=hf_config.get("time_step_floor", 1e-4),
        conv_bias=hf_config.get("use_conv_bias", True),
        bias=hf_config.get("use_bias", False),
        tie_embeddings=hf_config.get("tie_word_embeddings", True),
        pad_vocab_size_multiple=hf_config.get("pad_vocab_size_multiple", 8),
        norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
        scan=scan,
        chunk_size=chunk_size,
        dtype=dtype,
    )


class _TensorReader:
    """Hands out checkpoint tensors by name, checking that each exists and has the expected shape."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            raise ValueError(f"model.safetensors is missing the tensor {name!r} (expected shape {shape})")
        tensor = self.tensors[name]
        if tensor.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {tensor.shape}, expected {shape}")
        return tensor


def _assign(param: nnx.Param, value: np.ndarray) -> None:
    param.value = jnp.asarray(value, dtype=param.value.dtype)


def _load_embedding(model: LanguageModel, table: np.ndarray) -> None:
    """Copy a (vocab, d) table into the model's table, zero-filling the padded rows."""
    padded = np.zeros((model.padded_vocab_size, table.shape[1]), np.float32)
    padded[: table.shape[0]] = table
    _assign(model.embedding.embedding, padded)


def _load_mixer(mixer, reader: _TensorReader, prefix: str, config: MambaConfig) -> None:
    d, e, n, w = config.d_model, config.d_inner, config.d_state, config.d_conv
    r = config.resolved_dt_rank

    _assign(mixer.in_proj.kernel, reader.take(prefix + "in_proj.weight", (2 * e, d)).T)
    if config.bias:
        _assign(mixer.in_proj.bias, reader.take(prefix + "in_proj.bias", (2 * e,)))
    conv_weight = reader.take(prefix + "conv1d.weight", (e, 1, w))
    _assign(mixer.conv1d.kernel, conv_weight[:, 0, :].T)
    if config.conv_bias:
        _assign(mixer.conv1d.bias, reader.take(prefix + "conv1d.bias", (e,)))
    _assign(mixer.x_proj.kernel, reader.take(prefix + "x_proj.weight", (r + 2 * n, e)).T)
    _assign(mixer.dt_proj.kernel, reader.take(prefix + "dt_proj.weight", (e, r)).T)
    _assign(mixer.dt_proj.bias, reader.take(prefix + "dt_proj.bias", (e,)))
    _assign(mixer.A_log, reader.take(prefix + "A_log", (e, n)))
    _assign(mixer.D, reader.take(prefix + "D", (e,)))
    _assign(mixer.out_proj.kernel, reader.take(prefix + "out_proj.weight", (d, e)).T)
    if config.bias:
        _assign(mixer.out_proj.bias, reader.take(prefix + "out_proj.bias", (d,)))


def from_pretrained(path: str, *, scan: str = "associative", chunk_size: int = 256,
                    dtype=jnp.float32) -> LanguageModel:
    """Load a Hugging Face Mamba checkpoint folder as a `LanguageModel`.

    Args:
      path: folder with `config.json` and `model.safetensors`.
      scan: selective scan implementation, one of `ssm.scan.SCAN_MODES`.
      chunk_size: time steps per chunk when `scan` is "chunked".
      dtype: compute dtype; parameters are kept in float32.

    Calling the model on int32 token ids (b, t) returns float32 logits (b, t, vocab_size).
    Raises ValueError for a missing config.json or weights file, an unsupported model_type,
    and missing or misshaped tensors.
    """
    hf_config = _read_config(path)
    config = mamba_config_from_hf(hf_config, scan=scan, chunk_size=chunk_size, dtype=dtype)

    weights_path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights_path):
        raise ValueError(f"model.safetensors not found in {path!r}")
    reader = _TensorReader(load_file(weights_path))

    # The random initialisation is overwritten tensor by tensor below.
    model = build_language_model(config, rngs=nnx.Rngs(0))
    d = config.d_model

    embedding_rows = reader.tensors.get("backbone.embeddings.weight", np.zeros((0, 0))).shape[0]
    if embedding_rows not in (config.vocab_size, model.padded_vocab_size):
        embedding_rows = config.vocab_size  # let `take` report the expected shape
    _load_embedding(model, reader.take("backbone.embeddings.weight", (embedding_rows, d)))

    for index, block in enumerate(model.blocks):
        prefix = f"backbone.layers.{index}."
        _assign(block.norm.scale, reader.take(prefix + "norm.weight", (d,)))
        _load_mixer(block.mixer, reader, prefix + "mixer.", config)

    _assign(model.final_norm.scale, reader.take("backbone.norm_f.weight", (d,)))
    if not config.tie_embeddings:
        head = reader.take("lm_head.weight", (embedding_rows, d))
        padded = np.zeros((model.padded_vocab_size, d), np.float32)
        padded[:embedding_rows] = head
        _assign(model.head.kernel, padded.T)
    return model
