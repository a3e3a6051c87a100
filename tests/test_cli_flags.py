"""Tests of the flag checks of train.py, the benchmark and experiment scripts and training.plot.

A bad flag, path or value must stop a script with one message that names the flag, before any
measurement, evaluation or output file. The checks run in-process on fresh `FlagValues` and on
fake workdirs that contain only the files the checks read. One subprocess per benchmark checks
that the message is the only output. The train.py tests edit copies of configs/mamba_lm.py the
way a user would, and run train.py for each kind of error.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from absl import app, flags
from flax import nnx

from benchmarks import decode, long_context, scan, train_step
from experiments import birth, curves, extrapolate
from models.registry import build_model
from training import config as config_lib
from training import load_config_file, plot
from training.checkpoint import CHECKPOINT_DIR, save_config

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = {"scan": scan, "decode": decode, "train_step": train_step,
              "long_context": long_context}


def parsed_flags(module, *arguments: str) -> flags.FlagValues:
    """Return new flag values with the flags of `module` parsed from `arguments`."""
    flag_values = flags.FlagValues()
    module.define_flags(flag_values)
    flag_values(["program", *arguments])
    return flag_values


def write_records(workdir: Path, records: list[dict]) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record) + "\n" for record in records]
    (workdir / "metrics.jsonl").write_text("".join(lines), encoding="utf-8")


@pytest.fixture
def task_run(tmp_path) -> Path:
    """A workdir of the tiny induction-heads run: config, one checkpoint folder, val records."""
    workdir = tmp_path / "induction"
    workdir.mkdir()
    save_config(workdir, load_config_file(str(REPO / "configs" / "induction_heads.py") + ":tiny"))
    (workdir / CHECKPOINT_DIR / "4").mkdir(parents=True)
    write_records(workdir, [{"step": step, "split": "val", "loss": 1.0 / step,
                             "accuracy": 0.1 * step} for step in (2, 4)])
    return workdir


@pytest.fixture
def text_run(tmp_path) -> Path:
    """A workdir of a text run: config and training and validation records in bits per byte."""
    workdir = tmp_path / "text"
    workdir.mkdir()
    save_config(workdir, load_config_file(str(REPO / "configs" / "mamba_lm.py") + ":tiny"))
    records = []
    for step in (1, 2, 3, 4):
        records.append({"step": step, "split": "train", "loss": 2.0,
                        "bits_per_byte": 3.0 - step / 4, "tokens": 256 * step,
                        "elapsed_s": 0.5 * step})
    records.append({"step": 4, "split": "val", "loss": 2.0, "bits_per_byte": 2.5})
    write_records(workdir, records)
    return workdir


def probe_record(step: int) -> dict:
    return {"step": step, "split": "val", "loss": 3.0, "accuracy": 0.2,
            "probe/loss_in_context": 3.0 - 0.5 * step, "probe/loss_global_bigram": 2.0,
            "probe/layer0_head0_previous_token": 0.1 * step,
            "probe/layer0_head0_induction": 0.2 * step}


def make_birth_run(workdir: Path, map_steps=(2, 4)) -> Path:
    """Write a birth run with probe records at steps 2 and 4 and maps of one layer, one head."""
    write_records(workdir, [probe_record(2), probe_record(4)])
    maps = workdir / birth.ATTENTION_MAP_DIR
    maps.mkdir()
    weights = np.tril(np.ones((1, 8, 8), np.float32))
    weights /= weights.sum(axis=-1, keepdims=True)
    for step in map_steps:
        np.savez_compressed(maps / f"step_{step:06d}.npz", tokens=np.arange(8), layer0=weights)
    return workdir


# ---- benchmarks

BENCHMARK_ERRORS = [
    ("scan", ["--batch=0"], "--batch must be an integer >= 1, got 0"),
    ("scan", ["--d_inner=0"], "--d_inner must be an integer >= 1, got 0"),
    ("scan", ["--d_state=-1"], "--d_state must be an integer >= 1, got -1"),
    ("scan", ["--chunk_size=0"], "--chunk_size must be an integer >= 1, got 0"),
    ("scan", ["--repeats=0"], "--repeats must be an integer >= 1, got 0"),
    ("scan", ["--lengths=0"], "--lengths must list integers >= 1, got 0"),
    ("scan", ["--lengths=256,-4"], "--lengths must list integers >= 1, got 256,-4"),
    ("scan", ["--lengths=1.5"], "--lengths must be a comma-separated list of integers, got 1.5"),
    ("scan", ["--lengths="], "--lengths is empty"),
    ("scan", ["--modes="],
     "--modes is empty; allowed: associative, sequential, chunked, cpu_kernel"),
    ("scan", ["--modes=fast"], "--modes has unknown modes fast; allowed: associative"),
    ("decode", ["--contexts=0"], "--contexts must list integers >= 1, got 0"),
    ("decode", ["--contexts=big"], "--contexts must be a comma-separated list of integers"),
    ("decode", ["--batch_sizes=0"], "--batch_sizes must list integers >= 1, got 0"),
    ("decode", ["--new_tokens=0"], "--new_tokens must be an integer >= 1, got 0"),
    ("decode", ["--prefill_chunk=0"], "--prefill_chunk must be an integer >= 1, got 0"),
    ("decode", ["--d_model=0"], "--d_model must be an integer >= 1, got 0"),
    ("decode", ["--num_layers=0"], "--num_layers must be an integer >= 1, got 0"),
    ("decode", ["--num_heads=0"], "--num_heads must be an integer >= 1, got 0"),
    ("decode", ["--repeats=0"], "--repeats must be an integer >= 1, got 0"),
    ("decode", ["--num_heads=3"],
     "--num_heads=3 must divide --d_model=256 into heads of an even size"),
    ("train_step", ["--lengths=0"], "--lengths must list integers >= 1, got 0"),
    ("train_step", ["--tokens_per_batch=0"], "--tokens_per_batch must be an integer >= 1, got 0"),
    ("train_step", ["--tokens_per_batch=1000"],
     "--tokens_per_batch=1000 must be a multiple of every length; it is not of 256, 1024, 4096"),
    ("train_step", ["--d_model=0"], "--d_model must be an integer >= 1, got 0"),
    ("train_step", ["--num_layers=0"], "--num_layers must be an integer >= 1, got 0"),
    ("train_step", ["--repeats=0"], "--repeats must be an integer >= 1, got 0"),
    ("train_step", ["--d_model=8", "--num_heads=8"],
     "--num_heads=8 must divide --d_model=8 into heads of an even size (rotary embeddings rotate "
     "channel pairs); allowed: 1, 2, 4"),
    ("train_step", ["--d_model=9", "--num_heads=3"], "--d_model=9 is odd"),
    ("long_context", ["--total_tokens=0"], "--total_tokens must be an integer >= 1, got 0"),
    ("long_context", ["--chunk=0"], "--chunk must be an integer >= 1, got 0"),
    ("long_context", ["--chunk=3"], "--chunk=3 must divide --total_tokens=1048576"),
    ("long_context", ["--d_model=0"], "--d_model must be an integer >= 1, got 0"),
    ("long_context", ["--num_layers=0"], "--num_layers must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("name, arguments, message", BENCHMARK_ERRORS,
                         ids=[f"{name}{''.join(arguments)}" for name, arguments, _ in
                              BENCHMARK_ERRORS])
def test_benchmark_rejects_bad_flag(name, arguments, message, tmp_path):
    out = tmp_path / "out"
    flag_values = parsed_flags(BENCHMARKS[name], f"--out={out}", *arguments)
    with pytest.raises(ValueError, match=re.escape(message)):
        BENCHMARKS[name].check_flags(flag_values, ["program"])
    assert not out.exists()


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_checks_out_before_measuring(name, tmp_path):
    module = BENCHMARKS[name]
    a_file = tmp_path / "file"
    a_file.write_text("kept", encoding="utf-8")
    bad_outs = {"": "--out is empty",
                str(a_file): f"--out={a_file} is a file",
                str(a_file / "results"): f"--out={a_file / 'results'} is under the file {a_file}"}
    for out, message in bad_outs.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            module.check_flags(parsed_flags(module, f"--out={out}"), ["program"])
    assert a_file.read_text(encoding="utf-8") == "kept"

    out = tmp_path / "new" / "results"
    module.check_flags(parsed_flags(module, f"--out={out}"), ["program"])
    assert out.is_dir()


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_rejects_positional_argument(name, tmp_path):
    module = BENCHMARKS[name]
    flag_values = parsed_flags(module, f"--out={tmp_path}")
    with pytest.raises(ValueError, match="unexpected arguments: 1024"):
        module.check_flags(flag_values, ["program", "1024"])


def test_benchmark_returns_parsed_lists(tmp_path):
    lengths = scan.check_flags(parsed_flags(scan, f"--out={tmp_path}", "--lengths=16,64"),
                               ["program"])
    assert lengths == [16, 64]
    contexts, batch_sizes = decode.check_flags(
        parsed_flags(decode, f"--out={tmp_path}", "--contexts=8,32", "--batch_sizes=2"),
        ["program"])
    assert contexts == [8, 32]
    assert batch_sizes == [2]


# Each command fails in its flag check, which runs before JAX computes anything.
BENCHMARK_COMMANDS = {"scan": "--batch=0", "decode": "--d_model=0", "train_step": "--d_model=0",
                      "long_context": "--d_model=0"}


@pytest.mark.parametrize("name", BENCHMARK_COMMANDS)
def test_benchmark_command_prints_only_the_error(name, tmp_path):
    argument = BENCHMARK_COMMANDS[name]
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", argument, f"--out={tmp_path / 'out'}"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=60, check=False)
    flag = argument.split("=")[0]
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"benchmarks.{name}: error: {flag} must be an integer >= 1, got 0\n"
    assert not (tmp_path / "out").exists()


# ---- experiments.extrapolate

def check_extrapolate(workdirs: str, output_dir: Path, *arguments: str) -> list[int]:
    flag_values = parsed_flags(extrapolate, f"--workdirs={workdirs}",
                               f"--output_dir={output_dir}", *arguments)
    return extrapolate.check_flags(flag_values, ["program"])


EXTRAPOLATE_FLAG_ERRORS = [
    (["--lengths=2"], "--lengths=2 is too short for the task 'induction_heads'"),
    (["--lengths=2"], "seq_len must be an integer >= 3, got 2"),
    (["--lengths=0"], "--lengths must list integers >= 1, got 0"),
    (["--lengths=64,x"], "--lengths must be a comma-separated list of integers, got 64,x"),
    (["--lengths="], "--lengths is empty"),
    (["--batch_size=0"], "--batch_size must be an integer >= 1, got 0"),
    (["--max_sequences=0"], "--max_sequences must be an integer >= 1, got 0"),
    (["--min_sequences=0"], "--min_sequences must be an integer >= 1, got 0"),
    (["--chunk_len=0"], "--chunk_len must be an integer >= 1, got 0"),
    (["--max_tokens=0"], "--max_tokens must be an integer >= 1, got 0"),
    (["--min_sequences=8", "--max_sequences=4"],
     "--min_sequences=8 must not exceed --max_sequences=4"),
    (["--max_attention_gib=0"], "--max_attention_gib must be > 0, got 0.0"),
    (["--max_attention_gib=-1"], "--max_attention_gib must be > 0, got -1.0"),
    (["--seed=-1"], "--seed must be an integer >= 0, got -1"),
]


@pytest.mark.parametrize("arguments, message", EXTRAPOLATE_FLAG_ERRORS,
                         ids=["".join(arguments) for arguments, _ in EXTRAPOLATE_FLAG_ERRORS])
def test_extrapolate_rejects_bad_flag(arguments, message, task_run, tmp_path):
    output_dir = tmp_path / "results"
    with pytest.raises(app.UsageError, match=re.escape(message)):
        check_extrapolate(str(task_run), output_dir, *arguments)
    assert not output_dir.exists()


def test_extrapolate_rejects_bad_workdirs(task_run, text_run, tmp_path):
    output_dir = tmp_path / "results"
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    no_checkpoint = tmp_path / "no_checkpoint"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.json").write_bytes((task_run / "config.json").read_bytes())
    cases = {
        "": "--workdirs is empty",
        str(tmp_path / "absent"): "not found or not a folder",
        str(no_config): "no config.json in workdir",
        str(no_checkpoint): "has no checkpoint under",
        f"{task_run},{text_run}": f"--workdirs: {str(text_run)!r} is a text run",
    }
    for workdirs, message in cases.items():
        with pytest.raises(app.UsageError, match=re.escape(message)):
            check_extrapolate(workdirs, output_dir)
    assert not output_dir.exists()


def test_extrapolate_text_run_message_names_tasks(text_run, tmp_path):
    with pytest.raises(app.UsageError) as raised:
        check_extrapolate(str(text_run), tmp_path / "results")
    message = str(raised.value)
    assert "needs a run of a synthetic task" in message
    assert "induction_heads" in message
    assert "or '' for the text corpus" not in message


def test_extrapolate_rejects_file_output_dir(task_run, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("kept", encoding="utf-8")
    with pytest.raises(app.UsageError, match=re.escape(f"--output_dir={a_file} is a file")):
        check_extrapolate(str(task_run), a_file)
    with pytest.raises(app.UsageError, match=re.escape(f"is under the file {a_file}")):
        check_extrapolate(str(task_run), a_file / "results")
    with pytest.raises(app.UsageError, match="--output_dir is empty"):
        check_extrapolate(str(task_run), "")
    assert a_file.read_text(encoding="utf-8") == "kept"


def test_extrapolate_accepts_task_minimum_length(task_run, tmp_path):
    output_dir = tmp_path / "new" / "results"
    assert check_extrapolate(str(task_run), output_dir, "--lengths=3,64") == [3, 64]
    assert output_dir.is_dir()


# ---- experiments.curves

def check_curves(workdirs: str, output: str | Path, *arguments: str) -> Path:
    flag_values = parsed_flags(curves, f"--workdirs={workdirs}", f"--output={output}",
                               *arguments)
    return curves.check_flags(flag_values, ["program"])


def test_curves_rejects_unknown_metric(task_run, tmp_path):
    with pytest.raises(app.UsageError) as raised:
        check_curves(str(task_run), tmp_path / "c.png", "--metric=acuracy")
    message = str(raised.value)
    assert message.startswith("--metric='acuracy' is not a validation metric of")
    assert message.endswith("allowed (the metrics of every run): accuracy, loss")


def test_curves_rejects_bad_workdirs(task_run, text_run, tmp_path):
    output = tmp_path / "results" / "c.png"
    empty = tmp_path / "empty"
    empty.mkdir()
    no_validation = tmp_path / "no_validation"
    write_records(no_validation, [{"step": 1, "split": "train", "loss": 1.0}])
    cases = {
        "": "--workdirs is empty",
        str(tmp_path / "absent"): "not found or not a folder",
        str(empty): "no metrics.jsonl in",
        str(no_validation): "has no validation records",
        f"{task_run},{text_run}": f"--workdirs: {str(text_run)!r} is a text run",
    }
    for workdirs, message in cases.items():
        with pytest.raises(app.UsageError, match=re.escape(message)):
            check_curves(workdirs, output)
    assert not output.parent.exists()


def test_curves_text_run_message_names_training_plot(text_run, tmp_path):
    with pytest.raises(app.UsageError, match="python -m training.plot"):
        check_curves(str(text_run), tmp_path / "c.png", "--metric=bits_per_byte")


def test_curves_rejects_bad_output(task_run, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("kept", encoding="utf-8")
    a_folder = tmp_path / "folder.png"
    a_folder.mkdir()
    cases = {
        "": "--output is empty",
        str(tmp_path / "c.txt"): "must end in an image extension; allowed: ",
        str(tmp_path / "curves"): "must end in an image extension",
        str(a_folder): f"{a_folder} is a folder",
        str(a_file / "c.png"): f"is under the file {a_file}",
    }
    for output, message in cases.items():
        with pytest.raises(app.UsageError, match=re.escape(message)):
            check_curves(str(task_run), output)
    assert a_file.read_text(encoding="utf-8") == "kept"


def test_curves_creates_output_folder(task_run, tmp_path):
    output = tmp_path / "new" / "results" / "accuracy.svg"
    assert check_curves(str(task_run), output) == output
    assert output.parent.is_dir()


# ---- experiments.birth

def check_birth(workdirs: str, output_dir: str | Path, *arguments: str) -> list[int]:
    flag_values = parsed_flags(birth, f"--workdirs={workdirs}", f"--output_dir={output_dir}",
                               *arguments)
    return birth.check_flags(flag_values, ["program"])


def test_birth_empty_workdirs_keeps_summary(tmp_path):
    output_dir = tmp_path / "results"
    output_dir.mkdir()
    (output_dir / "summary.json").write_text('[{"kept": 1}]\n', encoding="utf-8")
    with pytest.raises(app.UsageError, match="--workdirs is empty"):
        check_birth("", output_dir)
    assert (output_dir / "summary.json").read_text(encoding="utf-8") == '[{"kept": 1}]\n'


def test_birth_rejects_bad_map_steps(tmp_path):
    run = make_birth_run(tmp_path / "run")
    with pytest.raises(app.UsageError, match=re.escape(
            "--map_steps must be a comma-separated list of integers, got 2,late")):
        check_birth(str(run), tmp_path / "results", "--map_steps=2,late")
    with pytest.raises(app.UsageError, match=re.escape(
            f"--map_steps: {str(run)!r} has no attention maps of step(s) 3, 5; its saved steps: "
            "2, 4")):
        check_birth(str(run), tmp_path / "results", "--map_steps=2,3,5")
    assert not (tmp_path / "results").exists()


def test_birth_rejects_runs_without_probes(text_run, tmp_path):
    output_dir = tmp_path / "results"
    run = make_birth_run(tmp_path / "run")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_induction = tmp_path / "no_induction"
    write_records(no_induction, [{key: value for key, value in probe_record(2).items()
                                  if "induction" not in key}])
    no_maps = tmp_path / "no_maps"
    write_records(no_maps, [probe_record(2)])
    same_name = make_birth_run(tmp_path / "other" / "run")
    cases = {
        str(tmp_path / "absent"): "not found or not a folder",
        str(empty): "no metrics.jsonl in",
        str(text_run): "no probe records in",
        str(no_induction): "have no probe/loss_global_bigram or no probe/layer*_head*_induction",
        f"{run},{no_maps}": "has no attention maps under",
        f"{run},{same_name}": "have the same folder name 'run'",
    }
    for workdirs, message in cases.items():
        with pytest.raises(app.UsageError, match=re.escape(message)):
            check_birth(workdirs, output_dir)
    assert not output_dir.exists()
    # One run alone needs no maps: its plot shows the probes only.
    assert check_birth(str(no_maps), output_dir) == []


def test_birth_rejects_file_output_dir(tmp_path):
    run = make_birth_run(tmp_path / "run")
    a_file = tmp_path / "file"
    a_file.write_text("kept", encoding="utf-8")
    with pytest.raises(app.UsageError, match=re.escape(f"--output_dir={a_file} is a file")):
        check_birth(str(run), a_file)
    with pytest.raises(app.UsageError, match="--output_dir is empty"):
        check_birth(str(run), "")
    assert a_file.read_text(encoding="utf-8") == "kept"


def test_birth_plots_checked_run(tmp_path):
    run = make_birth_run(tmp_path / "run")
    output_dir = tmp_path / "results"
    assert check_birth(str(run), output_dir, "--map_steps=4") == [4]
    birth.plot_run(run, output_dir / "run.png", [4])
    assert (output_dir / "run.png").stat().st_size > 0
    summary = birth.summarize_run(run)
    assert summary["best_induction_head"] == "layer 0 head 0"
    assert summary["final_loss_in_context"] == pytest.approx(1.0)


# ---- training.plot

def test_plot_creates_missing_out_folder(text_run, tmp_path, capsys):
    image = tmp_path / "new" / "plots" / "curves.png"
    assert plot.main([str(text_run), "--out", str(image)]) == 0
    assert image.stat().st_size > 0
    assert f"wrote {image}" in capsys.readouterr().out


def test_plot_rejects_bad_out(text_run, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("kept", encoding="utf-8")
    a_folder = tmp_path / "folder.png"
    a_folder.mkdir()
    cases = {
        "": "--out is empty",
        str(tmp_path / "curves.txt"): "must end in an image extension; allowed: ",
        str(a_folder): f"--out={a_folder} is a folder",
        str(a_file / "curves.png"): f"is under the file {a_file}",
    }
    for out, message in cases.items():
        with pytest.raises(SystemExit) as raised:
            plot.main([str(text_run), "--out", out])
        assert raised.value.code == 2
        captured = capsys.readouterr()
        assert message in captured.err
        assert captured.out == ""
    assert a_file.read_text(encoding="utf-8") == "kept"


@pytest.mark.parametrize("name", ["birth", "curves", "extrapolate"])
def test_experiment_command_prints_only_the_error(name):
    result = subprocess.run(
        [sys.executable, "-m", f"experiments.{name}", "--workdirs="],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=60, check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"experiments.{name}: error: --workdirs is empty; pass ")
    assert result.stderr.count("\n") == 1


def test_peers_without_pytorch_names_the_extra():
    try:
        import torch  # noqa: F401, PLC0415
        pytest.skip("PyTorch is installed here; the message is for environments without it")
    except ImportError:
        pass
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers"], cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60,
        check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("benchmarks.peers: error: PyTorch is not installed")
    assert "pip install -e '.[peers]'" in result.stderr
    assert result.stderr.count("\n") == 1


def test_peers_unknown_implementation_lists_allowed():
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--implementation=ours:fast"], cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60,
        check=False)

    assert result.returncode == 1
    assert result.stderr == (
        "benchmarks.peers: error: unknown --implementation=ours:fast; allowed: "
        "ours:associative, ours:sequential, ours:chunked, ours:cpu_kernel, mambapy, "
        "transformers\n")


def test_peers_fresh_process_prints_json_row():
    # What `benchmarks.peers --isolate` runs for each of our scans; it needs no PyTorch.
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--implementation=ours:sequential",
         "--batch=1", "--length=8", "--d_model=16", "--num_layers=1", "--repeats=1"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=300, check=False)

    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["implementation"] == "ours (sequential scan)"
    assert row["seconds"] > 0
    assert row["parameters"] > 0


# What `benchmarks.peers` runs for each implementation with --isolate, called without PyTorch
# (CI has none): flags parsed as the command line would, then one fresh process.
PEERS_FRESH_PROCESS = """
import sys
from benchmarks import peers
peers.FLAGS(["peers"] + sys.argv[1:])
print(peers.measure_in_fresh_process("ours:sequential"))
"""
TINY_PEERS = ["--batch=1", "--length=8", "--d_model=16", "--num_layers=1", "--repeats=1"]


def run_peers_parent(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PEERS_FRESH_PROCESS, *TINY_PEERS, *flags], cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"), capture_output=True,
        text=True, timeout=300, check=False)


def test_peers_stops_a_fresh_process_past_child_timeout():
    # Importing JAX alone takes the fresh process longer than 0.01 s.
    result = run_peers_parent("--child_timeout=0.01")

    assert result.returncode == 1
    assert result.stderr.endswith(
        "benchmarks.peers: error: timing ours:sequential in a fresh process timed out after "
        "0.01 seconds (--child_timeout), and the process was stopped; raise --child_timeout, "
        "or pass --child_timeout=0 for no limit\n")
    assert result.stdout == ""


def test_peers_child_timeout_zero_means_no_limit():
    result = run_peers_parent("--child_timeout=0")

    assert result.returncode == 0, result.stderr[-3000:]
    assert "'implementation': 'ours (sequential scan)'" in result.stdout


@pytest.mark.parametrize("value, shown", [("-5", "-5"), ("nan", "nan"), ("inf", "inf"),
                                          ("2147484", "2.14748e+06")])
def test_peers_invalid_child_timeout_is_rejected(value, shown):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", f"--child_timeout={value}"], cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60,
        check=False)

    assert result.returncode == 1
    assert result.stderr == (f"benchmarks.peers: error: --child_timeout={shown} is invalid; "
                             "allowed: 0 (no limit) or seconds up to 2,147,483\n")


# ---- train.py: config files, variants and config fields

MAMBA_CONFIG = REPO / "configs" / "mamba_lm.py"
MAMBA_RETURN = "    return apply_variant(config, variant, VARIANTS)"


def edited_config(tmp_path: Path, old: str, new: str, source: Path = MAMBA_CONFIG) -> Path:
    """Write a copy of `source` with `old` replaced by `new`, as a user would edit it."""
    text = source.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    path = tmp_path / "edited_config.py"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def line_number(path: Path, code: str) -> int:
    """Return the 1-based number of the first line of `path` that contains `code`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(index + 1 for index, line in enumerate(lines) if code in line)


def run_train(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *arguments, f"--workdir={tmp_path / 'run'}"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=120, check=False)


def test_config_file_exception_names_line(tmp_path):
    path = edited_config(tmp_path, MAMBA_RETURN, "    size = {}['width']\n" + MAMBA_RETURN)
    line = line_number(path, "size = {}['width']")
    with pytest.raises(ValueError) as raised:
        load_config_file(f"{path}:tiny")
    assert str(raised.value) == (
        f"config file {str(path)!r} raised KeyError in get_config('tiny') at line {line} "
        "(size = {}['width']): 'width'")


def test_config_file_import_error_names_line(tmp_path):
    path = edited_config(tmp_path, "import ml_collections\n",
                         "import ml_collections\nimport no_such_module\n")
    with pytest.raises(ValueError) as raised:
        load_config_file(str(path))
    assert str(raised.value) == (
        f"config file {str(path)!r} raised ModuleNotFoundError while it was imported at line "
        f"{line_number(path, 'import no_such_module')} (import no_such_module): No module "
        "named 'no_such_module'")


def test_config_file_syntax_error_names_column(tmp_path):
    path = edited_config(tmp_path, "config.model.d_state = 16", "config.model.d_state = = 16")
    with pytest.raises(ValueError) as raised:
        load_config_file(f"{path}:tiny")
    assert str(raised.value) == (
        f"config file {str(path)!r} has a syntax error at line "
        f"{line_number(path, 'd_state = = 16')}, column 28 (config.model.d_state = = 16): "
        "invalid syntax")


def test_get_config_without_argument(tmp_path):
    path = edited_config(tmp_path, 'def get_config(variant: str = "")', "def get_config()")
    line = line_number(path, "def get_config()")
    with pytest.raises(ValueError) as raised:
        load_config_file(f"{path}:tiny")
    assert str(raised.value) == (
        f"config file {str(path)!r}: get_config at line {line} takes no argument, so it cannot "
        "take the variant 'tiny'; define get_config(variant: str = \"\"), or drop ':tiny' from "
        "--config")
    # Without a variant, get_config() is called as ml_collections' config flag calls it.
    path.write_text(path.read_text(encoding="utf-8").replace(
        "apply_variant(config, variant, VARIANTS)", 'apply_variant(config, "", VARIANTS)'),
        encoding="utf-8")
    assert load_config_file(str(path)).model.d_model == 128


def test_get_config_requiring_argument(tmp_path):
    path = edited_config(tmp_path, 'def get_config(variant: str = "")',
                         "def get_config(variant: str)")
    with pytest.raises(ValueError, match=re.escape(
            f"get_config at line {line_number(path, 'def get_config(')} requires an argument; "
            f"pass --config={path}:VARIANT")):
        load_config_file(str(path))
    assert load_config_file(f"{path}:tiny").model.d_model == 32


@pytest.mark.parametrize("returned, hint", [
    ("config.to_dict()", " (return the ConfigDict itself, not config.to_dict())"),
    ("None", " (is the return statement missing?)")])
def test_get_config_returning_other_type(tmp_path, returned, hint):
    path = edited_config(tmp_path, MAMBA_RETURN,
                         f"    config = apply_variant(config, variant, VARIANTS)\n"
                         f"    return {returned}")
    with pytest.raises(ValueError) as raised:
        load_config_file(f"{path}:tiny")
    type_name = "dict" if returned != "None" else "NoneType"
    assert str(raised.value) == (f"config file {str(path)!r}: get_config returned a {type_name}; "
                                 f"expected an ml_collections.ConfigDict{hint}")


def test_config_file_type_change_names_field(tmp_path):
    path = edited_config(tmp_path, MAMBA_RETURN, "    config.data.seq_len = 32.5\n" + MAMBA_RETURN)
    with pytest.raises(ValueError) as raised:
        load_config_file(str(path))
    message = str(raised.value)
    assert message.startswith(f"config file {str(path)!r} raised TypeError in get_config() at "
                              f"line {line_number(path, 'seq_len = 32.5')}")
    assert message.endswith("(config.data.seq_len = 32.5): field 'seq_len' takes an integer, "
                            "got 32.5 (float)")


def test_helper_value_error_keeps_message():
    with pytest.raises(ValueError) as raised:
        load_config_file(f"{MAMBA_CONFIG}:huge")
    assert str(raised.value) == ("unknown config variant 'huge'; allowed variants: '', 'tiny', "
                                 "'small', 'medium'")


def test_missing_field_names_default(tmp_path):
    path = edited_config(tmp_path, MAMBA_RETURN, "    del config.train.seed\n" + MAMBA_RETURN)
    config = load_config_file(f"{path}:tiny")
    with pytest.raises(ValueError) as raised:
        config_lib.check_config_fields(config)
    assert str(raised.value) == (
        "missing config field train.seed; get_config must keep every field of "
        "training.config.default_training_config, and this one defaults to 0")


def test_field_of_wrong_type_names_expected(tmp_path):
    config = load_config_file(f"{MAMBA_CONFIG}:tiny")
    config.unlock()
    del config.data.seq_len
    config.data.seq_len = 32.5
    with pytest.raises(ValueError) as raised:
        config_lib.check_config_fields(config)
    assert str(raised.value) == "invalid config field data.seq_len=32.5; allowed: an integer"

    path = edited_config(tmp_path, "config.model.d_model = 128", 'config.model.d_model = "128"')
    with pytest.raises(ValueError) as raised:
        config_lib.check_config_fields(load_config_file(str(path)))
    assert str(raised.value) == "invalid config field model.d_model='128'; allowed: an integer"


def test_variant_over_field_of_wrong_type(tmp_path):
    path = edited_config(tmp_path, "config.model.d_model = 128", 'config.model.d_model = "128"')
    with pytest.raises(ValueError) as raised:
        load_config_file(f"{path}:tiny")
    assert str(raised.value) == (
        "invalid config field model.d_model='128' (str): config variant 'tiny' sets it to 32 "
        "(int); expected an integer")


def test_transformer_field_of_wrong_type():
    # TransformerConfig would raise a TypeError on "128" % num_heads.
    config = load_config_file(f"{REPO / 'configs' / 'transformer_lm.py'}:tiny")
    config.unlock()
    del config.model.d_model
    config.model.d_model = "128"
    with pytest.raises(ValueError, match=re.escape(
            "invalid config field model.d_model='128'; allowed: an integer")):
        config_lib.validate_config(config, num_devices=1)


def test_mesh_rules_none_names_form():
    for name in ("rules", "logical_rules"):
        config = load_config_file(f"{MAMBA_CONFIG}:tiny")
        config_lib.set_field(config, f"mesh.{name}", None)
        with pytest.raises(ValueError) as raised:
            config_lib.validate_config(config, num_devices=1)
        message = str(raised.value)
        assert message.startswith(f"invalid config field mesh.{name}=None; allowed: a tuple of ")
        assert message.endswith(f"or () for no rules (--config.mesh.{name}='()' on the command "
                                "line)")
    config = load_config_file(f"{MAMBA_CONFIG}:tiny")
    config_lib.set_field(config, "mesh.rules", ("kernel",))
    with pytest.raises(ValueError, match=re.escape(
            "invalid config field mesh.rules[0]='kernel'; allowed: a (regular expression, mesh "
            "axis or None) pair")):
        config_lib.validate_config(config, num_devices=1)


def test_empty_mesh_rules_are_valid():
    config = load_config_file(f"{MAMBA_CONFIG}:tiny")
    config_lib.set_field(config, "mesh.rules", ())
    config_lib.validate_config(config, num_devices=1)


def test_corpus_glob_names_folder_and_pattern(tmp_path):
    config = load_config_file(f"{MAMBA_CONFIG}:tiny")
    config.data.path = str(tmp_path / "texts" / "*.txt")
    with pytest.raises(ValueError) as raised:
        config_lib.validate_config(config, num_devices=1)
    assert str(raised.value) == (
        f"invalid config field data.path={config.data.path!r}: the path does not exist, and "
        "data.path takes no glob; allowed: the folder in data.path and the glob in data.pattern, "
        f"here data.path={str(tmp_path / 'texts')!r} and data.pattern='*.txt'")

    config.data.path = str(tmp_path / "absent.txt")
    with pytest.raises(ValueError) as raised:
        config_lib.validate_config(config, num_devices=1)
    message = str(raised.value)
    assert message.endswith("or '' for the Python standard library")
    assert "None" not in message


def test_sinusoidal_seq_len_names_model_max_len():
    config = load_config_file(f"{REPO / 'configs' / 'transformer_lm.py'}:tiny")
    config.model.positions = "sinusoidal"
    config.model.max_len = 16
    with pytest.raises(ValueError) as raised:
        config_lib.validate_config(config, num_devices=1)
    assert str(raised.value) == (
        "invalid config field data.seq_len=32; allowed: at most model.max_len (16), the longest "
        "sequence that sinusoidal positions encode; raise model.max_len")


def test_sinusoidal_model_error_names_model_max_len():
    model = build_model({"architecture": "transformer", "vocab_size": 16, "d_model": 8,
                         "num_layers": 1, "num_heads": 2, "positions": "sinusoidal",
                         "max_len": 4}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError) as raised:
        model(jnp.zeros((1, 5), jnp.int32))
    message = str(raised.value)
    assert "(model.max_len in a training config)" in message
    assert "config.max_len" not in message


def test_value_field_is_not_a_section():
    config = load_config_file(f"{MAMBA_CONFIG}:tiny")
    with pytest.raises(ValueError) as raised:
        config_lib.check_field_paths(config, ["mesh.rules.x"])
    assert str(raised.value) == ("config field 'mesh.rules' is a value, not a section, so "
                                 "'mesh.rules.x' is not a field; set the value with "
                                 "--config.mesh.rules=VALUE")
    with pytest.raises(ValueError, match=re.escape(
            "unknown config section 'model.size'; model has no sections, only the fields ")):
        config_lib.check_field_paths(config, ["model.size.width"])


def test_text_config_takes_one_variant():
    with pytest.raises(ValueError) as raised:
        load_config_file(f"{MAMBA_CONFIG}:tiny,small")
    assert str(raised.value) == ("config variant 'tiny,small' joins several variants, but this "
                                 "config takes one; allowed variants: '', 'tiny', 'small', "
                                 "'medium'")


def test_file_variants_merge_with_training_variants():
    # A user's copy of a config may add a variant of its own, or set training fields in one.
    variants = config_lib.with_training_variants({"tiny": {"model.d_model": 8,
                                                           "data.seq_len": 64},
                                                  "huge": {"model.d_model": 2048}})

    assert variants["tiny"] == {**config_lib.TRAINING_VARIANTS["tiny"], "model.d_model": 8,
                                "data.seq_len": 64}
    assert variants["huge"] == {"model.d_model": 2048}
    assert variants["small"] == config_lib.TRAINING_VARIANTS["small"]


# Each command stops before the workdir is made: with exit status 2 and the message of
# parse_flags, or status 1 and the message of validate_config logged once.
TRAIN_ERRORS = [
    (["--config=configs/induction_heads.py:tiny,paper"], 2,
     "config variants 'tiny' and 'paper' set data.seq_len to different values, 32 and 256"),
    (["--config=configs/birth_transformer.py:tiny,frozen_embeddings,frozen_first_layer"], 2,
     "config variants 'frozen_embeddings' and 'frozen_first_layer' set "
     "optimizer.frozen_parameters to different values, '^(embedding|head)/' and '^blocks/0/'"),
    (["--config=configs/mamba_lm.py:tiny", "--config.mesh.rules=None"], 2,
     "invalid config field mesh.rules=None; allowed: a tuple of (regular expression, mesh "
     "axis or None) pairs"),
    (["--config=configs/mamba_lm.py:tiny", "--config.mesh.logical_rules=None"], 2,
     "invalid config field mesh.logical_rules=None; allowed: a tuple of (logical axis name, "
     "mesh axis or None) pairs"),
    (["--config=configs/transformer_lm.py:tiny", "--config.model.positions=sinusoidal",
      "--config.model.max_len=16"], 1,
     "invalid config field data.seq_len=32; allowed: at most model.max_len (16)"),
    (["--config=configs/mamba_lm.py:tiny", "--config.data.path=/nonexistent/*.py"], 1,
     "invalid config field data.path='/nonexistent/*.py': the path does not exist, and "
     "data.path takes no glob"),
]


@pytest.mark.parametrize("arguments, status, message", TRAIN_ERRORS,
                         ids=[" ".join(arguments) for arguments, _, _ in TRAIN_ERRORS])
def test_train_command_prints_one_message(arguments, status, message, tmp_path):
    result = run_train(tmp_path, *arguments)
    assert result.returncode == status
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    if status == 2:
        assert result.stderr.startswith(f"train.py: invalid flags: {message}")
    else:
        assert " train.py:" in result.stderr
        assert f"] {message}" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("edit", ["raise", "import", "syntax", "no argument", "missing field",
                                  "wrong type", "dict"])
def test_train_command_reports_config_file(edit, tmp_path):
    edits = {
        "raise": (MAMBA_RETURN, "    size = {}['width']\n" + MAMBA_RETURN,
                  "raised KeyError in get_config('tiny') at line "),
        "import": ("import ml_collections\n", "import ml_collections\nimport no_such_module\n",
                   "raised ModuleNotFoundError while it was imported at line "),
        "syntax": ("config.model.d_state = 16", "config.model.d_state = = 16",
                   "has a syntax error at line "),
        "no argument": ('def get_config(variant: str = "")', "def get_config()",
                        "takes no argument, so it cannot take the variant 'tiny'"),
        "missing field": (MAMBA_RETURN, "    del config.train.seed\n" + MAMBA_RETURN,
                          "missing config field train.seed"),
        "wrong type": ("config.model.d_model = 128", 'config.model.d_model = "128"',
                       "invalid config field model.d_model='128' (str): config variant 'tiny' "
                       "sets it to 32 (int); expected an integer"),
        "dict": (MAMBA_RETURN, MAMBA_RETURN + ".to_dict()", "get_config returned a dict"),
    }
    old, new, message = edits[edit]
    path = edited_config(tmp_path, old, new)
    result = run_train(tmp_path, f"--config={path}:tiny")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("train.py: invalid flags: ")
    assert message in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "run").exists()


def test_train_command_sets_none_override(tmp_path):
    # ml_collections cannot parse None for a typed field; train.py sets it after parsing.
    result = run_train(tmp_path, "--config=configs/transformer_lm.py:tiny",
                       "--config.model.ffn_dim=None", "--config.train.num_steps=1")

    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["ffn_dim"] is None


def parsed_train_config(*arguments: str) -> dict:
    """Return the config that train.py's flag parsing makes of `arguments`, as a dict."""
    code = "import sys, train; train.parse_flags(sys.argv); print(train._CONFIG.value.to_json())"
    result = subprocess.run(
        [sys.executable, "-c", code, *arguments, "--workdir=unused"], cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120,
        check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("first, last, expected", [("None", "64", 64), ("64", "None", None)])
def test_last_override_of_a_field_wins(first, last, expected):
    config = parsed_train_config("--config=configs/transformer_lm.py:tiny",
                                 f"--config.model.ffn_dim={first}", "--config.model.d_model=48",
                                 f"--config.model.ffn_dim={last}")
    assert config["model"]["ffn_dim"] == expected
    assert config["model"]["d_model"] == 48


def test_float_field_written_as_integer_takes_float_override(tmp_path):
    # A fresh ConfigDict field takes the type of its first value, so `rope_base = 10000` in a
    # user's config file made ml_collections parse the override as an integer.
    path = edited_config(tmp_path, "config.model.rope_base = 10000.0",
                         "config.model.rope_base = 10000",
                         source=REPO / "configs" / "transformer_lm.py")

    config = parsed_train_config(f"--config={path}:tiny", "--config.model.rope_base=5e5")
    assert config["model"]["rope_base"] == 500000.0

    result = run_train(tmp_path, f"--config={path}:tiny", "--config.model.rope_base=fast")
    assert result.returncode == 2
    assert result.stderr == ("train.py: invalid flags: flag --config.model.rope_base=fast: "
                             "expected a number, got 'fast'\n")


def test_config_path_with_colon_is_explained(tmp_path):
    folder = tmp_path / "runs:2026"
    folder.mkdir()
    path = folder / "config.py"
    path.write_text(MAMBA_CONFIG.read_text(encoding="utf-8"), encoding="utf-8")
    for spec in (str(path), f"{path}:tiny"):
        with pytest.raises(ValueError) as raised:
            load_config_file(spec)
        assert str(raised.value) == (
            f"config file {str(tmp_path / 'runs')!r} not found: the first ':' in {spec!r} starts "
            "the variant, so the file's path cannot contain ':'; move or link the file to a path "
            "without ':'")


def test_config_file_misspelt_field_rejected(tmp_path):
    path = edited_config(tmp_path, MAMBA_RETURN, "    config.train.num_setps = 5\n" + MAMBA_RETURN)

    result = run_train(tmp_path, f"--config={path}:tiny")

    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        "unknown config field(s) train.num_setps; allowed fields of train: checkpoint_every, "
        "eval_batches, eval_every, keep_checkpoints, log_every, log_first_steps, num_steps, "
        "probes, seed")
    assert not (tmp_path / "run").exists()
