"""The synthetic domains against the real verifiers (math answer check, code in the sandbox), the datasets, and the
expert-model cache."""

from __future__ import annotations

import json
import random
import re

import pytest

from trainer.verifiers import verify
from uniopd.synthetic import code_tasks, math_tasks
from uniopd.synthetic.datasets import domain_records, write_datasets


@pytest.mark.parametrize("style", math_tasks.STYLES)
def test_math_solutions_in_every_style_are_correct_and_slips_are_not(style):
    rng = random.Random(0)
    for task in math_tasks.sample_tasks(1, 40):
        record = task.record()
        assert verify("math", task.solution(style), record).correct, task.solution(style)
        slipped = task.solution(style, slip=rng.randrange(task.level), rng=rng)
        assert not verify("math", slipped, record).correct, slipped
        assert 0 <= task.answer <= math_tasks.MAX_TOTAL and record["level"] == len(task.ops)


@pytest.mark.parametrize("style", math_tasks.STYLES)
def test_a_misread_operand_is_computed_right_but_the_answer_is_wrong(style):
    """The student's SFT errors (uniopd.expert_models): every equation holds, one operand is not the prompt's."""
    rng = random.Random(0)
    for task in math_tasks.sample_tasks(2, 60):
        i = rng.randrange(task.level)
        misread = task.solution(style, misread=i, rng=rng)
        assert not verify("math", misread, task.record()).correct, misread
        if style == "steps":
            for equation in misread.split(". ")[:-1]:
                left, right = equation.split("=")
                a, sign, b = re.fullmatch(r"(-?\d+)([-+*])(\d+)", left).groups()
                assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[sign] == int(right), misread


def test_math_styles_differ_but_slips_change_one_number():
    task = math_tasks.MathTask("Ann", "pens", 7, (math_tasks.Op("add", 5), math_tasks.Op("sub", 3)))
    assert task.prompt() == "Ann has 7 pens. Then buys 5 more. Then gives 3 away. How many pens now?"
    assert task.solution("steps") == "7+5=12. 12-3=9. The answer is 9."
    assert task.solution("running") == "Start with 7. Add 5, get 12. Take 3, get 9. The answer is 9."

    class Fixed(random.Random):
        def choice(self, seq):
            return 1

    assert task.solution("steps", slip=0, rng=Fixed()) == "7+5=13. 13-3=10. The answer is 10."


def test_code_solutions_in_every_style_pass_the_hidden_tests_and_slips_fail():
    rng = random.Random(0)
    tasks = {(t.level, t.a, t.b): t for t in code_tasks.sample_tasks(2, 60)}.values()
    assert {t.level for t in tasks} == set(range(1, code_tasks.MAX_LEVEL + 1))
    for task in list(tasks)[:12]:
        record = task.record()
        for style in code_tasks.STYLES:
            assert verify("code", task.solution(style), record).correct, task.solution(style)
        slipped = task.solution("def", slip=True, rng=rng)
        assert not verify("code", slipped, record).correct, slipped


def test_code_prompt_shows_values_the_hidden_tests_do_not():
    task = code_tasks.CodeTask(level=3, a=2, b=3)
    assert task.prompt() == "Write a Python function f(x) with f(0)=3, f(1)=5, f(2)=7, f(3)=9."
    assert task.solution("lambda") == "f = lambda x: 2*x+3"
    tests = task.record()["tests"]
    assert "assert f(4) == 11" in tests and "f(0)" not in tests


def test_generators_are_deterministic_and_levels_are_checked():
    assert [t.record() for t in math_tasks.sample_tasks(5, 10)] == [t.record() for t in math_tasks.sample_tasks(5, 10)]
    assert [t.record() for t in math_tasks.sample_tasks(5, 10)] != [t.record() for t in math_tasks.sample_tasks(6, 10)]
    with pytest.raises(ValueError, match="level"):
        math_tasks.sample_task(random.Random(0), math_tasks.MAX_LEVEL + 1)
    with pytest.raises(ValueError, match="style"):
        code_tasks.CodeTask(1, 1, 1).solution("fortran")


@pytest.mark.parametrize("domain", ["math", "code"])
def test_held_out_prompts_never_occur_in_training(domain):
    train, held_out = domain_records(domain, 0, 200, 40)
    assert len(train) == 200 and len(held_out) == 40
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert len({r["prompt"] for r in held_out}) == 40


def test_write_datasets_writes_loadable_jsonl(tmp_path):
    from trainer.data import load_records

    paths = write_datasets(tmp_path, n_train=16, n_eval=4)
    assert sorted(paths) == ["code_eval", "code_train", "math_eval", "math_train"]
    assert len(load_records([paths["code_train"], paths["math_train"]], {"math", "code"})) == 32


@pytest.mark.e2e
def test_expert_models_are_trained_once_and_retrained_when_the_recipe_changes(tmp_path):
    from uniopd.expert_models import ModelSpec, ensure_models

    spec = ModelSpec("tiny", 64, 1, ("steps",), ("def",), steps=3, batch=4, seed=0)
    path = ensure_models([spec], tmp_path)["tiny"]
    weights = path / "model.safetensors"
    first = weights.stat().st_mtime_ns
    assert json.loads((path / "recipe.json").read_text())["steps"] == 3
    assert ensure_models([spec], tmp_path)["tiny"] == path and weights.stat().st_mtime_ns == first  # reused
    changed = ModelSpec(**{**spec.__dict__, "steps": 4})
    ensure_models([changed], tmp_path)
    assert json.loads((path / "recipe.json").read_text())["steps"] == 4 and weights.stat().st_mtime_ns != first
    assert not (tmp_path / "models" / "tiny.partial").exists()
