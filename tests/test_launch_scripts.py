"""launch/*: bash syntax, and the commands the scripts would run (DRY_RUN=1 prints them instead)."""

import os
import pathlib
import shlex
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = ["local.sh", "tpu_pod.sh", "slurm_gpu.sbatch", "device_check.sh"]


def run(script, *args, **env):
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "TPU_", "DRY_RUN", "MODE", "LIMIT", "WHEELS", "SITE"))}
    full_env.update(env)
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=full_env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script):
    path = LAUNCH / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert "set -euo pipefail" in path.read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage(script):
    out = run(script, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout and "DRY_RUN=1" in out.stdout


@pytest.fixture
def fake_venv(tmp_path):
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o755)
    return tmp_path / "venv"


def test_local_dry_run_prints_the_train_command(fake_venv):
    out = run("local.sh", "--config.train.steps=3", "--config.data.samples=my data.jsonl",
              DRY_RUN="1", VENV=str(fake_venv))
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout.strip()) == [
        f"{fake_venv}/bin/python", "-m", "llavaction_jax", "train", "--config", "configs/train.py",
        "--config.train.steps=3", "--config.data.samples=my data.jsonl"]


def test_local_dry_run_sets_up_a_missing_venv(tmp_path):
    venv = tmp_path / "new-venv"
    out = run("local.sh", "--config", "configs/train.py", DRY_RUN="1", VENV=str(venv), JAX_EXTRA="cuda12")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.strip().splitlines()]
    assert lines[0][1:] == ["-m", "venv", str(venv)]
    assert ["-r", "requirements.txt"] == lines[2][-2:]
    assert lines[3][-1].startswith("jax[cuda12]==")
    assert lines[-1][:4] == [f"{venv}/bin/python", "-m", "llavaction_jax", "train"]
    assert not venv.exists()  # a dry run creates nothing


def test_tpu_pod_dry_run_runs_on_all_workers():
    out = run("tpu_pod.sh", "--config.train.steps=3", DRY_RUN="1", TPU_NAME="pod", ZONE="us-east5-a",
              PROJECT="proj")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.strip().splitlines()]
    gcloud = [line for line in lines if line[0] == "gcloud"]
    assert [line[4] for line in gcloud] == ["scp", "ssh", "ssh", "ssh"]  # copy, unpack, setup, train
    assert all("--worker=all" in line for line in gcloud)
    assert all(line[line.index("--zone") + 1] == "us-east5-a" for line in gcloud)
    train = gcloud[-1][gcloud[-1].index("--command") + 1]
    assert train == ("cd llavaction_jax && .venv/bin/python -m llavaction_jax train --config configs/train.py "
                     "--config.train.steps=3")  # the run detects the pod slice itself (llavaction_jax/distributed.py)
    assert "jax[tpu]" in gcloud[2][-1]


def test_tpu_pod_requires_its_environment():
    out = run("tpu_pod.sh", DRY_RUN="1", ZONE="z", PROJECT="p")
    assert out.returncode != 0 and "TPU_NAME" in out.stderr


def test_slurm_dry_run_prints_srun(fake_venv):
    out = run("slurm_gpu.sbatch", "--config.train.steps=3", DRY_RUN="1", VENV=str(fake_venv))
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout.strip()) == [
        "srun", "--kill-on-bad-exit=1", "--export=ALL", f"{fake_venv}/bin/python", "-m", "llavaction_jax", "train",
        "--config", "configs/train.py", "--config.train.steps=3"]
    node = run("slurm_gpu.sbatch", DRY_RUN="1", VENV=str(fake_venv), MODE="node", SLURM_GPUS_ON_NODE="4",
               SLURM_NTASKS_PER_NODE="1")
    assert node.returncode == 0 and "GPUs 0,1,2,3" in node.stderr
    bad = run("slurm_gpu.sbatch", DRY_RUN="1", VENV=str(fake_venv), MODE="node", SLURM_NTASKS_PER_NODE="4")
    assert bad.returncode == 2 and "ntasks-per-node=1" in bad.stderr


def test_device_check_dry_run_installs_only_missing_wheels(tmp_path):
    import sys

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("numpy-2.4.6-py3-none-any.whl", "not_installed_pkg_x-1.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    out = run("device_check.sh", "--out", "/tmp/out dir/r.json", "--sections", "eval_7b", DRY_RUN="1",
              PYTHON=sys.executable, WHEELS=str(wheels), LIMIT="300")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.strip().splitlines()]
    assert lines[0] == [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target",
                        f"{wheels}/site", f"{wheels}/not_installed_pkg_x-1.0-py3-none-any.whl"]  # numpy is there
    assert lines[1][:2] == [sys.executable, "-c"] and "jax.device_count()" in lines[1][2]
    assert lines[2] == ["timeout", "--kill-after=15", "300", sys.executable, "-m", "llavaction_jax.bench.device_check",
                        "--time-limit", "270", "--out", "/tmp/out dir/r.json", "--sections", "eval_7b"]
    assert len(lines) == 3 and not (wheels / "site").exists()  # a dry run installs nothing
