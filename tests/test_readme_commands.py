"""Every shell line of README.md's bash blocks, as written (backslash continuations joined, comments dropped):

- `llavaction-jax ...` commands run through llavaction_jax.cli.main: each one against missing inputs in an empty
  folder, where it must refuse in one line naming a path of the command (exit 2), not with a usage error (which
  would mean a flag in the README is wrong); and the quick start's convert, extract-frames, build-mqa, eval and
  predict commands at tiny scale, in a folder holding the user's files made here (a tiny model with its tokenizer,
  EK100-style annotations, videos in AVION's chunked layout, prediction files), where each must succeed;
- launcher lines (`launch/*.sh`, `sbatch launch/slurm_gpu.sbatch`): the script exists, accepts the flags
  (DRY_RUN=1) and hands them unchanged to `train`, which parses them and names its missing input;
- `make` targets: the Makefile has them and they run what the README says;
- `pip install` lines: the package and the extras they name exist.
A line of any other kind fails the first test, so a new README command cannot go unchecked. The Python blocks are
run by tests/test_readme.py."""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest

from _cli_e2e import run_cli, run_cli_child
from _video_fixtures import known_frames, write_mp4
from test_ek100 import FAKE_VALIDATION, write_fake_annotations

REPO = pathlib.Path(__file__).resolve().parents[1]
CLI = ("llavaction-jax",)
LAUNCHERS = ("launch/local.sh", "launch/tpu_pod.sh", "launch/slurm_gpu.sbatch")


def bash_lines(text: str) -> list[list[str]]:
    """The command lines of the text's ```bash blocks, split as the shell would (comments dropped)."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                lines.append(tokens)
    return lines


README_LINES = bash_lines((REPO / "README.md").read_text())


def split_env(tokens: list[str]) -> tuple[dict, list[str]]:
    """Leading NAME=value assignments, and the command after them."""
    env = {}
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        name, value = tokens[0].split("=", 1)
        env[name] = value
        tokens = tokens[1:]
    return env, tokens


def kind(tokens: list[str]) -> str | None:
    env, command = split_env(tokens)
    if command[:1] == ["make"]:
        return "make"
    if command[:2] == ["pip", "install"]:
        return "pip"
    if command[:3] == ["python3", "-m", "venv"]:
        return "venv"
    if tuple(command[:1]) == CLI or command[:3] == ["python", "-m", "llavaction_jax"]:
        return "cli"
    if command[0] == "sbatch" or command[0] in LAUNCHERS or command[:2] in (["bash", s] for s in LAUNCHERS):
        return "launcher"
    return None


def cli_argv(tokens: list[str]) -> list[str]:
    return tokens[1:] if tuple(tokens[:1]) == CLI else tokens[3:]


CLI_COMMANDS = [cli_argv(t) for t in README_LINES if kind(t) == "cli"]


def job(argv: list[str]) -> str:
    """A name for a README command: the command, and the flag that tells its README lines apart."""
    words = argv[:2] if argv[0] == "convert" else argv[:1]
    if argv[0] == "convert" and "--check" in argv:
        words.append("--check")
    if argv[0] == "predict":
        words += [f for f in ("--options", "--question", "--batch") if f in argv]
    return " ".join(words)


def test_every_line_of_the_readmes_bash_blocks_is_a_known_kind():
    unknown = [" ".join(t) for t in README_LINES if kind(t) is None]
    assert not unknown, f"README lines no test checks: {unknown}"
    # the newcomer commands and a quick start for each job
    assert [t for t in README_LINES if kind(t) == "make"][:2] == [["make", "demo"], ["make", "test"]]
    assert {"convert from-torch --check", "convert from-torch", "convert to-torch", "extract-frames", "build-mqa",
            "eval", "predict --options", "predict --question", "predict --batch", "train"} <= {
        job(a) for a in CLI_COMMANDS}
    assert all(tuple(t[:1]) == CLI for t in README_LINES if kind(t) == "cli")  # the installed command


# ------------------------------------------------------------------------------------------------ make and pip

def make_dry_run(target: str, venv: str) -> list[str]:
    # Run as a user's shell runs it, not as a sub-make of CI's `make test` (which would print "Entering directory").
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", target, f"VENV={venv}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_make_demo_and_make_test_set_up_the_venv_and_run_what_the_readme_says(tmp_path):
    targets = [t[1] for t in README_LINES if kind(t) == "make"]
    assert targets == ["demo", "test"]
    venv = str(tmp_path / "venv")  # absent: make must create it first (-n: printed, not run)
    for target, run in (("demo", f"{venv}/bin/python -m llavaction_jax demo"), ("test", f"{venv}/bin/python -m pytest -q")):
        lines = make_dry_run(target, venv)
        assert lines[0].endswith(f"-m venv {venv}") and lines[-1] == run, lines
        assert any(line.endswith("-m pip install --quiet -r requirements.txt") for line in lines), lines
    assert re.search(r"^VENV \?= \.venv$", (REPO / "Makefile").read_text(), re.M)  # the README's .venv


def test_the_install_lines_name_this_package_and_its_extras():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    lines = [t for t in README_LINES if kind(t) == "pip"]
    assert ["pip", "install", "."] in lines  # built and installed offline by tests/test_packaging.py
    extras = set(pyproject["project"]["optional-dependencies"])
    named = {m for t in lines for m in re.findall(r"^\.\[(\w+)\]$", t[-1])}
    named |= set(re.findall(r'"\.\[(\w+)\]"', (REPO / "README.md").read_text()))
    assert {"cuda12", "tpu", "test"} <= named and named <= extras, (named, extras)
    assert pyproject["project"]["scripts"] == {"llavaction-jax": "llavaction_jax.cli:main"}
    venv = [t for t in README_LINES if kind(t) == "venv"]
    assert venv == [["python3", "-m", "venv", ".venv", "&&", ".", ".venv/bin/activate"]]


# ----------------------------------------------------------------------------- each command, inputs missing

def path_arguments(argv: list[str]) -> list[str]:
    """The arguments that name files or folders (values with a '/', '.', '_' or '-' that are not numbers, flags,
    mesh shapes or texts), including the values of --config.x=value."""
    skip = 2 if argv[0] == "convert" else 1  # the command's own words
    values = [a.split("=", 1)[1] if a.startswith("--") and "=" in a else a for a in argv[skip:]]
    return [v for v in values if not v.startswith("-") and re.search(r"[/._-]", v)
            and not re.fullmatch(r"[\d.]+", v) and "=" not in v and " " not in v]


def assert_names_a_missing_input(argv: list[str], code: int, err: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, (argv, code, err)
    line = lines[0]
    command = argv[0]
    assert line.startswith(f"{command}: error: "), line
    assert "--help)" not in line and "unrecognized" not in line and "usage:" not in err, (
        f"a usage error: a flag of the README's command is wrong: {line}")
    missing = [p for p in path_arguments(argv) if not pathlib.Path(p).exists()]
    what = line[len(f"{command}: error: "):]
    assert any(p.rstrip("/") in what for p in missing), (line, missing)


@pytest.mark.parametrize("argv", CLI_COMMANDS, ids=[job(a) for a in CLI_COMMANDS])
def test_each_command_names_its_missing_input_in_one_line(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # none of the user's files exist here
    code = run_cli(argv)
    assert_names_a_missing_input(argv, code, capsys.readouterr().err)
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())  # refused before writing anything


# ---------------------------------------------------------------------------------------------- launchers

def launcher_train_argv(tokens: list[str], venv: pathlib.Path) -> list[str]:
    """Run the README's launcher line with DRY_RUN=1 and return the train command it would run (after
    `-m llavaction_jax`)."""
    env, command = split_env(tokens)
    if command[0] == "sbatch":  # sbatch's own options stay with sbatch; the script gets the rest
        command = command[next(i for i, t in enumerate(command) if t in LAUNCHERS):]
    if command[0] == "bash":
        command = command[1:]
    script = REPO / command[0]
    assert script.is_file() and os.access(script, os.X_OK), script
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "DRY_RUN", "MODE"))}
    full_env.update(env, DRY_RUN="1", VENV=str(venv))
    out = subprocess.run(["bash", str(script), *command[1:]], env=full_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    last = shlex.split(out.stdout.strip().splitlines()[-1])
    if last[0] == "gcloud":  # the TPU pod: the command every worker runs
        last = shlex.split(last[last.index("--command") + 1].split("&&")[-1])
    return last[last.index("llavaction_jax") + 1:]


@pytest.mark.parametrize("tokens", [t for t in README_LINES if kind(t) == "launcher"],
                         ids=lambda t: split_env(t)[1][0])
def test_each_launcher_line_hands_its_flags_to_train_which_names_its_missing_input(tokens, tmp_path, monkeypatch,
                                                                                   capsys):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")
    (venv / "bin" / "python").chmod(0o755)
    argv = launcher_train_argv(tokens, venv)
    script_args = split_env(tokens)[1]
    script_args = script_args[next(i for i, t in enumerate(script_args) if t in LAUNCHERS) + 1:]
    assert argv[:3] == ["train", "--config", "configs/train.py"] and argv[3:] == script_args, argv
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["train", "--config", str(REPO / "configs" / "train.py"), *argv[3:]]  # the launcher runs in the checkout
    code = run_cli(argv)
    assert_names_a_missing_input(argv, code, capsys.readouterr().err)


# -------------------------------------------------------------------------------- the quick start, tiny scale

VALIDATION = FAKE_VALIDATION[:4]  # four clips of video P91_01 within its first 4 s; their actions are in train
PAIRS = ["0:2", "2:1", "3:1", "1:2", "1:10", "4:4", "5:0", "10:10", "0:3", "2:5"]  # verb:noun pairs of train


def make_user_files(root: pathlib.Path) -> None:
    """What a user has before the quick start, at tiny scale, under the README's names."""
    import jax

    from llavaction_jax.api import LlavaModel
    from llavaction_jax.config import load_preset
    from llavaction_jax.data.tokenizer import train_chatml_tokenizer
    from llavaction_jax.ek100 import labels
    from llavaction_jax.model import llava

    annotations = write_fake_annotations(root / "epic-kitchens-100-annotations", validation_rows=VALIDATION)
    segments = labels.read_annotation_csv(annotations / labels.VALIDATION_CSV)
    predictions = {}  # TIM's top-5: the GT first for even rows, missing (inserted by build-mqa) for odd ones
    for s in segments:
        others = [vn for vn in PAIRS if vn != s.vn]
        predictions[str(s.row_index)] = {"predictions": ([s.vn] if s.row_index % 2 == 0 else []) + others[:5],
                                         "target": s.vn}
    (root / "tim_pred_ids_val.json").write_text(json.dumps(predictions))
    # AVION's chunked layout: {root}/{pid}/{vid}.MP4/{chunk start}.MP4, one 5 s chunk at 30 fps
    write_mp4(root / "EK100_512" / "P91" / "P91_01.MP4" / "0.MP4", known_frames(0, 150, 48, 64), fps=30)
    write_mp4(root / "P01_11.MP4", known_frames(0, 150, 64, 64), fps=10)  # 15 s: the README's clip is 12.5-14.2 s
    write_mp4(root / "clip.mp4", known_frames(300, 30, 64, 64), fps=10)
    (root / "clips.jsonl").write_text(
        json.dumps({"video": "clip.mp4", "options": ["open door", "take cup"]}) + "\n"
        + json.dumps({"video": "P01_11.MP4", "start": 1.0, "end": 2.5, "question": "What is in my hand?"}) + "\n")
    # a fine-tuned model (runs/llavaction_7b/model): the tiny preset with a small tokenizer of its own
    texts = ["<image>\nWhat action are you doing? open door close door take cup put cup wash hand",
             "What is in my left hand? You are a helpful assistant. system user assistant"]
    train_chatml_tokenizer(texts * 4, vocab_size=300, out_dir=root / "tokenizer")
    cfg = load_preset("tiny")  # random weights initialised in jit with rbg keys: seconds, not a minute, on CPU
    params = jax.jit(lambda key: llava.init(cfg, key))(jax.random.key(0, impl="rbg"))
    # Its answers end at once: a zero final-norm scale makes every logit 0, so greedy decoding picks id 0,
    # <|endoftext|>, one of its tokenizer's end-of-sequence ids. The commands do the same work, without the 4096
    # decode steps a random model would take under predict's default budget.
    params["text"]["final_norm"]["scale"] = jax.numpy.zeros_like(params["text"]["final_norm"]["scale"])
    model = LlavaModel(cfg, params)
    model.save_pretrained(root / "runs" / "llavaction_7b" / "model", tokenizer_dir=root / "tokenizer")


def readme_command(name: str) -> list[str]:
    (argv,) = [a for a in CLI_COMMANDS if job(a) == name]
    return argv


@pytest.mark.cli_e2e("convert to-torch", "convert from-torch", "extract-frames", "build-mqa", "eval", "predict")
def test_the_quick_start_runs_as_written_at_tiny_scale(tmp_path, monkeypatch):
    root = tmp_path / "user"
    root.mkdir()
    make_user_files(root)
    monkeypatch.chdir(root)
    # convert: a fine-tuned model to upstream's layout; that export then stands in for a released checkpoint
    to_torch = readme_command("convert to-torch")
    assert run_cli(to_torch) == 0
    export = pathlib.Path(to_torch[to_torch.index("--out") + 1])
    assert (export / "config.json").is_file() and list(export.glob("*.safetensors"))
    from_torch = readme_command("convert from-torch")
    shutil.copytree(export, root / from_torch[2])
    quick_start = [readme_command(name) for name in ("convert from-torch --check", "convert from-torch",
                                                     "extract-frames", "build-mqa", "eval", "predict --options",
                                                     "predict --question", "predict --batch")]
    codes, output = run_cli_child(quick_start, cwd=root)
    assert codes == [0] * len(quick_start), output[-6000:]

    config = json.loads((root / "ckpt" / "llavaction-7b" / "llavaction_config.json").read_text())
    assert config["param_dtype"] == "bfloat16"  # --dtype bfloat16
    shards = root / "shards" / "ek100_val_64f"
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["settings"]["num_frames"] == 64 and manifest["settings"]["layout"] == "chunked", manifest
    questions = [json.loads(line) for line in (root / "questions" / "ek100_mqa_tim.jsonl").read_text().splitlines()]
    questions = [q for q in questions if "options" in q]  # (the file's first line is its meta)
    assert len(questions) == len(VALIDATION) and all(len(q["options"]) == 5 for q in questions)
    results = json.loads((root / "results" / "llavaction_7b" / "results.json").read_text())
    assert results["num_questions"] == len(VALIDATION) and set(results["modes"]) == {"generate", "score"}
    assert results["chance"] == pytest.approx(0.2)  # 5 options, the GT among them
    for name in ("predictions.jsonl", "report.md", "accuracy.png"):
        assert (root / "results" / "llavaction_7b" / name).is_file(), name
    answers = [json.loads(line) for line in (root / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2 and all("answer" in a for a in answers), answers


# ------------------------------------------------------------------------------------------------------ links

def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)  # '#' lines in code are not headings
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_the_readmes_links_lead_to_files_and_headings_that_exist():
    links = re.findall(r"\]\(([^)\s]+)\)", (REPO / "README.md").read_text())
    assert len(links) >= 20, links
    for link in links:
        target, _, anchor = link.partition("#")
        path = REPO / target if target else REPO / "README.md"
        assert path.exists(), link
        if anchor:
            assert anchor in anchors(path), (link, sorted(anchors(path)))
    # and the anchors the docs written for the README point at
    for doc in ("usage.md", "training.md", "execution.md", "python-api.md", "demo.md", "precision.md"):
        for link in re.findall(r"\]\(([\w\-.]+\.md)(?:#([\w\-]+))?\)", (REPO / "docs" / doc).read_text()):
            path = REPO / "docs" / link[0]
            assert path.exists() and (not link[1] or link[1] in anchors(path)), (doc, link)
