"""Captioner backends: a small protocol and its implementations on plain ``transformers`` model classes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from .errors import CaptionError

if TYPE_CHECKING:
    from PIL import Image

    from .models import ModelInfo

__all__ = ["FLORENCE_CAPTION_TASKS", "BlipCaptioner", "Captioner", "Florence2Captioner", "Wd14Tagger"]


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


# WD14 tag names keep their underscores only in these kaomoji (as SmilingWolf's reference tagger does).
_KAOMOJI = {
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@", "^_^",
    "o_o", "u_u", "x_x", "|_|", "||_||",
}
WD14_GENERAL_THRESHOLD = 0.35
WD14_CHARACTER_THRESHOLD = 0.85


def _wd14_tag(name: str) -> str:
    """``hair_ribbon`` -> ``hair ribbon``; parentheses escaped (``\\(``) so ComfyUI's prompt parser reads them as
    text, not as emphasis."""
    text = name if name in _KAOMOJI else name.replace("_", " ")
    return text.replace("(", "\\(").replace(")", "\\)")


class Wd14Tagger:
    """A WD14-style ONNX tagger (SmilingWolf's ``model.onnx`` + ``selected_tags.csv``) through onnxruntime.

    The caption is the character tags above the character threshold, then the general tags above the general
    threshold, most probable first, comma-separated (rating tags are left out). ``prompt`` sets the thresholds:
    ``""`` for 0.35 / 0.85, ``"0.3"`` for the general one, ``"0.3 0.7"`` for both. ``max_new_tokens`` caps the
    number of tags; ``num_beams`` is ignored.
    """

    kind = "wd14"
    default_prompt = ""

    def __init__(self, session: Any, tags: list[tuple[str, int]], info: ModelInfo, device: torch.device) -> None:
        self.session = session
        self.tags = tags  # (display name, category): 9 rating, 4 character, others general
        self.info = info
        self.device = device
        self.dtype = torch.float32
        inp = session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape  # [batch, height, width, 3], NHWC
        if len(shape) != 4 or not isinstance(shape[1], int) or shape[3] != 3:
            raise CaptionError(f"{info.folder / 'model.onnx'} expects input {shape}, not [batch, size, size, 3]")
        self.size = shape[1]
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None

    @classmethod
    def load(cls, info: ModelInfo, device: torch.device | str = "cpu") -> Wd14Tagger:
        import csv

        try:
            import onnxruntime as ort
        except ImportError:
            raise CaptionError(
                "the WD14 tagger needs the optional package onnxruntime: pip install onnxruntime (or onnxruntime-gpu) "
                "with ComfyUI's Python, then restart ComfyUI"
            ) from None
        device = torch.device(device)
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        else:
            device = torch.device("cpu")
        tags_file = info.folder / "selected_tags.csv"
        try:
            with tags_file.open(encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
            tags = [(_wd14_tag(r["name"]), int(r["category"])) for r in rows]
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise CaptionError(
                f"{tags_file} is unreadable ({exc}); it needs the columns name and category. Re-download it"
            ) from None
        try:
            session = ort.InferenceSession(str(info.folder / "model.onnx"), providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
            raise CaptionError(
                f"could not load {info.folder / 'model.onnx'}: {exc}. Re-download it from {info.kind.repos[0]}"
            ) from exc
        tagger = cls(session, tags, info, device)
        out = session.get_outputs()[0].shape
        if isinstance(out[-1], int) and out[-1] != len(tags):
            raise CaptionError(
                f"{info.folder}: model.onnx has {out[-1]} outputs but selected_tags.csv lists {len(tags)} tags; "
                "the two files come from different models"
            )
        return tagger

    def thresholds(self, prompt: str) -> tuple[float, float]:
        parts = prompt.replace(",", " ").split()
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise CaptionError(
                f"WD14 tagger prompt {prompt!r} must be empty or thresholds like '0.35' or '0.35 0.85' "
                "(general, character)"
            ) from None
        if len(values) > 2 or not all(0.0 < v < 1.0 for v in values):
            raise CaptionError(f"WD14 tagger thresholds {prompt!r}: give one or two numbers between 0 and 1")
        general = values[0] if values else WD14_GENERAL_THRESHOLD
        character = values[1] if len(values) > 1 else WD14_CHARACTER_THRESHOLD
        return general, character

    def pixels(self, image: Image.Image) -> Any:
        """White-padded to a square, resized to the model's size (bicubic), BGR float32 0..255, as the tagger was
        trained."""
        import numpy as np
        from PIL import Image as PILImage

        side = max(image.size)
        canvas = PILImage.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(image.convert("RGB"), ((side - image.width) // 2, (side - image.height) // 2))
        if side != self.size:
            canvas = canvas.resize((self.size, self.size), PILImage.BICUBIC)
        return np.asarray(canvas, dtype=np.float32)[:, :, ::-1]

    def caption(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int, num_beams: int) -> list[str]:
        import numpy as np

        if not images:
            return []
        general, character = self.thresholds(prompt)
        batch = np.ascontiguousarray(np.stack([self.pixels(im) for im in images]))
        if self.fixed_batch == 1:
            probs = np.concatenate([self.session.run(None, {self.input_name: batch[i : i + 1]})[0]
                                    for i in range(len(batch))])
        else:
            probs = self.session.run(None, {self.input_name: batch})[0]
        out = []
        for row in probs:
            chars = [(p, t) for (t, c), p in zip(self.tags, row) if c == 4 and p > character]
            gens = [(p, t) for (t, c), p in zip(self.tags, row) if c not in (4, 9) and p > general]
            ordered = [t for _, t in sorted(chars, key=lambda x: -x[0])] + [t for _, t in sorted(gens, key=lambda x: -x[0])]
            out.append(", ".join(ordered[:max_new_tokens]))
        return out

    def close(self) -> None:
        self.session = None
