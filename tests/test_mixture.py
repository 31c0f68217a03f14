"""Data mixtures: upstream's YAML sampling strategies, JSON / JSONL sample files, errors that name the record."""

import json
import math

import pytest

from llavaction_jax.data.mixture import (SOURCE_KEY, MixtureError, apply_sampling_strategy, load_mixture,
                                         parse_sampling_strategy)


def sample(i, **extra):
    return {"id": f"s{i}", "video": "P01-P01_01", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": f"a{i}"}], **extra}


def write_jsonl(path, samples):
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def ids(samples):
    return [s["id"] for s in samples]


@pytest.fixture
def files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [sample(i) for i in range(10)])
    (tmp_path / "b.json").write_text(json.dumps([sample(100 + i, verb_id=i, noun_id=2, action_id=3,
                                                        start_timestamp=1.5, end_timestamp="2.25") for i in range(7)]))
    return tmp_path


def test_strategies_follow_upstream():
    items = list(range(10))
    assert apply_sampling_strategy(items, "all") == items
    assert apply_sampling_strategy(items, "first:3") == [0, 1, 2]
    assert apply_sampling_strategy(items, "end:3") == [7, 8, 9]
    assert apply_sampling_strategy(items, "end:0") == []  # upstream's data[-0:] would keep all
    assert apply_sampling_strategy(items, "first:25%") == [0, 1, 2]  # ceil(2.5)
    assert apply_sampling_strategy(items, "end:12.5%") == [8, 9]  # ceil(1.25)
    assert apply_sampling_strategy(items, "first:50") == items  # more than there are: all
    picked = apply_sampling_strategy(items, "random:4", seed=1)
    assert len(picked) == 4 == len(set(picked)) and set(picked) <= set(items)
    assert apply_sampling_strategy(items, "random:4", seed=1) == picked  # seeded
    assert apply_sampling_strategy(items, "random:4", seed=2) != picked
    assert len(apply_sampling_strategy(items, "random:33%", seed=0)) == math.ceil(3.3)
    assert parse_sampling_strategy("random:5%") == ("random", None, 5.0)


@pytest.mark.parametrize("bad", ["50%", "first", "sample:3", "first:-1", "first:x", "random:150%", "all:3"])
def test_unknown_strategies_are_errors(bad):
    with pytest.raises(ValueError, match="sampling_strategy"):
        parse_sampling_strategy(bad)


def test_yaml_mixture_concatenates_in_order_and_is_deterministic(files):
    (files / "mix.yaml").write_text(
        "datasets:\n"
        "  - json_path: a.jsonl\n    sampling_strategy: end:2\n"  # relative to the YAML's directory
        f"  - json_path: {files / 'b.json'}\n    sampling_strategy: random:50%\n"
        "  - json_path: a.jsonl\n")  # no strategy: all
    samples = load_mixture(files / "mix.yaml", seed=3)
    assert ids(samples[:2]) == ["s8", "s9"]
    middle = ids(samples[2:6])
    assert len(middle) == 4 and set(middle) <= {f"s{100 + i}" for i in range(7)}
    assert ids(samples[6:]) == [f"s{i}" for i in range(10)]
    assert ids(load_mixture(files / "mix.yaml", seed=3)) == ids(samples)
    assert any(ids(load_mixture(files / "mix.yaml", seed=s))[2:6] != middle for s in range(4, 8))
    # Samples are kept as they are, plus where they came from; EK100 fields survive untouched.
    assert samples[0][SOURCE_KEY] == f"{files / 'a.jsonl'}:9"
    first_b = next(s for s in samples if s["id"].startswith("s1"))
    assert first_b["end_timestamp"] == "2.25" and first_b["noun_id"] == 2
    assert first_b[SOURCE_KEY].startswith(f"{files / 'b.json'}[")


def test_single_files_and_brace_lists(files):
    assert ids(load_mixture(files / "a.jsonl")) == [f"s{i}" for i in range(10)]
    assert ids(load_mixture(files / "b.json")) == [f"s{100 + i}" for i in range(7)]
    write_jsonl(files / "c.jsonl", [sample(200)])
    assert ids(load_mixture(f"{files}/{{a,c}}.jsonl")) == [f"s{i}" for i in range(10)] + ["s200"]


@pytest.mark.parametrize("content, message", [
    ('{"id": 1, "conversations": []}\n', r"bad\.jsonl:2: 'conversations' must be a non-empty list"),
    ('{"id": 1, "conversations": [{"from": "human"}]}\n', r"bad\.jsonl:2: conversations\[0\] must be an object"),
    ('{"id": 1\n', r"bad\.jsonl:2: not valid JSON"),
    ('[1, 2]\n', r"bad\.jsonl:2: a sample must be a JSON object"),
    ('{"video": 3, "conversations": [{"from": "human", "value": "x"}]}\n', r"bad\.jsonl:2: 'video' must be a string"),
    ('{"verb_id": "3", "conversations": [{"from": "human", "value": "x"}]}\n', r"bad\.jsonl:2: 'verb_id' must be an"),
    ('{"start": "soon", "conversations": [{"from": "human", "value": "x"}]}\n', r"bad\.jsonl:2: 'start' must be a"),
])
def test_bad_samples_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(sample(0)) + "\n" + content)
    with pytest.raises(MixtureError, match=message):
        load_mixture(path)


def test_bad_files_and_yaml_name_the_file(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([sample(0), {"conversations": "no"}]))
    with pytest.raises(MixtureError, match=r"list\.json\[1\]: 'conversations'"):
        load_mixture(tmp_path / "list.json")
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(MixtureError, match=r"obj\.json: expected a JSON list"):
        load_mixture(tmp_path / "obj.json")
    with pytest.raises(MixtureError, match=r"missing\.jsonl does not exist"):
        load_mixture(tmp_path / "missing.jsonl")
    with pytest.raises(MixtureError, match="unsupported sample file type"):
        load_mixture(tmp_path / "data.csv")
    write_jsonl(tmp_path / "a.jsonl", [sample(0)])
    (tmp_path / "mix.yaml").write_text("datasets:\n  - json_path: a.jsonl\n    sampling_strategy: 50%\n")
    with pytest.raises(MixtureError, match=r"mix\.yaml: datasets\[0\]: sampling_strategy '50%'"):
        load_mixture(tmp_path / "mix.yaml")
    (tmp_path / "mix.yaml").write_text("datasets:\n  - json_path: nope.jsonl\n")
    with pytest.raises(MixtureError, match=r"mix\.yaml: datasets\[0\]: .*nope\.jsonl does not exist"):
        load_mixture(tmp_path / "mix.yaml")
    (tmp_path / "mix.yaml").write_text("data: []\n")
    with pytest.raises(MixtureError, match=r"mix\.yaml: expected a top-level 'datasets:'"):
        load_mixture(tmp_path / "mix.yaml")
