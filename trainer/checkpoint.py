"""Checkpoints: an HF-format student (loadable by vLLM and transformers), accelerate's optimizer/scheduler/RNG state
(with FSDP2 also the model and optimizer, as each process's shards), and progress.json (step, data position). Written
to a temporary directory and renamed, so a crash mid-write never leaves a checkpoint that looks complete."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROGRESS = "progress.json"


@dataclass
class Progress:
    step: int
    data: dict[str, int]
    extra: dict = field(default_factory=dict)


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(out: Path, progress: Progress, accelerator, model, tokenizer, keep: int,
                    processor=None) -> Path:
    """`processor`: a multimodal student's, saved first so the tokenizer saved after it stays the student's own (a
    processor re-registers its image tokens on its copy)."""
    final = checkpoint_dir(out, progress.step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))  # every process writes its own RNG state (and FSDP2 shards) here
    state = accelerator.get_state_dict(model)  # full tensors on the main process; with FSDP2 every process gathers
    accelerator.wait_for_everyone()  # ...before the main process renames the directory
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp / "model", state_dict=state, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        (tmp / PROGRESS).write_text(json.dumps(asdict(progress)))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in completed_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def completed_checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / PROGRESS).is_file())


def load_latest(out: Path, accelerator) -> Progress | None:
    found = completed_checkpoints(out)
    if not found:
        return None
    accelerator.load_state(str(found[-1] / "state"))
    return Progress(**json.loads((found[-1] / PROGRESS).read_text()))
