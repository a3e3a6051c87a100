"""Tests of the flag checks of the benchmark and experiment scripts and of training.plot.

A bad flag, path or value must stop a script with one message that names the flag, before any
measurement, evaluation or output file. The checks run in-process on fresh `FlagValues` and on
fake workdirs that contain only the files the checks read. One subprocess per benchmark checks
that the message is the only output.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import app, flags

from benchmarks import decode, long_context, scan, train_step
from experiments import birth, curves, extrapolate
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
    ("scan", ["--modes="], "--modes is empty; allowed: associative, sequential, chunked"),
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
