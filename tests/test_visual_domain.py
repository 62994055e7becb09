"""The synthetic visual domain: what the pictures show (read back from the pixels), the answers against the real math
verifier, and the dataset files with their images."""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.verifiers import verify
from uniopd.synthetic import visual_tasks as vt
from uniopd.synthetic.datasets import domain_records, write_datasets

RGB_TO_COLOR = {rgb: name for name, rgb in vt.COLORS.items()}


def components(image: Image.Image) -> list[tuple[str, str]]:
    """(color, kind) of every 4-connected blob of non-white pixels, read from the pixels alone."""
    pixels = np.asarray(image)
    todo = set(zip(*np.nonzero((pixels != 255).any(axis=-1)), strict=True))
    blobs = []
    while todo:
        stack, blob = [todo.pop()], []
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for nb in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if nb in todo:
                    todo.remove(nb)
                    stack.append(nb)
        colors = {tuple(int(c) for c in pixels[y, x]) for y, x in blob}
        assert len(colors) == 1 and colors <= set(RGB_TO_COLOR), colors  # one flat palette color per shape
        ys, xs = zip(*blob, strict=True)
        height, width = max(ys) - min(ys) + 1, max(xs) - min(xs) + 1
        assert height == width and vt.MIN_SIZE <= width <= vt.MAX_SIZE, (height, width)
        fill = len(blob) / (height * width)
        assert fill > 0.98 or 0.7 < fill < 0.85, fill  # square ≈ 1, circle ≈ π/4
        blobs.append((RGB_TO_COLOR[colors.pop()], "square" if fill > 0.98 else "circle"))
    return blobs


def asked(prompt: str) -> tuple[str | None, str | None]:
    """(color, kind) the question asks about, parsed from the prompt text."""
    words = re.fullmatch(r"<image>\nHow many (.+) are in the picture\?", prompt).group(1).split()
    color = words[0] if words[0] in vt.COLORS else None
    kind = words[-1].removesuffix("s") if words[-1] != "shapes" else None
    return color, kind


def test_generator_is_deterministic_down_to_the_png_bytes():
    first, again, other = vt.sample_tasks(3, 40), vt.sample_tasks(3, 40), vt.sample_tasks(4, 40)
    assert first == again and [t.png() for t in first] == [t.png() for t in again]
    assert [t.record() for t in first] == [t.record() for t in again]
    assert first != other and [t.png() for t in first] != [t.png() for t in other]
    assert len({t.record()["images"][0] for t in first}) == len({t.png() for t in first})  # content-named


def test_pictures_show_the_counted_shapes():
    tasks = vt.sample_tasks(0, 300)
    for task in tasks:
        image = task.render()
        assert image.size == (vt.IMAGE_SIZE, vt.IMAGE_SIZE) and image.mode == "RGB"
        blobs = components(image)
        assert len(blobs) == task.level  # shapes never touch, overlap or leave the picture
        assert Counter(blobs) == Counter((s.color, s.kind) for s in task.shapes)
        color, kind = asked(task.prompt())
        seen = sum(color in (None, c) and kind in (None, k) for c, k in blobs)
        assert seen == task.answer == int(task.record()["answer"]), (task.prompt(), blobs)
    assert {asked(t.prompt()) != (None, None) for t in tasks} == {True, False}


def test_prompt_has_one_image_placeholder_and_questions_mix():
    tasks = vt.sample_tasks(1, 400)
    assert all(t.prompt().count(vt.IMAGE_TOKEN) == 1 and t.prompt().startswith(vt.IMAGE_TOKEN) for t in tasks)
    mix = Counter("color" if t.target_color else "kind" if t.target_kind else "all" for t in tasks)
    assert set(mix) == {"color", "kind", "all"} and min(mix.values()) >= 40, mix
    assert Counter(t.level for t in tasks).keys() == set(range(1, vt.MAX_LEVEL + 1))
    answers = Counter(t.answer for t in tasks)
    assert answers[0] > 0 and max(answers) >= 5, answers  # some empty counts, some large ones


@pytest.mark.parametrize("style", vt.STYLES)
def test_solutions_in_every_style_are_correct_and_slips_are_not(style):
    rng = random.Random(0)
    for task in vt.sample_tasks(2, 200):
        record = task.record()
        correct = task.solution(style)
        assert verify("math", correct, record).correct, correct
        assert len(correct.split()) <= 20, correct
        for delta in (1, -1):
            slipped = task.solution(style, slip=delta, rng=rng)
            assert not verify("math", slipped, record).correct, slipped
            count = int(re.search(r"The answer is (\d+)\.$", slipped).group(1))
            assert count == (task.answer + delta if task.answer + delta >= 0 else 1)
            if style == "list":  # the listed shapes agree with the wrong count
                assert count == (0 if slipped.startswith("None.") else slipped.split(".")[0].count(",") + 1)
            else:
                assert slipped.startswith(f"I count {count} ")


def test_styles_read_naturally_and_slips_stay_consistent():
    shapes = (vt.Shape("square", "red", 0, 1, 1, 12), vt.Shape("circle", "blue", 1, 2, 2, 10),
              vt.Shape("circle", "red", 5, 3, 1, 11))
    task = vt.VisualTask(shapes, target_color="red")
    assert task.prompt() == "<image>\nHow many red shapes are in the picture?"
    assert task.solution("list") == "Red square, red circle. The answer is 2."
    assert task.solution("count") == "I count 2 red shapes. The answer is 2."
    assert task.solution("count", slip=-1) == "I count 1 red shape. The answer is 1."
    assert task.solution("list", slip=-1, rng=random.Random(0)) in ("Red square. The answer is 1.",
                                                                     "Red circle. The answer is 1.")
    none = vt.VisualTask(shapes, target_kind="square")
    assert none.solution("count") == "I count 1 square. The answer is 1."
    empty = vt.VisualTask(shapes[1:2], target_color="green")
    assert empty.solution("list") == "None. The answer is 0." and empty.answer == 0
    assert empty.solution("list", slip=-1, rng=random.Random(0)) in ("Green square. The answer is 1.",
                                                                      "Green circle. The answer is 1.")
    assert vt.VisualTask(shapes).solution("count") == "I count 3 shapes. The answer is 3."


def test_invalid_tasks_are_refused():
    with pytest.raises(ValueError, match="cell"):
        vt.VisualTask((vt.Shape("square", "red", 0, 1, 1, 10), vt.Shape("circle", "red", 0, 2, 2, 10)))
    with pytest.raises(ValueError, match="leaves"):
        vt.VisualTask((vt.Shape("square", "red", 3, 5, 1, 12),))
    with pytest.raises(ValueError, match="not both"):
        vt.VisualTask((), target_color="red", target_kind="square")
    with pytest.raises(ValueError, match="level"):
        vt.sample_task(random.Random(0), vt.MAX_LEVEL + 1)
    with pytest.raises(ValueError, match="style"):
        vt.sample_tasks(0, 1)[0].solution("essay")


def test_held_out_pictures_and_questions_never_occur_in_training():
    train, held_out = domain_records("visual", 0, 300, 40)
    assert len(train) == 300 and len(held_out) == 40
    key = lambda r: (r["prompt"], tuple(r["images"]))  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held_out} and len({key(r) for r in held_out}) == 40
    assert Counter(r["level"] for r in train).keys() == set(range(1, vt.MAX_LEVEL + 1))
    assert all(r["images"][0].startswith("images/") for r in train + held_out)


def test_write_datasets_writes_visual_records_with_their_images(tmp_path):
    from trainer.data import load_records

    paths = write_datasets(tmp_path, seed=0, n_train=12, n_eval=4, domains=("visual",))
    assert sorted(paths) == ["visual_eval", "visual_train"]
    assert not (tmp_path / "math_train.jsonl").exists()
    lines = paths["visual_train"].read_text().splitlines() + paths["visual_eval"].read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records == [r for split in domain_records("visual", 0, 12, 4) for r in split]
    tasks = {t.prompt() + t.png().hex(): t for t in vt.sample_tasks(0, 12 + 80)}
    for record in records:
        assert set(record) == {"domain", "prompt", "answer", "level", "images"} and len(record["images"]) == 1
        data = (tmp_path / record["images"][0]).read_bytes()  # relative to the jsonl file's directory
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
        task = tasks[record["prompt"] + data.hex()]
        assert data == task.png() and record["answer"] == str(task.answer)
        assert record["images"] == [f"images/{task.image_name()}"]
    assert len(list((tmp_path / "images").iterdir())) == len({r["images"][0] for r in records})
    loaded = load_records([paths["visual_train"], paths["visual_eval"]], {"visual"})
    assert [Path(r["images"][0]).read_bytes() for r in loaded] == [(tmp_path / r["images"][0]).read_bytes()
                                                                   for r in records]
