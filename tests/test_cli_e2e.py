"""The command line as a user meets it: every command `--help` lists has an end-to-end test (the cli_e2e register,
tests/_cli_e2e.py), --version, help that shows each default once and explains shared flags the same way, mistyped
flags named as such, and inputs checked before a model is loaded or anything is written."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

import _cli_e2e
from llavaction_jax import __version__, cli
from llavaction_jax.cli import main

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent


def help_text(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def listed_commands(text: str) -> list[str]:
    """The commands a --help lists under its positional arguments ("  name   help")."""
    section = text.split("positional arguments:", 1)[1].split("options:", 1)[0]
    return re.findall(r"^    (\S+)\s", section, re.M)


def commands_in_help(capsys) -> list[str]:
    """Every command `python -m llavaction_jax --help` lists; one with sub-commands counts each of them."""
    out = []
    for command in listed_commands(help_text([], capsys)):
        text = help_text([command], capsys)
        nested = listed_commands(text) if "positional arguments:" in text and command in _cli_e2e.NESTED else []
        out += [f"{command} {n}" for n in nested] or [command]
    return out


def marked_commands() -> dict[str, list[str]]:
    """command -> the tests marked @pytest.mark.cli_e2e(command), read from the test files' source."""
    found: dict[str, list[str]] = {}
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                for decorator in node.decorator_list:
                    if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                            and decorator.func.attr == "cli_e2e"):
                        for arg in decorator.args:
                            found.setdefault(ast.literal_eval(arg), []).append(f"{path.name}::{node.name}")
    return found


def test_every_command_in_help_has_an_end_to_end_test(capsys):
    listed = commands_in_help(capsys)
    assert set(listed) >= {"demo", "train", "eval", "eval-suite", "predict", "convert to-torch", "convert from-torch",
                           "extract-frames", "build-mqa", "build-train", "build-bench videomme"}
    assert set(cli.COMMANDS) == {c.split()[0] for c in listed}
    marked = marked_commands()
    missing = [c for c in listed if c not in marked]
    assert not missing, f"commands listed in --help without a @pytest.mark.cli_e2e test: {missing}"


class _Item:
    def __init__(self, nodeid, fixturenames=()):
        self.nodeid, self.fixturenames = nodeid, list(fixturenames)


def test_the_register_counts_only_real_successful_runs_of_the_test_itself_or_its_fixtures(monkeypatch):
    runs = [_cli_e2e.Run("eval", ("eval", "--help"), 0, ("test", "t::help_only")),
            _cli_e2e.Run("eval", ("eval", "--preset", "tiny"), 2, ("test", "t::failed")),
            _cli_e2e.Run("eval", ("eval", "--preset", "tiny", "--print-config"), 0, ("test", "t::printed")),
            _cli_e2e.Run("eval", ("eval", "--preset", "tiny"), 0, ("test", "t::other")),
            _cli_e2e.Run("convert from-torch", ("convert", "from-torch", "x", "--check"), 0, ("test", "t::check")),
            _cli_e2e.Run("eval-suite", ("eval-suite", "--data", "d"), 0, ("fixture", "runs"))]
    monkeypatch.setattr(_cli_e2e, "RUNS", runs)
    for nodeid in ("t::help_only", "t::failed", "t::printed", "t::elsewhere"):
        assert not _cli_e2e._ran("eval", _Item(nodeid))
    assert _cli_e2e._ran("eval", _Item("t::other"))
    assert not _cli_e2e._ran("convert from-torch", _Item("t::check"))
    assert _cli_e2e._ran("eval-suite", _Item("t::x", ["runs"])) and not _cli_e2e._ran("eval-suite", _Item("t::y"))
    assert _cli_e2e.command_of(["convert", "to-torch", "a"]) == "convert to-torch"
    assert _cli_e2e.command_of(["eval", "--preset", "tiny"]) == "eval"


# --------------------------------------------------------------------------------------------- --version
def test_version_is_the_packages(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"llavaction-jax {__version__}\n"
    run = subprocess.run([sys.executable, "-m", "llavaction_jax", "--version"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and run.stdout == f"llavaction-jax {__version__}\n"
    assert 'attr = "llavaction_jax.__version__"' in (REPO / "pyproject.toml").read_text()


# ------------------------------------------------------------------------------------------------- --help
def option_blocks(text: str) -> dict[str, str]:
    """{"--flag": its whole help text} of a --help output (the "options:" section)."""
    blocks, current = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        match = re.match(r"^  (-\S+)", line)
        if match:
            current = match.group(1).rstrip(",")
            blocks[current] = line
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def all_helps(capsys) -> dict[str, dict[str, str]]:
    return {c: option_blocks(help_text(c.split(), capsys)) for c in commands_in_help(capsys)}


def test_help_shows_each_default_once_and_no_empty_default(capsys):
    for command, blocks in all_helps(capsys).items():
        for flag, text in blocks.items():
            assert text.count("(default:") <= 1, (command, flag, text)
            assert "(default: None)" not in text, (command, flag, text)


def test_shared_flags_are_spelled_and_explained_the_same_everywhere(capsys):
    helps = all_helps(capsys)
    frames = {c: b["--num-frames"] for c, b in helps.items() if "--num-frames" in b}
    assert set(frames) >= {"demo", "extract-frames", "build-mqa", "build-train", "eval", "eval-suite", "predict"}
    assert all(text.startswith("--num-frames N frames per clip: ") for text in frames.values()), frames
    meshes = {c: b["--mesh"] for c, b in helps.items() if "--mesh" in b}
    assert set(meshes) == {"eval", "eval-suite", "convert from-torch"}
    common = "--mesh data=D,fsdp=F,tensor=T device mesh over all devices of all processes, as axis=size"
    assert all(text.startswith(common) for text in meshes.values()), meshes
    distributed = {c: (b["--distributed"], b["--coordinator"]) for c, b in helps.items() if "--distributed" in b}
    assert set(distributed) == {"eval", "eval-suite", "convert from-torch"} and len(set(distributed.values())) == 1
    assert "config.train.output_dir" in helps["train"]["--out"]
    assert "--config.model.pool_mode" in helps["eval-suite"]["--pool-mode"]
    assert "--config.model.compute_dtype" in helps["predict"]["--compute-dtype"]


@pytest.mark.parametrize("argv, flag", [
    (["predict", "--vidoe", "x.mp4"], "--vidoe"),
    (["eval", "--qestions", "q.jsonl"], "--qestions"),
    (["extract-frames", "--num-frams", "4"], "--num-frams"),
    (["convert", "to-torch", "src", "--layuot", "upstream"], "--layuot"),
    (["build-bench", "videomme", "--annotatons", "a.json"], "--annotatons"),
    (["convert", "to-torch", "src", "--out", "o", "--config.model.attention=flash"], "--config.model.attention"),
])
def test_a_mistyped_flag_is_named_as_unrecognized(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"error: unrecognized arguments: {flag} (see" in line and "required" not in line


def test_a_misspelled_config_key_is_one_line_naming_it(capsys):
    assert main(["train", "--print-config", "--config.train.stesp=3"]) == 2
    assert capsys.readouterr().err.strip() == ('train: error: --config.train.stesp: no field \'stesp\' (did you mean '
                                               '"steps" instead of "stesp"?)')
    assert main(["train", "--print-config", "--config.train.steps=many"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("train: error: --config.train.steps=many: ")


# -------------------------------------------------------------------------------- inputs before the heavy part
@pytest.fixture
def unloadable_model(tmp_path):
    """A model directory whose config reads but whose weights cannot load: a command that reports something else
    checked it before loading the model."""
    from llavaction_jax.config import load_preset

    model = tmp_path / "model"
    (model / "params").mkdir(parents=True)
    load_preset("tiny").save(model / "llavaction_config.json")
    return model


def refused(argv, capsys) -> str:
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


def test_predict_checks_the_video_before_loading_the_model(unloadable_model, tmp_path, capsys):
    line = refused(["predict", "--model", str(unloadable_model), "--video", str(tmp_path / "nope.mp4"), "--out",
                    str(tmp_path / "answers.jsonl")], capsys)
    assert line == f"predict: error: --video {tmp_path / 'nope.mp4'}: no such file"
    batch = tmp_path / "clips.jsonl"
    assert refused(["predict", "--model", str(unloadable_model), "--batch", str(batch)], capsys) == (
        f"predict: error: --batch {batch}: no such file")
    batch.write_text('{"video": "gs://bucket/a.mp4"}\n')  # (a missing video in a batch is that clip's failure)
    assert "URL paths are not supported" in refused(["predict", "--model", str(unloadable_model), "--batch",
                                                     str(batch)], capsys)
    assert "--num-frames 0: must be at least 1" in refused(
        ["predict", "--model", str(unloadable_model), "--video", str(batch), "--num-frames", "0"], capsys)
    assert "--config.model.atention: no field" in refused(
        ["predict", "--model", str(unloadable_model), "--video", str(batch), "--config.model.atention=flash"], capsys)
    assert not (tmp_path / "answers.jsonl").exists()


def test_eval_names_a_missing_question_file_before_anything_else(unloadable_model, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    for model in (["--model", str(unloadable_model)], ["--preset", "tiny"]):
        line = refused(["eval", *model, "--questions", "nope.jsonl", "--shards", str(shards), "--out",
                        str(tmp_path / "out")], capsys)
        assert line == "eval: error: --questions nope.jsonl: no such file"
    (tmp_path / "q.jsonl").write_text("{}\n")
    assert refused(["eval", "--preset", "tiny", "--questions", str(tmp_path / "q.jsonl"), "--shards",
                    str(tmp_path / "none"), "--out", str(tmp_path / "out")], capsys).endswith(
        f"--shards {tmp_path / 'none'}: no such directory")
    assert "--batch-size 0: must be at least 1" in refused(
        ["eval", "--preset", "tiny", "--questions", str(tmp_path / "q.jsonl"), "--shards", str(shards), "--out",
         str(tmp_path / "out"), "--batch-size", "0"], capsys)
    assert not (tmp_path / "out").exists()


def test_eval_suite_and_convert_check_their_inputs_first(unloadable_model, tmp_path, capsys):
    assert refused(["eval-suite", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--model",
                    str(unloadable_model)], capsys) == f"eval-suite: error: --data {tmp_path / 'none'}: no such directory"
    (tmp_path / "data").mkdir()
    assert "--pool-mode and --config.model.pool_mode set the same field" in refused(
        ["eval-suite", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--model",
         str(unloadable_model), "--pool-mode", "average", "--config.model.pool_mode=max"], capsys)
    assert refused(["convert", "to-torch", str(tmp_path / "none"), "--out", str(tmp_path / "exp")], capsys) == (
        f"convert: error: SRC {tmp_path / 'none'}: no such directory")
    assert "cannot read size 'lots'" in refused(["convert", "to-torch", str(unloadable_model), "--out",
                                                 str(tmp_path / "exp"), "--buffer-size", "lots"], capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "exp").exists()


def test_the_demo_refuses_bad_settings_before_writing_anything(tmp_path, capsys):
    for flag in ("--steps", "--batch-size", "--segments-per-action", "--num-frames"):
        assert refused(["demo", "--out", str(tmp_path / "demo"), flag, "0"], capsys) == (
            f"demo: error: {flag} 0: must be at least 1")
    assert not (tmp_path / "demo").exists()
