"""Build a language model from a config section that names its architecture.

A model config is a mapping (a `ml_collections.ConfigDict` from `configs/` or a plain dict) with
an `architecture` key and the fields of that architecture's config dataclass:
`ssm.MambaConfig` for "mamba" and `attention.TransformerConfig` for "transformer".
"""

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.lm import LanguageModel

# Architecture name -> (module, config dataclass name). Modules are imported on first use, so
# building one architecture does not import the other.
ARCHITECTURES = {
    "mamba": ("ssm", "MambaConfig"),
    "transformer": ("attention", "TransformerConfig"),
}
DTYPE_FIELDS = ("dtype", "param_dtype")
DTYPE_NAMES = ("float32", "bfloat16")


def _architecture_module(architecture: Any):
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown model architecture {architecture!r}; allowed: "
                         f"{', '.join(repr(name) for name in ARCHITECTURES)}")
    module_name, _ = ARCHITECTURES[architecture]
    return importlib.import_module(module_name)


def model_dataclass(model_config: Mapping[str, Any]):
    """Return the architecture's config dataclass built from the other fields of `model_config`.

    Dtype fields may be the names "float32" or "bfloat16"; they are passed on as jnp dtypes.
    """
    fields = dict(model_config.items())
    if "architecture" not in fields:
        raise ValueError(f"model config has no 'architecture' field; allowed architectures: "
                         f"{', '.join(repr(name) for name in ARCHITECTURES)}")
    architecture = fields.pop("architecture")
    module = _architecture_module(architecture)
    config_class = getattr(module, ARCHITECTURES[architecture][1])

    allowed = [field.name for field in dataclasses.fields(config_class)]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise ValueError(f"unknown model field(s) {', '.join(unknown)} for architecture "
                         f"{architecture!r}; allowed fields: {', '.join(allowed)}")

    for name in DTYPE_FIELDS:
        if isinstance(fields.get(name), str):
            if fields[name] not in DTYPE_NAMES:
                raise ValueError(f"invalid model field {name}={fields[name]!r}; allowed: "
                                 f"{', '.join(DTYPE_NAMES)}")
            fields[name] = jnp.dtype(fields[name])
    # A command-line override of a field whose default is a string ("auto") stays a string.
    if isinstance(fields.get("dt_rank"), str) and fields["dt_rank"].isdigit():
        fields["dt_rank"] = int(fields["dt_rank"])
    return config_class(**fields)


def build_model(model_config: Mapping[str, Any], *, rngs: nnx.Rngs) -> LanguageModel:
    """Build the `LanguageModel` that `model_config["architecture"]` names, with fresh parameters."""
    dataclass_config = model_dataclass(model_config)
    module = _architecture_module(model_config["architecture"])
    return module.build_language_model(dataclass_config, rngs=rngs)


def count_parameters(model_config: Mapping[str, Any]) -> int:
    """Count the model's parameters from shapes alone (nothing is allocated or initialised)."""
    abstract_model = nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(0)))
    _, params = nnx.split(abstract_model, nnx.Param)
    return sum(leaf.size for leaf in jax.tree.leaves(params))
