"""Captioner backends: a small protocol and its implementations on plain ``transformers`` model classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from .errors import CaptionError

if TYPE_CHECKING:
    from PIL import Image

    from .models import ModelInfo

__all__ = ["BlipCaptioner", "Captioner", "Florence2Captioner", "FLORENCE_CAPTION_TASKS"]


@runtime_checkable
class Captioner(Protocol):
    """Anything that turns a batch of RGB images into one caption each."""

    kind: str
    default_prompt: str
    device: torch.device
    dtype: torch.dtype

    def caption(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int, num_beams: int) -> list[str]:
        """One caption per image, in order. ``prompt`` empty means the model's default."""
        ...

    def close(self) -> None:
        """Release the weights (the captioner is unusable afterwards)."""
        ...


class _TransformersCaptioner:
    """Shared path: processor -> ``generate`` (greedy or beam search, no sampling) -> ``batch_decode``."""

    model_class = ""
    processor_class = ""

    def __init__(self, model: Any, processor: Any, info: ModelInfo) -> None:
        self.model = model
        self.processor = processor
        self.info = info
        self.kind = info.kind.name
        self.default_prompt = info.kind.default_prompt
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype

    def prompt_for(self, prompt: str) -> str:
        return prompt.strip() or self.default_prompt

    def inputs(self, images: Sequence[Image.Image], prompt: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _to_device(self, batch: Any) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in dict(batch).items():
            if not isinstance(value, torch.Tensor):
                continue
            value = value.to(self.device)
            out[key] = value.to(self.dtype) if value.is_floating_point() else value
        return out

    def generate(self, inputs: dict[str, torch.Tensor], max_new_tokens: int, num_beams: int) -> torch.Tensor:
        return self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [" ".join(t.split()) for t in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def caption(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int, num_beams: int) -> list[str]:
        if not images:
            return []
        with torch.inference_mode():
            ids = self.generate(self.inputs(images, self.prompt_for(prompt)), max_new_tokens, num_beams)
        texts = self.decode(ids)
        if len(texts) != len(images):
            raise RuntimeError(f"{self.info.kind.label} returned {len(texts)} captions for {len(images)} images")
        return texts

    def close(self) -> None:
        self.model = None
        self.processor = None


class BlipCaptioner(_TransformersCaptioner):
    """BLIP (``BlipForConditionalGeneration``). A prompt is the start of the caption ("a photography of")."""

    model_class = "BlipForConditionalGeneration"
    processor_class = "BlipProcessor"

    def inputs(self, images: Sequence[Image.Image], prompt: str) -> dict[str, torch.Tensor]:
        if prompt:
            batch = self.processor(images=list(images), text=[prompt] * len(images), return_tensors="pt",
                                   padding=True)
        else:
            batch = self.processor(images=list(images), return_tensors="pt")
        return self._to_device(batch)


FLORENCE_CAPTION_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OCR>")


class Florence2Captioner(_TransformersCaptioner):
    """Florence-2 (``Florence2ForConditionalGeneration``). The prompt is a task token, ``<DETAILED_CAPTION>`` by
    default; ``<CAPTION>`` is short, ``<MORE_DETAILED_CAPTION>`` a paragraph."""

    model_class = "Florence2ForConditionalGeneration"
    processor_class = "Florence2Processor"

    def prompt_for(self, prompt: str) -> str:
        prompt = super().prompt_for(prompt)
        token = prompt.split(">", 1)[0] + ">" if prompt.startswith("<") else ""
        if token and token not in FLORENCE_CAPTION_TASKS:
            raise CaptionError(
                f"Florence-2 task {token} does not produce a caption; use one of {', '.join(FLORENCE_CAPTION_TASKS)}"
            )
        if token and prompt != token:
            raise CaptionError(f"Florence-2 task {token} takes no extra text; set the prompt to just {token}")
        return prompt

    def inputs(self, images: Sequence[Image.Image], prompt: str) -> dict[str, torch.Tensor]:
        batch = self.processor(images=list(images), text=[prompt] * len(images), return_tensors="pt", padding=True)
        return self._to_device(batch)
