"""One CLI language (cli_flags.py, cli.main): the shared flags, old spellings refused, one-line errors with one
exit status in every command."""

import argparse
import json
import re

import pytest

from llavaction_jax import cli, cli_flags, distributed, sharding
from llavaction_jax.cli import main
from test_ek100 import write_fake_annotations


def test_the_constants_match_the_modules_they_mirror():
    assert cli_flags.MESH_AXES == sharding.MESH_AXES and cli_flags.DISTRIBUTED_MODES == distributed.MODES


def test_mesh_takes_the_named_syntax_only(capsys):
    assert cli_flags.mesh_shape("data=2,fsdp=-1,tensor=1") == {"data": 2, "fsdp": -1, "tensor": 1}
    for bad in ("1,-1,2", "1,2", "data=x", "pipeline=2", "a,b,c"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli_flags.mesh_shape(bad)


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [["extract-frames"], ["build-mqa"], ["eval"], ["train"], ["demo"],
                                     ["convert", "from-torch"], ["convert", "to-torch"]])
def test_every_command_names_its_output_out_and_hides_the_old_spellings(command, capsys):
    text = _help(command, capsys)
    assert "--out" in text
    for old in ("--output", "--n-frames", "--frames ", "--process-index", "DST]"):
        assert old not in text, (command, old)


@pytest.mark.parametrize("command", [["eval"], ["eval-suite"], ["convert", "from-torch"]])
def test_mesh_and_multi_host_flags_are_the_same_everywhere(command, capsys):
    text = _help(command, capsys)
    assert "--mesh data=D,fsdp=F,tensor=T" in text and "--distributed {auto,on,off}" in text
    assert "--coordinator HOST:PORT" in text and "or 'auto'" not in text


def test_train_out_is_an_alias_of_its_config_field_and_clashes_with_it(tmp_path, capsys):
    assert main(["train", "--print-config", "--out", str(tmp_path / "run"), "--config.data.num_frames=8",
                 "--config.distributed=off", "--config.mesh.data=2"]) == 0
    printed = capsys.readouterr().out
    assert "num_frames: 8" in printed
    assert f"output_dir: {tmp_path / 'run'}" in printed and "distributed: 'off'" in printed
    assert "data: 2" in printed
    assert main(["train", "--print-config", "--out", "a", "--config.train.output_dir=b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train: error: --config.train.output_dir is also set by --out; give it once"]
    assert "an alias of --config.train.output_dir" in " ".join(_help(["train"], capsys).split())


@pytest.mark.parametrize("argv", [
    ["build-mqa", "--annotations", "ann", "--output", "q.jsonl"],
    ["build-mqa", "--annotations", "ann", "--out", "q.jsonl", "--n-frames", "8"],
    ["build-mqa", "--annotations", "ann", "--out", "q.jsonl", "--process-index", "0"],
    ["demo", "--frames", "4"],
    ["convert", "to-torch", "ours", "exported", "--out", "o"],
    ["eval", "--preset", "tiny", "--questions", "q", "--shards", "s", "--out", "o", "--mesh", "1,-1,1"],
    ["train", "--print-config", "--mesh", "data=2"],
])
def test_old_spellings_and_removed_shorthands_are_refused_in_one_line(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("unrecognized arguments" in err[0] or "expected axis=N items" in err[0]), err
    assert list(tmp_path.iterdir()) == []


def listed_commands(capsys) -> list[str]:
    """The subcommands `python -m llavaction_jax --help` lists."""
    section = _help([], capsys).split("positional arguments:")[1].split("options:")[0]
    return re.findall(r"^    (\S+)", section, flags=re.M)


def test_errors_are_one_line_with_exit_status_2_in_every_command(tmp_path, capsys):
    """A bad input of each command of --help: one line naming it, exit status 2, nothing written."""
    missing = str(tmp_path / "missing")
    user_dir, user_file = tmp_path / "not_by_the_demo", tmp_path / "a_file"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("a user's file")
    user_file.write_text("a file where a folder should go")
    runs = {  # command: (arguments, the path its error must name)
        "demo": (["--out", str(user_dir), "--steps", "1"], str(user_dir)),
        "extract-frames": (["--jsonl", missing, "--video-root", str(tmp_path), "--out", str(tmp_path / "o")], missing),
        "build-mqa": (["--annotations", missing, "--out", str(tmp_path / "q.jsonl")], missing),
        "build-train": (["--annotations", missing, "--out", str(tmp_path / "bt")], missing),
        "train": (["--config", missing], missing),
        "eval": (["--model", missing, "--questions", missing, "--shards", missing, "--out", str(tmp_path / "e")],
                 missing),
        "predict": (["--model", missing, "--video", missing + ".mp4", "--question", "what?"], missing),
        "convert": (["to-torch", missing, "--out", str(tmp_path / "t")], missing),
        "build-bench": (["egoschema", "--questions", missing, "--answers", missing, "--out", str(tmp_path / "b")],
                        missing),
        "eval-suite": (["--model", missing, "--data", missing, "--out", str(user_file)], missing),
    }
    assert sorted(runs) == sorted(listed_commands(capsys)), "every command of --help needs a case here"
    for command, (args, named) in runs.items():
        assert main([command, *args]) == cli.EXIT_ERROR == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"{command}: error: ") and named in err[0], (command, err)
    assert list(user_dir.iterdir()) == [user_dir / "notes.txt"]
    assert (user_dir / "notes.txt").read_text() == "a user's file"
    assert user_file.read_text() == "a file where a folder should go"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "not_by_the_demo"]  # nothing written


def test_usage_errors_are_one_line_too(capsys):
    for argv in (["eval", "--questions", "q"], ["convert", "from-torch", "src", "--dtype", "int3"], ["no-such"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ": error: " in err[0] and err[0].endswith("--help)"), err


def test_the_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["demo", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "was not written by the demo" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_bugs_keep_their_traceback_and_user_errors_can_show_theirs(monkeypatch):
    assert cli.is_user_error(ValueError("x")) and cli.is_user_error(FileNotFoundError("x"))
    assert cli.is_user_error(cli_flags.CommandError("x")) and not cli.is_user_error(TypeError("x"))
    assert cli.error_message(KeyError("no key 'a'\n  second line")) == "no key 'a'; second line"
    monkeypatch.setenv("LLAVACTION_TRACEBACK", "1")
    with pytest.raises(ValueError):
        main(["train", "--print-config", "--out", "a", "--config.train.output_dir=b"])


@pytest.mark.parametrize("argv", [
    ["convert", "from-torch", "src", "--out", "gs://bucket/llavaction-7b"],
    ["convert", "to-torch", "ours", "--out", "gs://bucket/exported"],
    ["predict", "--model", "m", "--video", "gs://bucket/x.mp4"],
    ["build-mqa", "--annotations", "ann", "--out", "gs://bucket/q.jsonl"],  # a pathlib.Path flag: "gs:/bucket"
    ["eval", "--preset", "tiny", "--questions", "q.jsonl", "--shards", "s3://b/shards", "--out", "o"],
    ["extract-frames", "--jsonl", "c.jsonl", "--video-root", "v", "--out", "file:///tmp/x"],
    ["train", "--print-config", "--config.model.init_from=gs://bucket/llava-video-7b"],
    ["train", "--print-config", "--out", "gs://bucket/run"],
])
def test_url_paths_are_refused_in_one_line_before_anything_is_written(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and "URL paths are not supported; mount the bucket" in err[0], err
    assert list(tmp_path.iterdir()) == []  # no local "gs:" folder
