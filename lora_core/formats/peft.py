"""diffusers / peft LoRA files (``<prefix>.<module path>.lora_A.weight`` / ``.lora_B.weight``), for families whose
ecosystem reads that layout (SD3: diffusers' SD3 pipeline reads nothing else, and ComfyUI's LoraLoader maps it).

The model Kiln trains and the file's model may be laid out differently: ComfyUI's MMDiT has one fused ``qkv``
Linear where diffusers has ``to_q``/``to_k``/``to_v``, and orders some adaLN outputs (shift, scale) where
diffusers has (scale, shift). The host says, per adapter, which file modules it becomes (:class:`Piece`): a LoRA
``up @ down`` on a fused layer is exactly the three LoRAs that share ``down`` and each take their rows of ``up``,
and a row permutation of the output is the same permutation of ``up``'s rows.

No ``.alpha`` keys: diffusers' pipeline refuses them, and without them both loaders apply ``lora_B @ lora_A`` at
scale 1, so the file's ``lora_B`` carries ``alpha / rank``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..state import TrainState

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Piece:
    """One file module an adapter becomes: its path, the rows of ``up`` it takes, and whether the two halves of
    those rows swap places (diffusers' (scale, shift) order of an adaLN output the model has as (shift, scale))."""

    path: str
    rows: tuple[int, int] | None = None  # (start, length); None: all rows
    swap_halves: bool = False


@dataclass(frozen=True)
class PeftNaming:
    """Adapter name (``"unet.joint_blocks.0.x_block.attn.qkv"``) -> the file modules it is written as."""

    pieces: Mapping[str, tuple[Piece, ...]]
    prefix: str = "transformer"

    def names(self, adapter_names: Iterable[str]) -> dict[str, str]:
        """Adapter -> its first file module (every adapter must have one; two adapters never share one)."""
        out: dict[str, str] = {}
        seen: dict[str, str] = {}
        for name in adapter_names:
            if name not in self.pieces:
                raise ValueError(
                    f"layer {name.partition('.')[2]!r} has no name in the diffusers LoRA format of this model; "
                    "choose targets that exist in the standard model layout (attn, attn+ff)"
                )
            for piece in self.pieces[name]:
                key = f"{self.prefix}.{piece.path}"
                if key in seen:
                    raise ValueError(f"two layers map to the same file module {key}: {seen[key]} and {name}")
                seen[key] = name
            out[name] = f"{self.prefix}.{self.pieces[name][0].path}"
        return out

    def export(self, state: TrainState, dtype: str = "fp16") -> dict[str, torch.Tensor]:
        """The file's tensors: ``lora_A`` = down, ``lora_B`` = the piece's rows of ``up * alpha / rank``."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not allowed; choose one of: {', '.join(DTYPES)}")
        self.names(s.name for s in state.specs)
        rslora = state.adapter_config.use_rslora
        out: dict[str, torch.Tensor] = {}
        for spec in state.specs:
            scale = spec.alpha / (math.sqrt(spec.rank) if rslora else spec.rank)
            down = state.weights[f"{spec.name}.lora_down.weight"].float()
            up = state.weights[f"{spec.name}.lora_up.weight"].float() * scale
            for piece in self.pieces[spec.name]:
                rows = up if piece.rows is None else up[piece.rows[0] : piece.rows[0] + piece.rows[1]]
                if piece.swap_halves:
                    half = rows.shape[0] // 2
                    rows = torch.cat([rows[half:], rows[:half]])
                key = f"{self.prefix}.{piece.path}"
                out[f"{key}.lora_A.weight"] = down.to(DTYPES[dtype]).clone()  # its own copy: files share no memory
                out[f"{key}.lora_B.weight"] = rows.to(DTYPES[dtype]).contiguous()
        return out
