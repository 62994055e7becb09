"""Cross-modal distillation end to end: a text code teacher and a multimodal visual teacher, one multimodal student,
real servers, a real redis-server and `uniopd train` with the Uni-OPD recipe."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import RedisServer
from tests.test_train_e2e import ENV, EXAMPLE, scored_tokens, train
from trainer.run_log import read_log
from uniopd.launch import start_rollout, start_teacher
from uniopd.synthetic.datasets import write_datasets
from uniopd.tiny_models import build_tiny_model, build_tiny_vlm

pytestmark = pytest.mark.e2e  # real servers, redis-server and a uniopd train run

CROSS_MODAL_EXAMPLE = EXAMPLE.parent / "cross-modal"


@pytest.fixture(scope="module")
def cross_modal(tiny_vlm, tmp_path_factory):
    root = tmp_path_factory.mktemp("cross-modal")
    code_teacher = build_tiny_model(root / "code-teacher", "qwen3", seed=2)
    visual_teacher = build_tiny_vlm(root / "visual-teacher", seed=1)
    data = write_datasets(root / "data", seed=0, n_train=16, n_eval=4, domains=("visual",))
    redis_server = RedisServer().start()
    servers = {"code": start_teacher(code_teacher, "hf", ["--domain", "code"], log_dir=root),
               "visual": start_teacher(visual_teacher, "hf", ["--domain", "visual"], log_dir=root),
               "rollout": start_rollout(tiny_vlm, "hf", [], log_dir=root, env={"UNIOPD_ADMIN_KEYS": ENV[
                   "UNIOPD_ROLLOUT_ADMIN_KEY"]})}
    yield {**servers, "redis": redis_server, "data": data, "student": tiny_vlm}
    for s in servers.values():
        s.stop()
    redis_server.stop()


def write_config(stack, out: Path) -> Path:
    tree = yaml.safe_load((CROSS_MODAL_EXAMPLE / "run.yaml").read_text())  # the README's example, on tiny models
    assert tree["recipe"] == {"calibration": {"preset": "release-mm"}, "online_balance": {"enabled": True}}
    tree["student"]["model"] = str(stack["student"])
    tree["data"] = {"train": [str(EXAMPLE / "code_train.jsonl"), str(stack["data"]["visual_train"])],
                    "eval": [str(EXAMPLE / "code_eval.jsonl"), str(stack["data"]["visual_eval"])]}
    for domain, teacher in tree["teachers"].items():
        teacher["urls"] = [stack[domain].url]
    tree["rollout"].update(url=stack["rollout"].url, max_tokens=12)
    tree["cache"]["url"] = stack["redis"].url
    tree["algorithm"].update(prompts_per_step=4, samples_per_prompt=2, micro_batch_size=4)
    tree["schedule"] = {"steps": 3, "eval_every": 3, "checkpoint_every": 3, "eval_samples": 1}
    tree["output_dir"] = str(out)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_cross_modal_run_distils_two_teachers_into_one_multimodal_student(cross_modal, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from proto.fingerprint import tokenizer_fingerprint
    from services.common.models import load_tokenizer

    before = {d: scored_tokens(cross_modal[d]) for d in ("code", "visual")}
    first = tmp_path / "first"
    train(write_config(cross_modal, first))
    rows = read_log(first / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert sum(r["domain/visual/scored"] for r in rows) > 0 and sum(r["domain/code/scored"] for r in rows) > 0
    assert all(r["masked_samples"] == 0 for r in rows)
    after = {d: scored_tokens(cross_modal[d]) for d in ("code", "visual")}
    assert after["visual"] > before["visual"] and after["code"] > before["code"]
    evals = read_log(first / "metrics.jsonl", kind="eval")
    assert {"visual/accuracy", "code/accuracy"} <= set(evals[-1])
    # the checkpoint is a multimodal model with its processor, and the student's tokenizer is unchanged
    ckpt = sorted((first / "checkpoints").iterdir())[-1] / "model"
    AutoModelForImageTextToText.from_pretrained(ckpt)
    assert AutoProcessor.from_pretrained(ckpt).image_seq_len == 16
    assert tokenizer_fingerprint(load_tokenizer(ckpt)) == tokenizer_fingerprint(load_tokenizer(cross_modal["student"]))
    # same seeds again: every score, image items included, comes from the cache keyed on the image hashes
    second = tmp_path / "second"
    train(write_config(cross_modal, second))
    assert all(r["cache/hit_rate"] == 1.0 for r in read_log(second / "metrics.jsonl"))
    assert {d: scored_tokens(cross_modal[d]) for d in ("code", "visual")} == after
    assert httpx.get(cross_modal["visual"].url + "/v1/info").json()["image_token_id"] == 512
