"""Tiny random-weight captioners in Hugging Face folder layout (tests, benchmarks, demos; nothing downloaded).

The tokenizers are built from small vocabulary files written here (``vocab.txt`` for BLIP's BERT tokenizer,
``vocab.json`` + ``merges.txt`` for Florence-2's BART tokenizer). Captions from random weights are gibberish made
of the vocabulary's words; the saved generation config asks for at least ``min_new_tokens`` real tokens so the
captions are never empty.

``size="tiny"`` builds in well under a second and captions at hundreds of images/s on a CPU; ``size="small"`` is
closer to real per-image cost (for benchmarks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["WD14_TAGS", "WORDS", "build_tiny_blip", "build_tiny_florence2", "build_tiny_wd14"]

WORDS = (
    "a an the of on in with and photo picture cat dog woman man sofa table red blue green yellow circle square "
    "sitting standing small large bright dark background light shape"
).split()

_SIZES = {  # hidden size, layers, heads, image size
    "tiny": (32, 1, 2, 32),
    "small": (256, 4, 4, 224),
}


def _size(size: str) -> tuple[int, int, int, int]:
    if size not in _SIZES:
        raise ValueError(f"size={size!r} must be one of {', '.join(_SIZES)}")
    return _SIZES[size]


def build_tiny_blip(folder: str | os.PathLike[str], seed: int = 0, size: str = "tiny", min_new_tokens: int = 3) -> Path:
    """A random ``BlipForConditionalGeneration`` + ``BlipProcessor`` saved into ``folder`` (safetensors)."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    hidden, layers, heads, image = _size(size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(specials + WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(str(folder), bos_token="[DEC]", local_files_only=True)
    processor = BlipProcessor(BlipImageProcessor(size={"height": image, "width": image}), tokenizer)
    vocab = len(specials) + len(WORDS)
    config = BlipConfig(
        text_config={
            "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": hidden * 2, "max_position_embeddings": 512, "encoder_hidden_size": hidden,
            "pad_token_id": 0, "bos_token_id": 5, "sep_token_id": 3, "eos_token_id": 3,
        },
        vision_config={
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": hidden * 2, "image_size": image, "patch_size": 16, "projection_dim": hidden,
        },
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    model.generation_config.min_new_tokens = min_new_tokens
    model.generation_config.suppress_tokens = [0, 1, 2, 4, 5]  # everything special but [SEP] (end of caption)
    model.save_pretrained(str(folder), safe_serialization=True)
    processor.save_pretrained(str(folder))
    return folder


def _bpe_files(folder: Path) -> tuple[Path, Path]:
    """A byte-level BPE vocabulary in which every word of WORDS (with and without a leading space) is a token."""
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab: dict[str, int] = {t: i for i, t in enumerate(specials)}
    merges: list[str] = []
    words = [*WORDS, *("Ġ" + w for w in WORDS), "What", "Ġdoes", "Ġimage", "Ġdescribe", "?", "Describe", "Ġdetail",
             "Ġwhat", "Ġis", "Ġshown", ".", "Ġparagraph", "Ġtext"]
    for ch in sorted({c for w in words for c in (["Ġ"] if w.startswith("Ġ") else []) + list(w.lstrip("Ġ"))}):
        vocab.setdefault(ch, len(vocab))
    for word in words:
        parts = ["Ġ", *word[1:]] if word.startswith("Ġ") else list(word)
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_tiny_florence2(
    folder: str | os.PathLike[str], seed: int = 0, size: str = "tiny", min_new_tokens: int = 3
) -> Path:
    """A random ``Florence2ForConditionalGeneration`` + ``Florence2Processor`` saved into ``folder``."""
    import torch
    from transformers import (
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    hidden, layers, heads, image = _size(size)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = _bpe_files(folder)
    tokenizer = BartTokenizer(vocab=str(vocab_file), merges=str(merges_file),
                              extra_special_tokens={"image_token": "<image>"})
    stages = 1 if size == "tiny" else 3  # small: strides 4, 2, 2 like the first three stages of the real DaViT
    strides = [4, 2, 2][:stages]
    widths = [hidden // 4, hidden // 2, hidden][-stages:]
    side = image
    for s in strides:
        side //= s
    seq = side * side + 1  # image tokens: one per final-stage patch, plus the pooled token
    image_processor = CLIPImageProcessor(
        size={"height": image, "width": image}, crop_size={"height": image, "width": image}, do_center_crop=False,
        image_seq_length=seq,
    )
    processor = Florence2Processor(image_processor, tokenizer)
    config = Florence2Config(
        text_config={
            "model_type": "bart", "vocab_size": len(tokenizer), "max_position_embeddings": seq + 256,
            "encoder_layers": layers, "decoder_layers": layers, "encoder_ffn_dim": hidden * 2,
            "decoder_ffn_dim": hidden * 2, "encoder_attention_heads": heads, "decoder_attention_heads": heads,
            "d_model": hidden, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
            "decoder_start_token_id": 2, "forced_eos_token_id": 2,
        },
        vision_config={
            "depths": [1] * (stages - 1) + [layers], "patch_size": [7, 3, 3][:stages], "patch_stride": strides,
            "patch_padding": [3, 1, 1][:stages], "patch_prenorm": [False, True, True][:stages], "embed_dim": widths,
            "num_heads": [max(1, heads * w // hidden) for w in widths], "num_groups": [max(1, heads * w // hidden) for w in widths],
            "window_size": 7 if stages > 1 else 12, "projection_dim": hidden,
        },
        image_token_id=tokenizer.image_token_id,
    )
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    model.generation_config.min_new_tokens = min_new_tokens
    special = [tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "<unk>", "<image>")]
    model.generation_config.suppress_tokens = special
    model.save_pretrained(str(folder), safe_serialization=True)
    processor.save_pretrained(str(folder))
    return folder


# name, category (9 rating, 0 general, 4 character), weights on the mean (b, g, r) in 0..1, bias
WD14_TAGS: tuple[tuple[str, int, tuple[float, float, float], float], ...] = (
    ("general", 9, (0.0, 0.0, 0.0), 2.0),
    ("sensitive", 9, (0.0, 0.0, 0.0), -2.0),
    ("red", 0, (-5.0, -5.0, 10.0), -2.0),
    ("green", 0, (-5.0, 10.0, -5.0), -2.0),
    ("blue", 0, (10.0, -5.0, -5.0), -2.0),
    ("1girl", 0, (0.0, 0.0, 0.0), 0.0),  # p = 0.50
    ("^_^", 0, (0.0, 0.0, 0.0), -0.2),  # p = 0.45, a kaomoji: keeps its underscore
    ("hair_ribbon", 0, (0.0, 0.0, 0.0), -0.5),  # p = 0.38
    ("kiln_(character)", 4, (0.0, 0.0, 0.0), 1.0),  # p = 0.73: under the default character threshold 0.85
    ("solo", 0, (0.0, 0.0, 0.0), -3.0),  # p = 0.05
)


def build_tiny_wd14(folder: str | os.PathLike[str], size: int = 32, fixed_batch: bool = False) -> Path:
    """A WD14-style tagger (``model.onnx`` + ``selected_tags.csv``) whose tag probabilities are known functions of
    the image's mean colour (see :data:`WD14_TAGS`), so tests can assert exact tags. Needs the ``onnx`` package."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([w for _, _, w, _ in WD14_TAGS], dtype=np.float32).T / 255.0  # [3 (BGR), tags]
    bias = np.array([b for _, _, _, b in WD14_TAGS], dtype=np.float32)
    batch = 1 if fixed_batch else "batch"
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "w"], ["logits0"]),
            helper.make_node("Add", ["logits0", "b"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(WD14_TAGS)])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    lines = ["tag_id,name,category,count"] + [f"{i},{name},{cat},{100 - i}" for i, (name, cat, _, _) in enumerate(WD14_TAGS)]
    (folder / "selected_tags.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
