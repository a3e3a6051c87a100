"""Llama checkpoint import, checked against outputs of Hugging Face `transformers`.

The fixture folder contains a tiny random LlamaForCausalLM (grouped-query attention, untied head)
and the logits and greedy tokens that `transformers` computed from it.
"""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from attention import from_pretrained
from attention.pretrained import config_from_hf
from reference_fixtures import FIXTURES_DIR, skip_without

FIXTURE = FIXTURES_DIR / "hf_llama_tiny"

pytestmark = skip_without(FIXTURE)


@nnx.jit
def forward(model, tokens):
    return model(tokens)


@nnx.jit
def prefill(model, tokens, cache):
    return model.prefill(tokens, cache)


@nnx.jit
def step(model, token, cache):
    return model.step(token, cache)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE / "reference.npz"))


@pytest.fixture(scope="module")
def model():
    return from_pretrained(FIXTURE)


def greedy_decode(model, prompt, num_new_tokens):
    """Prefill the prompt, then feed back the argmax token; return prompt + new tokens."""
    cache = model.init_cache(prompt.shape[0], prompt.shape[1] + num_new_tokens)
    logits, cache = prefill(model, jnp.asarray(prompt), cache)
    token = jnp.argmax(logits[:, -1], axis=-1)
    tokens = [token]
    for _ in range(num_new_tokens - 1):
        logits, cache = step(model, token, cache)
        token = jnp.argmax(logits, axis=-1)
        tokens.append(token)
    return np.concatenate([prompt, np.stack(tokens, axis=1)], axis=1)


@pytest.mark.parametrize("index", [0, 1])
def test_logits_match_reference(model, reference, index):
    logits = forward(model, jnp.asarray(reference[f"input_ids_{index}"]))

    np.testing.assert_allclose(logits, reference[f"logits_{index}"], atol=1e-4, rtol=0)


def test_cached_greedy_decoding_matches_reference(model, reference):
    prompt, expected = reference["greedy_prompt"], reference["greedy_output"]

    output = greedy_decode(model, prompt, expected.shape[1] - prompt.shape[1])

    np.testing.assert_array_equal(output, expected)


def test_bfloat16_cached_decoding_picks_full_forward_tokens(reference):
    # Teacher-forced on the reference's greedy output: at every position the cached path in
    # bfloat16 chooses the same next token as the full forward pass in bfloat16.
    model = from_pretrained(FIXTURE, dtype=jnp.bfloat16)
    tokens = jnp.asarray(reference["greedy_output"])
    prompt_len = reference["greedy_prompt"].shape[1]

    cache = model.init_cache(1, tokens.shape[1])
    logits, cache = prefill(model, tokens[:, :prompt_len], cache)
    cached_tokens = [int(jnp.argmax(logits[0, -1]))]
    for i in range(prompt_len, tokens.shape[1] - 1):
        logits, cache = step(model, tokens[:, i], cache)
        cached_tokens.append(int(jnp.argmax(logits[0])))
    full_tokens = np.argmax(forward(model, tokens)[0, prompt_len - 1:-1], axis=-1)

    assert cached_tokens == full_tokens.tolist()


def test_import_reads_grouped_query_config(model):
    config = model.blocks[0].config

    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert config.norm_eps == 1e-6
    assert config.tie_embeddings is False
    assert model.head is not None


# --- config translation --------------------------------------------------------------------


def fixture_config():
    return json.loads((FIXTURE / "config.json").read_text())


def test_config_reads_top_level_rope_theta():
    hf = fixture_config()
    del hf["rope_parameters"]
    hf["rope_theta"] = 500000.0

    assert config_from_hf(hf).rope_base == 500000.0


def test_config_reads_rope_theta_in_rope_parameters():
    hf = fixture_config()
    hf["rope_parameters"]["rope_theta"] = 1234.0

    assert config_from_hf(hf).rope_base == 1234.0


@pytest.mark.parametrize("field", ["rope_parameters", "rope_scaling"])
def test_config_rejects_rope_scaling(field):
    hf = fixture_config()
    hf[field] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}

    with pytest.raises(ValueError, match=f"{field}.rope_type='linear'.*Allowed"):
        config_from_hf(hf)


def test_config_rejects_unsupported_model_type():
    hf = {**fixture_config(), "model_type": "gpt2"}

    with pytest.raises(ValueError, match="model_type='gpt2'.*Allowed"):
        config_from_hf(hf)


def test_config_reads_biases_and_head_dim():
    hf = {**fixture_config(), "attention_bias": True, "mlp_bias": True, "head_dim": 32,
          "tie_word_embeddings": True}

    config = config_from_hf(hf)

    assert config.attention_bias is True
    assert config.mlp_bias is True
    assert config.tie_embeddings is True
    assert config.head_dim == 32


# --- checkpoint errors ---------------------------------------------------------------------


def write_checkpoint(folder, *, config_changes=None, tensor_changes=None):
    """Copy the fixture into `folder`, changing config fields and tensors (None removes one)."""
    config = {**fixture_config(), **(config_changes or {})}
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(FIXTURE / "model.safetensors")
    for name, value in (tensor_changes or {}).items():
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_import_rejects_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json not found"):
        from_pretrained(tmp_path)


def test_import_rejects_folder_without_weights(tmp_path):
    shutil.copy(FIXTURE / "config.json", tmp_path / "config.json")

    with pytest.raises(ValueError, match="model.safetensors not found"):
        from_pretrained(tmp_path)


def test_import_rejects_missing_tensor(tmp_path):
    folder = write_checkpoint(tmp_path, tensor_changes={"model.layers.1.mlp.up_proj.weight": None})

    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        from_pretrained(folder)


def test_import_rejects_misshaped_tensor(tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    folder = write_checkpoint(tmp_path, tensor_changes={name: np.zeros((64, 64), np.float32)})

    with pytest.raises(ValueError, match=rf"'{name}' has shape \(64, 64\), expected \(32, 64\)"):
        from_pretrained(folder)


def test_import_rejects_unexpected_tensor(tmp_path):
    name = "model.layers.0.self_attn.q_norm.weight"
    folder = write_checkpoint(tmp_path, tensor_changes={name: np.ones((16,), np.float32)})

    with pytest.raises(ValueError, match="unexpected tensors.*q_norm"):
        from_pretrained(folder)


def test_import_requires_bias_tensors_when_config_has_biases(tmp_path):
    folder = write_checkpoint(tmp_path, config_changes={"attention_bias": True})

    with pytest.raises(ValueError, match="missing tensor 'model.layers.0.self_attn.q_proj.bias'"):
        from_pretrained(folder)


def test_import_with_tied_embeddings_ignores_head_tensor(tmp_path, reference):
    # With a tied head the logits use the embedding table: lm_head.weight is ignored.
    folder = write_checkpoint(tmp_path, config_changes={"tie_word_embeddings": True},
                              tensor_changes={"lm_head.weight": np.zeros((256, 64), np.float32)})

    model = from_pretrained(folder)

    assert model.head is None
    logits = forward(model, jnp.asarray(reference["greedy_prompt"]))
    assert np.abs(np.asarray(logits)).max() > 0.1
