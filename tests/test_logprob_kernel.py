"""The one log-prob kernel (modeling.logprobs), in process: the teacher's transformers scorer and the trainer's student
log-probs give the same numbers for the same sequences, since OPD's advantage is their difference."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from modeling.logprobs import candidate_logprobs
from proto.schemas import ScoreItem
from services.teacher_server.backends.hf import HFScorer
from tests.conftest import TEST_DEVICE, random_items
from trainer.student import response_logprobs

# fp32 against another computation of the same numbers: CPU kernels agree to the atol (and assert_allclose's default
# rtol, 1e-7); a GPU's reduce in other orders, so its fp32 rounding is relative too (measured on an H200: 1.5e-6 and
# 2.3e-6 of the value at most)
DEFAULT_RTOL = 1e-7
FP32_RTOL = DEFAULT_RTOL if TEST_DEVICE == "cpu" else 1e-5


@pytest.fixture(scope="module")
def scorer(tiny_model) -> HFScorer:
    return HFScorer(tiny_model, "float32", TEST_DEVICE)


def split(items: list[ScoreItem]) -> tuple[list[list[int]], list[list[int]]]:
    return [it.input_ids[: it.response_start] for it in items], [it.input_ids[it.response_start :] for it in items]


def test_scorer_and_student_give_identical_logprobs(scorer):
    items = random_items(np.random.default_rng(0), 12)  # mixed lengths and response starts: padding differs by row
    spans = scorer.score(items)
    with torch.no_grad():
        student = response_logprobs(scorer.model, *split(items)).cpu().numpy()
    for row, (it, span) in enumerate(zip(items, spans, strict=True)):
        n = len(it.input_ids) - it.response_start
        np.testing.assert_array_equal(span.logprobs, student[row, :n])
        assert not student[row, n:].any()  # right-padded with 0


def test_logprobs_and_top_k_match_an_unbatched_forward_pass(scorer, reference):
    items = random_items(np.random.default_rng(1), 6, top_k=4)
    for it, span in zip(items, scorer.score(items), strict=True):
        full = reference.logprobs(it.input_ids)[it.response_start - 1 : -1]  # position p predicts token p + 1
        np.testing.assert_allclose(span.logprobs, reference.span(it.input_ids, it.response_start), atol=1e-5,
                                   rtol=FP32_RTOL)
        np.testing.assert_array_equal(span.top_k_ids, np.argsort(-full, axis=-1)[:, :4])
        np.testing.assert_allclose(span.top_k_logprobs, -np.sort(-full, axis=-1)[:, :4], atol=1e-5,
                                   rtol=FP32_RTOL)


def test_student_logprobs_are_differentiable_and_padding_carries_no_gradient(tiny_model):
    from modeling.loading import from_pretrained

    model = from_pretrained(tiny_model)
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14]]
    lp = response_logprobs(model, prompts, responses)
    assert lp.shape == (2, 4) and lp.requires_grad and lp[1, 1:].eq(0).all()
    (lp * torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0]])).sum().backward()
    with_padding = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lp = response_logprobs(model, prompts, responses)
    lp.sum().backward()  # the padded entries add nothing
    assert any(g.abs().sum() > 0 for g in with_padding.values())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, with_padding[name], rtol=0, atol=0)


def test_multimodal_scorer_and_student_agree_with_images_expanded(tiny_vlm):
    from PIL import Image

    scorer = HFScorer(tiny_vlm, "float32", TEST_DEVICE)
    image_id = scorer.vision.placeholder_id
    pngs = []
    for colour in ((200, 30, 30), (20, 160, 90)):
        buf = io.BytesIO()
        Image.new("RGB", (40, 28), colour).save(buf, "PNG")
        pngs.append(buf.getvalue())
    prompts = [[3, image_id, 7, 8], [4, 5, image_id, 9, image_id, 6], [11, 12]]
    responses = [[20, 21, 22], [30, 31], [40, 41, 42, 43]]
    per_row = [[pngs[0]], [pngs[1], pngs[0]], []]
    items = [ScoreItem(input_ids=p + r, response_start=len(p)) for p, r in zip(prompts, responses, strict=True)]
    spans = scorer.score(items, [[Image.open(io.BytesIO(b)).convert("RGB") for b in row] for row in per_row])
    with torch.no_grad():
        student = response_logprobs(scorer.model, prompts, responses, per_row, scorer.vision).cpu().numpy()
    for row, (r, span) in enumerate(zip(responses, spans, strict=True)):
        np.testing.assert_array_equal(span.logprobs, student[row, : len(r)])


def _log_softmax(rng: np.random.Generator, rows: int, vocab: int) -> torch.Tensor:
    return torch.log_softmax(torch.from_numpy(rng.standard_normal((rows, vocab)) * 3), -1)


@pytest.mark.parametrize("shared", [False, True])
def test_candidates_are_gathered_and_the_tail_holds_the_rest(shared):
    rng = np.random.default_rng(0)
    dist = _log_softmax(rng, 6, 40)
    cand = torch.from_numpy(np.stack([rng.permutation(40)[:5] for _ in range(1 if shared else 6)]))
    picked, tail = candidate_logprobs(dist, cand)
    rows = cand.expand(6, -1)
    assert picked.shape == (6, 5) and tail.shape == (6,)
    torch.testing.assert_close(picked, dist.gather(-1, rows))
    for r in range(6):
        others = [v for v in range(40) if v not in rows[r].tolist()]
        torch.testing.assert_close(tail[r], torch.logsumexp(dist[r, others], -1))
    torch.testing.assert_close(torch.logsumexp(torch.cat([picked, tail[:, None]], -1), -1), torch.zeros(6,
                                                                                                     dtype=dist.dtype))


def test_candidates_covering_the_vocabulary_leave_an_empty_tail_and_no_nan():
    """k = vocab: the tail is -inf (no mass), and a distribution with -inf entries (a token the teacher rules out)
    gives -inf, never NaN."""
    dist = _log_softmax(np.random.default_rng(1), 3, 8)
    dist[:, 3] = float("-inf")
    every = torch.arange(8).flip(0)[None]
    picked, tail = candidate_logprobs(dist, every)
    assert torch.isneginf(tail).all() and not picked.isnan().any()
    torch.testing.assert_close(picked, dist[:, every[0]])
    picked, tail = candidate_logprobs(dist, torch.tensor([[0, 1, 2, 4, 5, 6, 7]]))  # all but the ruled-out one
    assert torch.isneginf(tail).all() and not picked.isnan().any()


def grouped_items(rng: np.random.Generator, prompts: int, samples: int, **options) -> list[ScoreItem]:
    """An OPD batch: `samples` responses of varied lengths to each of `prompts` prompts of varied lengths,
    interleaved the way a teacher's batcher may merge requests, plus one item whose prompt nobody shares."""
    heads = [rng.integers(0, 512, size=int(rng.integers(2, 40))).tolist() for _ in range(prompts)]
    items = [ScoreItem(input_ids=heads[p] + rng.integers(0, 512, size=int(rng.integers(1, 30))).tolist(),
                       response_start=len(heads[p]), **options) for _ in range(samples) for p in range(prompts)]
    return [*items, ScoreItem(input_ids=rng.integers(0, 512, size=20).tolist(), response_start=9, **options)]


@pytest.mark.parametrize("dtype,atol", [("float32", 2e-5), ("bfloat16", 0.6)])
def test_shared_prompts_score_as_each_sequence_alone(tiny_model, dtype, atol):
    """One prompt pass per prompt, its keys and values reused by every sample: the same log-probs, top-k, ranks,
    candidates and distributions as scoring each sequence whole: fp32 to rounding (measured 1.2e-5 at most, on
    log-probs near -13), bf16 within the bound its fp32 comparison uses (test_dtypes)."""
    shared, alone = HFScorer(tiny_model, dtype, TEST_DEVICE), HFScorer(tiny_model, dtype, TEST_DEVICE,
                                                                           share_prompts=False)
    items = grouped_items(np.random.default_rng(3), prompts=3, samples=4, top_k=3, ranks=True, distribution=True)
    items[0] = items[0].model_copy(update={"candidates": [[1, 2, 3]]})
    for got, want in zip(shared.score(items), alone.score(items), strict=True):
        for field in ("logprobs", "top_k_logprobs", "distribution", "candidate_logprobs", "tail_logprobs"):
            if getattr(want, field) is not None:
                np.testing.assert_allclose(getattr(got, field), getattr(want, field), atol=atol, err_msg=field,
                                           rtol=FP32_RTOL if dtype == "float32" else DEFAULT_RTOL)
        if dtype == "float32":
            np.testing.assert_array_equal(got.top_k_ids, want.top_k_ids)
            # a near tie among the vocabulary can flip on a GPU (measured: one rank of nine, 225 vs 224, on an H200)
            np.testing.assert_allclose(got.ranks, want.ranks, rtol=0, atol=0 if TEST_DEVICE == "cpu" else 1)
    assert shared.share_prompts  # the tiny model's cache was shareable: the shared path ran


def test_shared_prompt_groups_only_pair_identical_prompts_of_two_tokens_or_more():
    from services.teacher_server.backends.hf import shared_prompt_groups

    def item(prompt, response):
        return ScoreItem(input_ids=prompt + response, response_start=len(prompt))

    items = [item([1, 2], [3]), item([1, 2, 3], [4]), item([1, 2], [5, 6]), item([7], [8]), item([7], [9]),
             item([1, 2, 3], [9]), item([4, 5], [6])]
    assert shared_prompt_groups(items) == [[0, 2], [1, 5]]  # [7] is one token: nothing to cache


def test_vllm_prompt_ends_pick_shared_whole_block_prompts_of_plain_items_in_groups_of_at_most_the_id_limit(
        monkeypatch):
    from services.teacher_server.backends import vllm

    def item(prompt_len, token, **options):
        return ScoreItem(input_ids=[*range(prompt_len), token], response_start=prompt_len, **options)

    items = [item(8, 1), item(5, 2), item(8, 3), item(4, 4), item(4, 5), item(8, 6, top_k=2), item(12, 7),
             item(8, 8), item(8, 9)]
    # block 4: the 8-token prompt fills two blocks (its top-k item must be scored whole); the 4-token one fills one,
    # which leaves nothing to share; the 5-token one reads the cache without help; the 12-token one has one sample
    assert vllm._prompt_ends(items, 4) == {0: (0, 2, 7, 8), 2: (0, 2, 7, 8), 7: (0, 2, 7, 8), 8: (0, 2, 7, 8)}
    monkeypatch.setattr(vllm, "MAX_FIRST_TOKENS", 3)
    assert vllm._prompt_ends(items, 4) == {0: (0, 2, 7), 2: (0, 2, 7), 7: (0, 2, 7), 8: (8,)}


@pytest.mark.e2e  # a real vLLM engine in this process
def test_vllm_samples_of_one_prompt_read_its_blocks_in_the_same_engine_call_and_score_as_each_sequence_alone(
        tiny_model):
    """One engine call: a 70-token prompt's later samples start from the two 32-token blocks its first sample
    computed. A 64-token prompt's two blocks end exactly at its responses, so a request for the prompt alone goes
    first (it computes them, and gives the next-token log-probs of the samples' first tokens) and its samples then
    start from both blocks. Scored again, the same sequences find blocks reaching into their responses, and are
    scored again without the cache: every score is that of the sequence whole."""
    from services.teacher_server.backends.vllm import VLLMScorer

    scorer, alone = VLLMScorer(tiny_model, "float32"), HFScorer(tiny_model, "float32", share_prompts=False)
    rng = np.random.default_rng(5)
    items = []
    for prompt_len, samples in ((64, 3), (70, 3), (96, 1)):
        head = rng.integers(0, 512, prompt_len).tolist()
        items += [ScoreItem(input_ids=head + rng.integers(0, 512, int(rng.integers(30, 60))).tolist(),
                            response_start=prompt_len) for _ in range(samples)]
    calls: list[list[int]] = []
    generate = scorer.llm.generate

    def recording(prompts, params, **kw):
        outs = generate(prompts, params, **kw)
        calls.append([out.num_cached_tokens for out in outs])
        return outs

    scorer.llm.generate = recording
    want = alone.score(items)
    for _ in range(2):
        for got, ref in zip(scorer.score(items), want, strict=True):
            np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-4)
    assert calls[0] == [0, 64, 64, 64, 0, 64, 64, 0]  # the 64-token prompt alone, then the items
    # again: the prompt alone reads its first block; a sample whose blocks reach into its response is scored again
    assert calls[1] == [32, 64, 96, 96, 96, 96, 96, 0] and calls[2] == [0] * 5
