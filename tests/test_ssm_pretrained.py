"""Loading a Hugging Face Mamba checkpoint: logits and greedy decoding against `transformers`.

The fixture folder contains a tiny random `MambaForCausalLM` checkpoint and the logits and greedy
tokens that the `transformers` PyTorch implementation computed from it.
"""

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from reference_fixtures import FIXTURES_DIR, skip_without
from ssm import SCAN_MODES, from_pretrained, mamba_config_from_hf

FIXTURE = str(FIXTURES_DIR / "hf_mamba_tiny")
# Agreement a faithful float32 implementation reaches with the PyTorch reference.
LOGITS_ATOL = 1e-4

pytestmark = skip_without(Path(FIXTURE))


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


def jitted_forward(model):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    return lambda tokens: forward(state, jnp.asarray(tokens))


def copy_checkpoint(tmp_path, *, config_changes=None, tensor_changes=None):
    """Copy the fixture into tmp_path with some config fields and tensors replaced or removed.

    A value of None removes the field or tensor.
    """
    with open(os.path.join(FIXTURE, "config.json"), encoding="utf-8") as file:
        config = json.load(file)
    for name, value in (config_changes or {}).items():
        if value is None:
            config.pop(name, None)
        else:
            config[name] = value
    with open(tmp_path / "config.json", "w", encoding="utf-8") as file:
        json.dump(config, file)

    tensors = load_file(os.path.join(FIXTURE, "model.safetensors"))
    for name, value in (tensor_changes or {}).items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return str(tmp_path)


@pytest.mark.parametrize("scan", SCAN_MODES)
def test_logits_match_reference(reference, scan):
    # chunk_size 16 divides length 64 but not 37, so the chunked scan also pads a last chunk.
    forward = jitted_forward(from_pretrained(FIXTURE, scan=scan, chunk_size=16))

    for index in (0, 1):
        logits = forward(reference[f"input_ids_{index}"])
        expected = reference[f"logits_{index}"]
        assert logits.dtype == jnp.float32
        assert logits.shape == expected.shape
        np.testing.assert_allclose(logits, expected, atol=LOGITS_ATOL, rtol=0,
                                   err_msg=f"logits_{index}")


def test_bfloat16_compute_logits_stay_close(reference):
    # bfloat16 keeps 8 bits of mantissa and these logits reach about 7 in size. The error was
    # 0.03 absolute on a CPU, so 0.1 leaves room for other backends' rounding.
    model = from_pretrained(FIXTURE, dtype=jnp.bfloat16)

    logits = jitted_forward(model)(reference["input_ids_1"])

    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, reference["logits_1"], atol=0.1, rtol=0)


def test_greedy_decoding_with_cache_matches_reference(reference):
    model = from_pretrained(FIXTURE)
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda state, tokens, cache: nnx.merge(graphdef, state).prefill(tokens, cache))
    step = jax.jit(lambda state, token, cache: nnx.merge(graphdef, state).step(token, cache))
    prompt = jnp.asarray(reference["greedy_prompt"])
    expected = reference["greedy_output"]

    logits, cache = prefill(state, prompt, model.init_cache(1, expected.shape[1]))
    tokens = [int(t) for t in prompt[0]]
    next_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    while len(tokens) < expected.shape[1]:
        tokens.append(int(next_token[0]))
        logits, cache = step(state, next_token, cache)
        next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    assert tokens == expected[0].tolist()


def test_untied_head_and_auto_dt_rank_load(reference, tmp_path):
    # Given the fixture rewritten as an untied checkpoint whose head equals the embedding,
    # with time_step_rank "auto" (ceil(64 / 16) = 4, its actual rank) and no intermediate_size.
    embedding = load_file(os.path.join(FIXTURE, "model.safetensors"))["backbone.embeddings.weight"]
    path = copy_checkpoint(
        tmp_path,
        config_changes={"tie_word_embeddings": False, "time_step_rank": "auto",
                        "intermediate_size": None},
        tensor_changes={"lm_head.weight": embedding.copy()})

    model = from_pretrained(path)

    assert model.head is not None
    np.testing.assert_allclose(jitted_forward(model)(reference["input_ids_0"]),
                               reference["logits_0"], atol=LOGITS_ATOL, rtol=0)


def test_config_translation_reads_fixture_fields():
    with open(os.path.join(FIXTURE, "config.json"), encoding="utf-8") as file:
        config = mamba_config_from_hf(json.load(file))

    assert (config.vocab_size, config.d_model, config.num_layers) == (256, 64, 2)
    assert (config.d_state, config.d_inner, config.d_conv) == (16, 128, 4)
    assert config.resolved_dt_rank == 4
    assert (config.conv_bias, config.bias, config.tie_embeddings) == (True, False, True)
    assert config.norm_eps == 1e-5


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"config.json not found in .*"):
        from_pretrained(str(tmp_path))


def test_unsupported_model_type_is_rejected(tmp_path):
    shutil.copy(os.path.join(FIXTURE, "config.json"), tmp_path / "config.json")
    with open(tmp_path / "config.json", encoding="utf-8") as file:
        config = json.load(file)
    config["model_type"] = "mamba2"
    with open(tmp_path / "config.json", "w", encoding="utf-8") as file:
        json.dump(config, file)

    with pytest.raises(ValueError, match=r"model_type must be one of \('mamba',\), got 'mamba2'"):
        from_pretrained(str(tmp_path))


def test_missing_tensor_is_rejected(tmp_path):
    path = copy_checkpoint(tmp_path, tensor_changes={"backbone.layers.1.mixer.A_log": None})

    with pytest.raises(ValueError, match=r"missing the tensor 'backbone.layers.1.mixer.A_log'"):
        from_pretrained(path)


def test_misshaped_tensor_is_rejected(tmp_path):
    path = copy_checkpoint(
        tmp_path, tensor_changes={"backbone.layers.0.mixer.x_proj.weight": np.zeros((128, 36))})

    with pytest.raises(ValueError, match=r"x_proj.weight' has shape \(128, 36\), expected \(36, 128\)"):
        from_pretrained(path)
