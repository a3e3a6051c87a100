"""Tests of the benchmarks' scoring and arithmetic: chunked loss, bytes moved, bandwidth and FLOPs.

The tests replace timings and reference peaks with fixed numbers, so no test measures the machine
and each expected value is a formula written out here.
"""

import json

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx

from benchmarks import common, long_context, model_configs, scan, train_step
from training import host_memory


def test_long_context_chunks_score_every_next_token():
    config = model_configs.mamba_config(d_model=16, num_layers=2, scan="sequential")
    model = model_configs.build(config)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 33), np.int32)

    # By hand: the log-softmax of one forward pass over the first 32 tokens, at each next token.
    forward = nnx.jit(lambda model, tokens_bt: model(tokens_bt))
    logits = np.asarray(forward(model, tokens[:, :32]), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1).sum()

    graphdef, state = nnx.split(model)
    cache = model.init_cache(2, 32)
    total = 0.0
    for begin in range(0, 32, 8):
        loss, cache = long_context.score_chunk(graphdef, state, tokens[:, begin:begin + 8],
                                               tokens[:, begin + 8], cache)
        total += float(loss)
    assert total == pytest.approx(expected, rel=1e-5)


def scan_bytes_by_hand(b, t, e, n, *, backward):
    """Return the float32 bytes of the arrays that the scan reads and writes, one term per array."""
    x = dt = y = dy = dx = ddt = b * t * e
    B = C = dB = dC = b * t * n
    A = dA = e * n
    forward = x + dt + B + C + A + y
    if not backward:
        return 4 * forward
    backward_reads = x + dt + B + C + A + dy
    backward_writes = dx + ddt + dB + dC + dA
    return 4 * (forward + backward_reads + backward_writes)


def test_scan_minimum_bytes_counts_each_array_once():
    assert scan.minimum_bytes(2, 5, 3, 4, backward=False) == scan_bytes_by_hand(
        2, 5, 3, 4, backward=False)
    assert scan.minimum_bytes(2, 5, 3, 4, backward=True) == scan_bytes_by_hand(
        2, 5, 3, 4, backward=True)


def test_scan_rows_divide_bytes_by_time(monkeypatch):
    seconds, copy_bytes_per_s = 0.004, 2e9
    monkeypatch.setattr(common, "copy_bandwidth", lambda: copy_bytes_per_s)
    monkeypatch.setattr(common, "median_seconds", lambda fn, repeats: seconds)
    b, t, e, n = 2, 8, 3, 4
    rows, bandwidth = scan.run([t], ["sequential"], batch=b, d_inner=e, d_state=n, chunk_size=4,
                               repeats=1)
    assert bandwidth == copy_bytes_per_s
    assert [row["pass"] for row in rows] == ["forward", "forward+backward"]

    for row in rows:
        num_bytes = scan_bytes_by_hand(b, t, e, n, backward=row["pass"] == "forward+backward")
        assert row["ms"] == pytest.approx(1e3 * seconds)
        assert row["min_mib"] == pytest.approx(num_bytes / 2**20)
        assert row["gb_per_s"] == pytest.approx(num_bytes / seconds / 1e9)
        assert row["fraction_of_copy"] == pytest.approx(num_bytes / seconds / copy_bytes_per_s)
        assert row["state_mib"] == pytest.approx(4 * b * t * e * n / 2**20)


def parameter_count(config) -> int:
    """Count the parameters of a built model (model_configs.build) array by array."""
    params = nnx.state(model_configs.build(config), nnx.Param)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def test_model_flops_six_n_plus_attention():
    mamba = model_configs.mamba_config(d_model=16, num_layers=2)
    transformer = model_configs.transformer_config(d_model=16, num_layers=3, num_heads=2)
    assert train_step.model_flops_per_token(mamba, 64) == 6 * parameter_count(mamba)
    # The Transformer adds 12 * layers * t * d_model for its attention scores.
    assert (train_step.model_flops_per_token(transformer, 64)
            == 6 * parameter_count(transformer) + 12 * 3 * 64 * 16)


def test_train_step_mfu_uses_matmul_peak(monkeypatch, tmp_path):
    seconds, peak = 0.5, 4e9
    monkeypatch.setattr(common, "matmul_peak", lambda: peak)
    monkeypatch.setattr(common, "median_seconds", lambda fn, repeats: seconds)
    flag_values = flags.FlagValues()
    train_step.define_flags(flag_values)
    flag_values(["train_step", "--lengths=8", "--tokens_per_batch=16", "--d_model=16",
                 "--num_layers=1", "--num_heads=2", "--repeats=1", f"--out={tmp_path}"])
    monkeypatch.setattr(train_step, "FLAGS", flag_values)
    # The malloc setting would outlive this test in the shared pytest process, and it reads the
    # global --keep_host_memory, which this FlagValues does not hold.
    monkeypatch.setattr(host_memory, "apply_flag", lambda: False)

    train_step.main(["train_step"])
    rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    mamba = model_configs.mamba_config(d_model=16, num_layers=1, scan="sequential")
    transformer = model_configs.matched_transformer_config(mamba, num_heads=2)
    assert [row["model"] for row in rows] == ["mamba", "transformer"]

    for row, config in zip(rows, [mamba, transformer], strict=True):
        flops_per_token = 6 * parameter_count(config)
        if config["architecture"] == "transformer":
            flops_per_token += 12 * config["num_layers"] * 8 * 16
        flops = flops_per_token * 16  # 2 sequences of 8 tokens
        assert row["batch"] == 2
        assert row["tokens_per_s"] == pytest.approx(16 / seconds)
        assert row["model_tflop"] == pytest.approx(flops / 1e12)
        assert row["model_gflop_per_s"] == pytest.approx(flops / seconds / 1e9)
        assert row["mfu"] == pytest.approx(flops / seconds / peak)
