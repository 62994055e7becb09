"""The report's tables from hand-made run records: the share of the gap closed (and where there is no gap), and the
tuning sweep."""

from __future__ import annotations

from uniopd.experiment_report import gap_table, signal_table, tuning_table

PLAN = {"steps": 40, "prompts_per_step": 4, "samples_per_prompt": 2}


def run(math: list[float], clip: float = 0.0, wire: float = 0.0) -> dict:
    return {"evals": [{"step": 20 * i, "elapsed_s": 10.0 * i, "math": m} for i, m in enumerate(math)],
            "teacher_clip_fraction": clip, "step_s": 0.5, "wire_bytes": wire}


def results(runs: dict, teacher: float = 0.5, sharpened: dict | None = None) -> dict:
    return {"plan": PLAN, "runs": runs, "teachers": {"math-teacher": {"math/accuracy": [teacher]}},
            "sharpened": sharpened or {}}


def test_the_gap_closed_and_the_cost_of_half_of_it():
    rft = {"math-teacher": [{"samples": 100, "sft_steps": 7, "s": 3.0, "pass_rate": 0.2}]}
    rows = gap_table(results({"single-teacher-math/opd": {0: run([0.0, 0.125, 0.25]), 1: run([0.0, 0.3125, 0.5])}},
                             sharpened=rft), "single-teacher-math")
    # seed 0 closes 25% then 50%, seed 1 62.5% then 100%: mean 75 ± 25 at the end; half the gap at steps 40 and 20
    assert rows[2] == "| opd | 75.0 ± 25.0 | 2 / 2 | 30 | 240 | 15 s |"
    assert rows[3].startswith("| RFT that made math-teacher") and "7 SFT steps, 1 rounds | 100 samples | 3 s" in rows[3]


def test_a_student_already_at_its_teachers_level_has_no_gap_to_close():
    rows = gap_table(results({"single-teacher-math/opd": {0: run([0.5, 0.5])}}), "single-teacher-math")
    assert rows[2] == "| opd | – | 0 / 1 | – | – | – |"


def test_the_tuning_table_reports_accuracy_and_how_much_the_clip_acted():
    tuning = {"multi-teacher/opd": {100: {**run([0.1, 0.3], clip=0.001), "evals": [
        {"step": 0, "math": 0.1, "code": 0.2}, {"step": 20, "math": 0.3, "code": 0.4}]}}}
    rows = tuning_table({"tuning": tuning})
    assert rows[2] == "| opd | 30.0 ± 0.0 | 40.0 ± 0.0 | 0.100% | 0.50 s |"


def test_no_tuning_runs_no_rows():
    assert len(tuning_table({"tuning": {}})) == 2


def test_the_signal_table_reports_what_each_signal_bought_and_its_bytes():
    runs = {"single-teacher-math/opd": {0: run([0.1, 0.2], wire=2048), 1: run([0.1, 0.4], wire=4096)},
            "single-teacher-math/opd-topk8": {0: run([0.1, 0.5], wire=10240)}}
    rows = signal_table(results(runs), "single-teacher-math")
    assert rows[2] == "| sampled token (`opd`) | 30.0 ± 10.0 | 0.50 ± 0.00 s | 3 KiB |"
    assert rows[3] == "| top-8 + tail (`opd-topk8`) | 50.0 ± 0.0 | 0.50 ± 0.00 s | 10 KiB |" and len(rows) == 4
