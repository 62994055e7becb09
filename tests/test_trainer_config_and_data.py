"""Run config validation (errors name the field) and the resumable data order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from proto.schemas import Fingerprint, TeacherInfo
from trainer.config import ConfigError, load_config
from trainer.data import DataError, DataStream, load_records
from uniopd.experiment_plan import METHODS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "opd-tiny"


@pytest.fixture
def config_file(tmp_path, tiny_model) -> Path:
    tree = yaml.safe_load((EXAMPLE / "run.yaml").read_text())
    tree["student"]["model"] = str(tiny_model)
    tree["data"] = {"train": [str(EXAMPLE / "math_train.jsonl"), str(EXAMPLE / "code_train.jsonl")]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_example_config_loads_with_overrides(config_file):
    c = load_config(config_file, ["algorithm.lr=3e-5", "schedule.steps=7", "cache.url=none"])
    assert c.algorithm.lr == 3e-5 and c.schedule.steps == 7 and c.cache.url is None
    assert c.verifier_for("math") == "math" and c.teachers["math"].urls == ["http://127.0.0.1:8101"]
    assert c.output_dir.is_absolute()


@pytest.mark.parametrize(("override", "field"), [
    ("algorithm.lr=-1", "algorithm.lr"),
    ("algorithm.samples_per_prompt=0", "algorithm.samples_per_prompt"),
    ("algorithm.clip_low=1.5", "algorithm.clip_low"),
    ("algorithm.lr_typo=1", "algorithm.lr_typo"),
    ("teachers.math.urls=[ftp://x]", "teachers.math.urls"),
    ("verifiers.math=poetry", "verifiers.math"),
    ("rollout.temperature=0", "rollout.temperature"),
    ("data.train=[/no/such.jsonl]", "data.train"),
    ("student.model=/no/such/model", "student.model"),
    ("recipe.calibration.preset=paper", "recipe.calibration"),  # the paper gives no δ: the config must
    ("recipe.calibration.method=both", "recipe.calibration.method"),
    ("recipe.calibration.delta=oops", "recipe.calibration.delta"),
    ("recipe.online_balance.ratio=-1", "recipe.online_balance.ratio"),
    ("algorithm.updates_per_batch=5", "algorithm"),  # 4 x 4 samples do not split into 5 minibatches
    ("algorithm.teacher_signal=logits", "algorithm.teacher_signal"),
    ("algorithm.topk=0", "algorithm.topk"),
    ("teachers.math.teacher_signal=topk", "teachers.math.teacher_signal"),  # a pool may only fall back
])
def test_invalid_configs_name_the_field(config_file, override, field):
    with pytest.raises(ConfigError) as exc:
        load_config(config_file, [override])
    assert str(exc.value).startswith(field), str(exc.value)


def _info(max_top_k: int = 128, vocab: int = 512, max_values: int = 1 << 22,
          scoring: str = "gather") -> TeacherInfo:
    fp = Fingerprint(model="t", revision="r", tokenizer="tok", dtype="float32", backend="hf", digest="d" * 64)
    return TeacherInfo(model="t", revision="r", tokenizer_fingerprint="tok", vocab_size=vocab, max_length=4096,
                       max_top_k=max_top_k, dtype="float32", backend="hf", domains=["math"], fingerprint=fp,
                       candidate_scoring=scoring, limits={"max_distribution_values": max_values})


def test_a_teacher_that_cannot_give_the_signal_is_named_with_the_per_domain_fix(config_file):
    """What the start-up handshake and a teacher swap both refuse: a teacher whose --max-top-k is below topk, or
    whose max_distribution_values cannot take one response's values; the message names the per-domain way out."""
    c = load_config(config_file, ["algorithm.teacher_signal=topk", "algorithm.topk=32", "rollout.max_tokens=64"])
    math = c.teachers["math"]
    assert c.signal_of(math) == "topk" and c.signal_shortfall("math", math, _info(32)) is None
    short = c.signal_shortfall("math", math, _info(20))
    assert "algorithm.topk is 32" in short and "--max-top-k" in short
    assert "teachers.math.teacher_signal: sampled" in short
    # candidates picked from the engine's whole distribution count vocab values a position: 64 x 512 > 30000
    assert c.signal_shortfall("math", math, _info(max_values=30000)) is None  # gathered: 64 x 32 values
    assert "max_distribution_values" in c.signal_shortfall("math", math, _info(max_values=30000,
                                                                               scoring="full-distribution"))
    full = load_config(config_file, ["algorithm.teacher_signal=full", "rollout.max_tokens=64"])
    assert "32768 values (512 a position for full)" in full.signal_shortfall("math", full.teachers["math"],
                                                                             _info(max_values=30000))
    sampled = load_config(config_file, ["algorithm.teacher_signal=full", "teachers.math.teacher_signal=sampled"])
    assert sampled.signal_of(sampled.teachers["math"]) == "sampled"
    assert sampled.signal_of(sampled.teachers["code"]) == "full"
    assert sampled.signal_shortfall("math", sampled.teachers["math"], _info(1, max_values=1)) is None
    grpo = load_config(config_file, ["algorithm.estimator=grpo"])
    assert grpo.signal_of(grpo.teachers["math"]) is None and grpo.signal_shortfall("math", grpo.teachers["math"],
                                                                                   _info(1, max_values=1)) is None


def test_every_problem_is_reported_at_once(config_file):
    """A typo, a missing section and a bad value: one message lists all three, each with its field."""
    tree = yaml.safe_load(config_file.read_text())
    del tree["rollout"]
    tree["algorithm"] = {"lr": -1, "learning_rate": 1e-5}
    config_file.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as exc:
        load_config(config_file)
    lines = str(exc.value).splitlines()
    assert [line.split(":")[0] for line in lines] == ["rollout", "algorithm.lr", "algorithm.learning_rate"], lines


def test_missing_files_are_reported_together(config_file):
    with pytest.raises(ConfigError) as exc:
        load_config(config_file, ["data.train=[/no/a.jsonl, /no/b.jsonl]", "student.model=/no/model"])
    assert [line.split(":")[0] for line in str(exc.value).splitlines()] == ["data.train", "data.train",
                                                                             "student.model"]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_experiment_method_is_a_valid_config(config_file, method):
    overrides = [f"{k}={json.dumps(v) if v != float('inf') else '.inf'}" for k, v in METHODS[method].overrides.items()]
    c = load_config(config_file, overrides)
    for key, value in METHODS[method].overrides.items():
        node = c
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, key


def test_recipe_presets_fill_unset_fields(config_file):
    c = load_config(config_file, ["recipe.calibration.preset=release-text", "recipe.calibration.delta=0.2",
                                  "recipe.online_balance.enabled=true", "recipe.online_balance.ratio=.inf"])
    cal = c.recipe.calibration
    assert (cal.method, cal.mode, cal.scope, cal.direction, cal.delta) == ("shift", "mean", "group", "spread", 0.2)
    assert c.recipe.online_balance.ratio == float("inf")
    paper = load_config(config_file, ["recipe.calibration.preset=paper", "recipe.calibration.delta=0.1",
                                      "recipe.calibration.method=mask"]).recipe.calibration
    assert (paper.method, paper.mode, paper.direction) == ("mask", "minmax", "lift")
    assert load_config(config_file).recipe.calibration.method == "none"


def test_malformed_override(config_file):
    with pytest.raises(ConfigError, match="--set"):
        load_config(config_file, ["no-equals-sign"])


def test_records_need_domain_prompt_and_a_teacher(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"domain": "math", "prompt": "1+1", "answer": "2"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"d.jsonl:2"):
        load_records([path])
    path.write_text(json.dumps({"domain": "poetry", "prompt": "x"}) + "\n")
    with pytest.raises(DataError, match="no teacher"):
        load_records([path], {"math"})


def test_stream_resumes_in_the_same_order():
    a = DataStream(10, seed=3)
    first = a.take(7)
    b = DataStream(10, seed=3, **a.state())
    assert a.take(9) == b.take(9)
    assert sorted(first + DataStream(10, 3, 0, 7).take(3)) == list(range(10))  # an epoch is a permutation
    assert DataStream(10, seed=4).take(10) != DataStream(10, seed=3).take(10)
