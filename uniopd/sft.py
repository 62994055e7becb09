"""Supervised fine-tuning batches and steps, shared by the tiny experts' SFT (uniopd.expert_models) and the
teachers' sharpening (uniopd.sharpen): the same encoding, the same length bucketing, the same update."""

from __future__ import annotations

import random

SEQ_MULTIPLE = 8

Pair = tuple[str, str, tuple]  # prompt, response, the prompt's images (PIL)


def encode(tokenizer, pairs: list[Pair], vision=None):
    """Chat-rendered prompt + response + <|im_end|>; the loss covers only the response (labels -100 elsewhere).
    A multimodal model's prompts get their image placeholders expanded; the image tensors come back too."""
    import torch

    from trainer.data import render_prompt

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [render_prompt(tokenizer, {"prompt": prompt}) for prompt, _, _ in pairs]
    pixels: dict = {}
    if vision is not None:
        prompts, pixels = vision.expand(prompts, [images for _, _, images in pairs])
    rows = []
    for p, (_, response, _) in zip(prompts, pairs, strict=True):
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [end]
        rows.append((p + r, [-100] * len(p) + r))
    width = -(-max(len(ids) for ids, _ in rows) // SEQ_MULTIPLE) * SEQ_MULTIPLE
    pad = tokenizer.pad_token_id
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    return ids, labels, attention, pixels


def length_buckets(pairs: list[Pair], batch: int, rng: random.Random) -> list[list[Pair]]:
    """Batches of similar length in random order: padding, not the model, was most of the compute."""
    pairs = sorted(pairs, key=lambda p: len(p[0]) + len(p[1]))
    batches = [pairs[i:i + batch] for i in range(0, len(pairs), batch)]
    rng.shuffle(batches)
    return batches


def sft_step(model, tokenizer, batch: list[Pair], optimizer, vision=None) -> float:
    """One update on the batch's response tokens, gradient norm clipped to 1; returns the loss."""
    import torch

    ids, labels, attention, pixels = encode(tokenizer, batch, vision)
    loss = model(input_ids=ids, attention_mask=attention, labels=labels, **pixels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
