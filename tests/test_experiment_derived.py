"""What the experiment keeps beside the cached models (teacher accuracy, the student's pass counts): named by
everything it was computed from, so a cached model reuses it and any change recomputes it."""

from __future__ import annotations

from pathlib import Path

from uniopd.experiment import Experiment
from uniopd.experiment_plan import PLANS


def _model(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "qwen3"}')
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_a_derived_result_is_named_by_weights_data_and_settings(tmp_path):
    experiment = Experiment(PLANS["demo"], tmp_path / "out", tmp_path / "cache")
    model, data = _model(tmp_path / "teacher", b"w" * 64), tmp_path / "math_eval.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    first = experiment.derived("teacher-accuracy", model, data, (0,), 4)
    assert first == experiment.derived("teacher-accuracy", model, data, (0,), 4)  # same inputs, same place
    assert first.parent == tmp_path / "cache" / "experts" / "derived" and first.parent.is_dir()
    others = {experiment.derived("pass-counts", model, data, (0,), 4),  # another kind
              experiment.derived("teacher-accuracy", model, data, (0, 1), 4),  # other seeds
              experiment.derived("teacher-accuracy", model, data, (0,), 8)}  # other samples
    (model / "model.safetensors").write_bytes(b"v" * 64)
    others.add(experiment.derived("teacher-accuracy", model, data, (0,), 4))  # retrained weights
    data.write_text('{"prompt": "1+2", "answer": "3"}\n')
    others.add(experiment.derived("teacher-accuracy", model, data, (0,), 4))  # other data
    assert len(others) == 5 and first not in others
