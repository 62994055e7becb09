"""Teachers sharpened from the student (uniopd.sharpen): a round keeps only verified-correct, finished samples, its
prompts are fresh and never held-out ones, and a teacher's recipe depends on its parent's."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest

from proto.rollout import Sample
from uniopd import expert_models
from uniopd.expert_models import ModelSpec, SharpenedSpec, ensure_models, is_current, model_dir, recipe_of
from uniopd.sharpen import RFTRecipe, fresh_tasks, keep_correct, sample_and_verify
from uniopd.synthetic import code_tasks, math_tasks, visual_tasks
from uniopd.synthetic.datasets import domain_records, identity

MATH = math_tasks.MathTask("Ann", "pens", 7, (math_tasks.Op("add", 5), math_tasks.Op("sub", 3)))
CODE = code_tasks.CodeTask(3, 2, 3)
VISUAL = visual_tasks.sample_task(random.Random(3), 3)


class Chars:
    """A character-level stand-in for the shared tokenizer (training a BPE takes seconds): the prompt is rendered as
    its text, and END plays <|im_end|>."""

    END = 0x110000

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return messages[-1]["content"]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i != self.END)


class Scripted:
    """A sampler that returns fixed (text, finished) responses per prompt, in order."""

    def __init__(self, responses: list[list[tuple[str, bool]]], vision: object = None,
                 temperature: float = 1.0) -> None:
        self.responses, self.vision, self.temperature = responses, vision, temperature
        self.images: list = []

    def generate(self, prompts, options, images=None) -> list[list[Sample]]:
        assert (options.temperature, options.top_p, options.top_k) == (self.temperature, 1.0, 0)  # held-out protocol
        assert (images is not None) == (self.vision is not None)  # a text model gets no images argument
        self.images += images or []
        out = []
        for _ in prompts:
            group = []
            for text, finished in self.responses.pop(0):
                ids = [ord(c) for c in text] + ([Chars.END] if finished else [])
                group.append(Sample(np.array(ids, np.int64), np.zeros(len(ids), np.float32),
                                    "stop" if finished else "length"))
            assert len(group) == options.n
            out.append(group)
        return out


def test_a_round_keeps_only_verified_correct_finished_responses():
    right, wrong = MATH.solution("steps"), MATH.solution("steps", slip=0, rng=random.Random(0))
    responses = [[(right, True), (right, True), (wrong, True), (right, False)],  # a duplicate, a slip, a truncation
                 [(CODE.solution("lambda"), True), (CODE.solution("def", slip=True), True),
                  (CODE.solution("def"), True), ("f = lambda x: 2*x+", True)]]
    samples = sample_and_verify(Scripted(responses), Chars(), [MATH, CODE], 4, seed=0)
    assert [s.correct for s in samples] == [True, True, False, True, True, False, True, False]
    assert keep_correct(samples) == [(MATH.prompt(), right, ()), (MATH.prompt(), right, ()),
                                     (CODE.prompt(), CODE.solution("lambda"), ()),
                                     (CODE.prompt(), CODE.solution("def"), ())]


def test_a_round_samples_at_the_recipes_temperature():
    right = MATH.solution("steps")
    samples = sample_and_verify(Scripted([[(right, True)]], temperature=0.6), Chars(), [MATH], 1, seed=0,
                                temperature=0.6)
    assert keep_correct(samples) == [(MATH.prompt(), right, ())]


def test_a_visual_round_samples_and_keeps_the_picture_with_the_prompt():
    right = VISUAL.solution("count")
    wrong = VISUAL.solution("count", slip=1, rng=random.Random(0))
    sampler = Scripted([[(right, True), (wrong, True)]], vision="a vision model")
    samples = sample_and_verify(sampler, Chars(), [VISUAL], 2, seed=0)
    assert [s.correct for s in samples] == [True, False]  # checked by the math verifier ("The answer is N.")
    assert [im.tobytes() for (im,) in sampler.images] == [VISUAL.render().tobytes()]
    [(prompt, text, (image,))] = keep_correct(samples)
    assert (prompt, text) == (VISUAL.prompt(), right) and image.size == (64, 64)


@pytest.mark.parametrize("domain", ["math", "code", "visual"])
def test_sharpening_prompts_are_distinct_fresh_each_round_and_never_held_out(domain):
    recipe = RFTRecipe(domain, rounds=2, prompts=100, samples=4)
    rng = random.Random(0)
    first, second = fresh_tasks(recipe, rng), fresh_tasks(recipe, rng)
    held_out = {identity(r) for r in domain_records(domain, *recipe.held_out)[1]}
    for tasks in (first, second):
        keys = {identity(record_as_written(t)) for t in tasks}
        assert len(keys) == 100 and not keys & held_out
    assert first != second


def test_level_weights_set_the_share_of_each_level_among_the_prompts():
    levels = [t.record()["level"] for t in fresh_tasks(RFTRecipe("math", 1, 400, 4, level_weights=(0, 1, 0, 3)),
                                                       random.Random(0))]
    assert set(levels) == {2, 4} and 0.65 < levels.count(4) / len(levels) < 0.85
    with pytest.raises(ValueError, match="level_weights: math has 4 levels, got 2"):
        fresh_tasks(RFTRecipe("math", 1, 4, 4, level_weights=(1, 1)), random.Random(0))


def record_as_written(task) -> dict:
    """As the held-out files write it (datasets.domain_records): pictures under images/."""
    record = task.record()
    return {**record, "images": [f"images/{n}" for n in record["images"]]} if "images" in record else record


def test_a_teachers_recipe_contains_its_parents_so_a_changed_parent_makes_it_stale(tmp_path):
    parent = ModelSpec("p", 64, 1, ("steps",), (), steps=3)
    teacher = SharpenedSpec("t", parent, RFTRecipe("math", rounds=1, prompts=4, samples=2))
    out = model_dir(teacher, tmp_path)
    out.mkdir(parents=True)
    (out / "recipe.json").write_text(json.dumps(recipe_of(teacher)))
    assert is_current(teacher, tmp_path)
    assert not is_current(SharpenedSpec("t", replace(parent, steps=4), teacher.rft), tmp_path)
    assert not is_current(replace(teacher, rft=replace(teacher.rft, rounds=2)), tmp_path)


def test_the_domain_teachers_and_their_quick_versions_are_sharpened_from_the_student():
    for name, domain in (("math-teacher", "math"), ("code-teacher", "code")):
        spec = expert_models.SPECS[name]
        assert spec.parent == expert_models.SPECS["student"] and spec.rft.domain == domain
        quick = spec.scaled(expert_models.QUICK_FACTOR)
        assert quick.parent == expert_models.SPECS["student"].scaled(expert_models.QUICK_FACTOR)
        assert quick.rft.rounds == 1 and quick.rft.prompts < spec.rft.prompts


@pytest.mark.e2e
def test_ensure_models_builds_the_parent_first_then_sharpens_a_copy(tmp_path):
    parent = ModelSpec("p", 64, 1, ("steps",), (), steps=3, batch=4)
    teacher = SharpenedSpec("t", parent, RFTRecipe("math", rounds=2, prompts=4, samples=2, batch=4))
    paths = ensure_models([teacher], tmp_path)
    assert is_current(parent, tmp_path) and is_current(teacher, tmp_path)
    history = json.loads((paths["t"] / "sharpen.json").read_text())
    assert [h["round"] for h in history] == [1, 2] and all(h["samples"] == 8 for h in history)
    weights = paths["t"] / "model.safetensors"
    first = weights.stat().st_mtime_ns
    assert ensure_models([teacher], tmp_path)["t"] == paths["t"] and weights.stat().st_mtime_ns == first  # reused
    ensure_models([SharpenedSpec("t", replace(parent, steps=4), teacher.rft)], tmp_path)
    assert json.loads((paths["t"] / "recipe.json").read_text())["parent"]["steps"] == 4
    assert not (tmp_path / "models" / "t.partial").exists()


@pytest.mark.e2e
def test_a_visual_teacher_is_sharpened_from_a_vision_student(tmp_path):
    parent = ModelSpec("vp", 64, 1, (), (), steps=3, batch=4, visual_styles=("count",), vision=True)
    teacher = SharpenedSpec("vt", parent, RFTRecipe("visual", rounds=1, prompts=4, samples=2, batch=4))
    paths = ensure_models([teacher], tmp_path)
    [round_] = json.loads((paths["vt"] / "sharpen.json").read_text())
    assert round_["samples"] == 8 and 0 <= round_["pass_rate"] <= 1
    assert (paths["vt"] / "processor_config.json").exists()  # still a vision model, loadable by both backends
