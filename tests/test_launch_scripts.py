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


def test_local_dry_run_prints_the_backend_then_the_train_command(fake_venv):
    out = run("local.sh", "--config.train.steps=3", "--config.data.samples=my data.jsonl",
              DRY_RUN="1", VENV=str(fake_venv))
    assert out.returncode == 0, out.stderr
    assert [shlex.split(line) for line in out.stdout.strip().splitlines()] == [
        [f"{fake_venv}/bin/python", "-m", "llavaction_jax.probe"],
        [f"{fake_venv}/bin/python", "-m", "llavaction_jax", "train", "--config", "configs/train.py",
         "--config.train.steps=3", "--config.data.samples=my data.jsonl"]]


def test_local_installs_the_accelerator_jax_into_an_existing_venv_once(fake_venv):
    out = run("local.sh", DRY_RUN="1", VENV=str(fake_venv), JAX_EXTRA="cuda12")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.strip().splitlines()]
    version = next(line for line in (LAUNCH.parent / "requirements.txt").read_text().splitlines()
                   if line.startswith("jax=="))[len("jax=="):]
    assert lines[0] == [f"{fake_venv}/bin/python", "-m", "pip", "install", "--quiet", f"jax[cuda12]=={version}"]
    assert lines[1] == ["touch", f"{fake_venv}/.jax-cuda12-{version}"]
    assert lines[2] == [f"{fake_venv}/bin/python", "-m", "llavaction_jax.probe", "cuda12"]  # fails on a CPU
    (fake_venv / f".jax-cuda12-{version}").touch()  # installed before: not again
    again = run("local.sh", DRY_RUN="1", VENV=str(fake_venv), JAX_EXTRA="cuda12")
    assert [shlex.split(line)[:3] for line in again.stdout.strip().splitlines()] == [
        [f"{fake_venv}/bin/python", "-m", "llavaction_jax.probe"], [f"{fake_venv}/bin/python", "-m", "llavaction_jax"]]


def test_the_backend_probe_prints_the_devices_and_refuses_a_cpu_when_an_accelerator_was_asked_for():
    # (without JAX_EXTRA the same line is printed and the launch goes on: llavaction_jax/probe.py returns 0)
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    probe = "source launch/common.sh && print_backend \"$0\" \"$1\""
    gpu = subprocess.run(["bash", "-c", probe, sys.executable, "cuda12"], cwd=LAUNCH.parent, env=env,
                         capture_output=True, text=True, timeout=120)
    assert gpu.returncode == 1 and "backend cpu, 1 local device(s) (cpu), process 0" in gpu.stdout
    assert "JAX_EXTRA=cuda12 asks for an accelerator but JAX sees only the CPU" in gpu.stderr


def test_local_dry_run_sets_up_a_missing_venv(tmp_path):
    venv = tmp_path / "new-venv"
    out = run("local.sh", "--config", "configs/train.py", DRY_RUN="1", VENV=str(venv), JAX_EXTRA="cuda12")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.strip().splitlines()]
    assert lines[0][1:] == ["-m", "venv", str(venv)]
    assert ["-r", "requirements.txt"] == lines[2][-2:]
    assert lines[3][-1].startswith("jax[cuda12]==")
    assert lines[-2] == [f"{venv}/bin/python", "-m", "llavaction_jax.probe", "cuda12"]
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
    assert train == ("cd llavaction_jax && .venv/bin/python -m llavaction_jax.probe tpu && "
                     ".venv/bin/python -m llavaction_jax train --config configs/train.py "
                     "--config.train.steps=3")  # the run detects the pod slice itself (llavaction_jax/distributed.py)
    assert "jax[tpu]" in gcloud[2][-1]


def test_tpu_pod_copies_only_tracked_files(tmp_path):
    """A real copy phase on a scratch git checkout: gcloud is a stand-in (there is no TPU here) that keeps the tarball
    it is asked to send; the tarball holds the tracked files (edits included), not checkpoints written beside them."""
    import shutil
    import tarfile

    repo = tmp_path / "repo"
    shutil.copytree(LAUNCH, repo / "launch")
    (repo / "llavaction_jax").mkdir()
    (repo / "llavaction_jax" / "x.py").write_text("v = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    (repo / "llavaction_jax" / "x.py").write_text("v = 2\n")  # an uncommitted edit of a tracked file travels
    (repo / "ckpt").mkdir()
    (repo / "ckpt" / "big.bin").write_bytes(b"0" * 1000)  # written by the README's examples: stays home
    (repo / "notes.txt").write_text("untracked")
    bin_dir, sent = tmp_path / "bin", tmp_path / "sent"
    bin_dir.mkdir()
    sent.mkdir()
    (bin_dir / "gcloud").write_text(f"""#!/bin/sh
for a in "$@"; do if [ -f "$a" ]; then cp "$a" {sent}/; fi; done
""")
    (bin_dir / "gcloud").chmod(0o755)
    out = subprocess.run(["bash", str(repo / "launch" / "tpu_pod.sh")], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PHASES="copy", TPU_NAME="t",
                                  ZONE="z", PROJECT="p", DRY_RUN="0"))
    assert out.returncode == 0, out.stderr
    (tarball,) = sent.iterdir()
    with tarfile.open(tarball) as tar:
        names = sorted(tar.getnames())
        assert tar.extractfile("llavaction_jax/x.py").read() == b"v = 2\n"
    tracked = subprocess.run([*git, "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    assert names == sorted(tracked) and not any(n.startswith(("ckpt", "notes")) for n in names)


def test_gitignore_covers_every_output_folder_of_the_readme():
    """The folders the README's and docs/' commands write into (relative --out paths), and the demo's and the
    benchmark guide's working folders, are git-ignored."""
    import re

    root = LAUNCH.parent
    text = "\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    readme = (root / "README.md").read_text()
    out_folders = lambda t: {m.split("/")[0] for m in re.findall(r"--out[ =]([a-z_][\w./:-]*)", t) if "://" not in m}
    assert {"ckpt", "shards", "questions", "results", "exported", "runs"} <= out_folders(readme), out_folders(readme)
    outputs = out_folders(text) | {"demo_out", "runs", "bench"}  # bench: docs/benchmarks.md's B=bench
    assert {"data"} <= outputs, outputs
    for folder in sorted(outputs):
        check = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", f"{folder}/x"])
        assert check.returncode == 0, f"{folder}/ (an output folder of the README or docs/) is not in .gitignore"


def test_tpu_pod_requires_its_environment():
    out = run("tpu_pod.sh", DRY_RUN="1", ZONE="z", PROJECT="p")
    assert out.returncode != 0 and "TPU_NAME" in out.stderr


def test_slurm_dry_run_prints_srun(fake_venv):
    out = run("slurm_gpu.sbatch", "--config.train.steps=3", DRY_RUN="1", VENV=str(fake_venv))
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.strip().splitlines()]
    assert lines[-2] == [f"{fake_venv}/bin/python", "-m", "llavaction_jax.probe", "cuda12"]  # the GPUs, before srun
    assert lines[-1] == [
        "srun", "--kill-on-bad-exit=1", "--export=ALL", f"{fake_venv}/bin/python", "-m", "llavaction_jax", "train",
        "--config", "configs/train.py", "--config.train.steps=3"]
    assert lines[0][-1].startswith("jax[cuda12]==")  # into the existing venv too
    node = run("slurm_gpu.sbatch", DRY_RUN="1", VENV=str(fake_venv), MODE="node", SLURM_GPUS_ON_NODE="4",
               SLURM_NTASKS_PER_NODE="1")
    assert node.returncode == 0 and "GPUs 0,1,2,3" in node.stderr
    bad = run("slurm_gpu.sbatch", DRY_RUN="1", VENV=str(fake_venv), MODE="node", SLURM_NTASKS_PER_NODE="4")
    assert bad.returncode == 2 and "ntasks-per-node=1" in bad.stderr


def test_device_check_dry_run_installs_missing_and_older_wheels(tmp_path):
    import sys

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("numpy-1.0-py3-none-any.whl", "pytest-99.0-py3-none-any.whl", "not_installed_pkg_x-1.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    out = run("device_check.sh", "--out", "/tmp/out dir/r.json", "--sections", "eval_7b", DRY_RUN="1",
              PYTHON=sys.executable, WHEELS=str(wheels), LIMIT="300")
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.strip().splitlines()]
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade", "--target",
           f"{wheels}/site"]
    # missing: installed; older than the wheel (pytest 9.2 < 99.0): replaced; numpy 2.4.6 >= 1.0: kept
    assert lines[:2] == [pip + [f"{wheels}/not_installed_pkg_x-1.0-py3-none-any.whl"],
                         pip + [f"{wheels}/pytest-99.0-py3-none-any.whl"]]
    assert lines[2][:2] == [sys.executable, "-c"] and "jax.device_count()" in lines[2][2]
    assert lines[3] == ["timeout", "--kill-after=15", "300", sys.executable, "-m", "llavaction_jax.bench.device_check",
                        "--budget", "270", "--out", "/tmp/out dir/r.json", "--sections", "eval_7b"]
    assert len(lines) == 4 and not (wheels / "site").exists()  # a dry run installs nothing


def gpu_flags() -> list[str]:
    out = subprocess.run(["bash", "-c", "source launch/common.sh && printf '%s\\n' \"${GPU_XLA_FLAGS[@]}\""],
                         cwd=LAUNCH.parent, capture_output=True, text=True, check=True)
    return out.stdout.split()


def stand_in(path: pathlib.Path) -> pathlib.Path:
    """An interpreter (or srun) that prints the XLA_FLAGS it was started with and its arguments."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('#!/bin/sh\necho "XLA_FLAGS=$XLA_FLAGS ARGS=$*"\n')
    path.chmod(0o755)
    return path


def test_gpu_launches_pass_maxtexts_h100_flags_before_the_users_and_jax_accepts_them(tmp_path, fake_venv):
    import sys

    flags = gpu_flags()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags and len(flags) >= 10
    common = (LAUNCH / "common.sh").read_text()
    for flag in flags:  # each flag has its reason in a comment above it (or above the group it belongs to)
        above = [line.strip() for line in common[:common.index(flag)].splitlines()]
        while above[-1].startswith("--") or not above[-1]:
            above.pop()
        assert above[-1].startswith("# ") and len(above[-1]) > 20, flag
    # every flag is known to this JAX's XLA (an unknown one aborts the process)
    env = dict(os.environ, XLA_FLAGS=" ".join(flags))
    probe = subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp; print(jax.jit(lambda x: x @ x)"
                            "(jnp.ones((2, 2))).sum())"], env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == "8.0", probe.stderr[-2000:]

    mine = "--xla_dump_to=/tmp/mine"
    python = stand_in(tmp_path / "bin" / "python3")
    check = run("device_check.sh", "--smoke", DRY_RUN="0", PYTHON=str(python), WHEELS=str(tmp_path / "none"),
                XLA_FLAGS=mine)
    assert check.returncode == 0, check.stderr
    started = [line for line in check.stdout.splitlines() if "llavaction_jax.bench.device_check" in line]
    assert started == [f"XLA_FLAGS={' '.join(flags)} {mine} ARGS=-m llavaction_jax.bench.device_check --budget 420 "
                       "--smoke"]

    stand_in(fake_venv / "bin" / "python")
    (fake_venv / f".jax-cuda12-{jax_version()}").touch()
    gpu = run("local.sh", DRY_RUN="0", VENV=str(fake_venv), JAX_EXTRA="cuda12", XLA_FLAGS=mine)
    cpu = run("local.sh", DRY_RUN="0", VENV=str(fake_venv), XLA_FLAGS=mine)
    assert gpu.stdout.splitlines()[-1].startswith(f"XLA_FLAGS={' '.join(flags)} {mine} ARGS=-m llavaction_jax train")
    assert cpu.stdout.splitlines()[-1].startswith(f"XLA_FLAGS={mine} ARGS=-m llavaction_jax train")  # CPU: untouched

    stand_in(tmp_path / "path" / "srun")
    slurm = run("slurm_gpu.sbatch", DRY_RUN="0", VENV=str(fake_venv), XLA_FLAGS=mine,
                PATH=f"{tmp_path / 'path'}:{os.environ['PATH']}")
    assert slurm.returncode == 0, slurm.stderr
    assert slurm.stdout.splitlines()[-1].startswith(f"XLA_FLAGS={' '.join(flags)} {mine} ARGS=--kill-on-bad-exit=1")


def jax_version() -> str:
    return next(line for line in (LAUNCH.parent / "requirements.txt").read_text().splitlines()
                if line.startswith("jax=="))[len("jax=="):]
