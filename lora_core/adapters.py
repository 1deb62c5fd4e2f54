"""LoRA / LoCon adapters in bypass form, attached to a module tree by forward hooks.

An adapter computes ``y = base(x) + scale * up(down(dropout(x)))`` with ``scale = alpha / rank``
(``alpha / sqrt(rank)`` with rsLoRA). ``down`` is a Linear, or a Conv2d with the base layer's kernel,
stride, padding and dilation; ``up`` is a Linear or 1x1 Conv2d. ``down`` starts Kaiming-uniform from a
seeded generator and ``up`` at zero, so a fresh adapter leaves the model's output unchanged.

Adapters never replace a module of the base model: :meth:`AdapterSet.attach` registers forward hooks
and returns a handle whose ``remove()`` restores the tree exactly. Names stay the same, so weight
patches that other tools apply by parameter name (a stacked LoRA, say) keep working, and a host that
shares one module tree between several model copies can attach a different adapter set to each copy
for the duration of a call.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from .config import TARGET_PRESETS, AdapterConfig

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class AdapterSpec:
    """Shape of one adapter: enough to rebuild it without the base model."""

    name: str  # "<component>.<module path>", e.g. "unet.input_blocks.1.1.proj_in"
    kind: str  # "linear" | "conv"
    in_features: int
    out_features: int
    rank: int
    alpha: float
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "alpha": self.alpha,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdapterSpec:
        return cls(
            name=d["name"],
            kind=d["kind"],
            in_features=int(d["in_features"]),
            out_features=int(d["out_features"]),
            rank=int(d["rank"]),
            alpha=float(d["alpha"]),
            kernel_size=tuple(d["kernel_size"]),
            stride=tuple(d["stride"]),
            padding=tuple(d["padding"]),
            dilation=tuple(d["dilation"]),
        )

    @property
    def down_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.rank, self.in_features)
        return (self.rank, self.in_features, *self.kernel_size)

    @property
    def up_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_features, self.rank)
        return (self.out_features, self.rank, 1, 1)


class LoRAModule(nn.Module):
    """One adapter: ``delta(x) = scale * up(down(dropout(x)))``. Holds no reference to the base layer."""

    def __init__(self, spec: AdapterSpec, dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__()
        self.spec = spec
        if spec.kind == "linear":
            self.lora_down: nn.Module = nn.Linear(spec.in_features, spec.rank, bias=False)
            self.lora_up: nn.Module = nn.Linear(spec.rank, spec.out_features, bias=False)
        elif spec.kind == "conv":
            self.lora_down = nn.Conv2d(
                spec.in_features,
                spec.rank,
                spec.kernel_size,
                stride=spec.stride,
                padding=spec.padding,
                dilation=spec.dilation,
                bias=False,
            )
            self.lora_up = nn.Conv2d(spec.rank, spec.out_features, 1, bias=False)
        else:
            raise ValueError(f"adapter kind={spec.kind!r} is not supported; allowed: linear, conv")
        self.dropout_p = float(dropout)
        self.scale = spec.alpha / (math.sqrt(spec.rank) if use_rslora else spec.rank)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * up(down(dropout(x)))``."""
        return self._unscaled(x) * self.scale

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``output + scale * up(down(dropout(x)))``: what the hook returns for every adapted layer.

        Functional calls instead of submodule calls, and the scale folded into the add: at small sizes the
        per-op and per-module overhead, not the FLOPs, is most of what an adapter costs.
        """
        delta = self._unscaled(x)
        if delta.dtype != output.dtype:
            delta = delta.to(output.dtype)
        return output + delta if self.scale == 1.0 else torch.add(output, delta, alpha=self.scale)

    def _unscaled(self, x: torch.Tensor) -> torch.Tensor:
        down = self.lora_down.weight
        if x.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(down.dtype)
        if self.training and self.dropout_p > 0:
            x = F.dropout(x, self.dropout_p, training=True)
        spec = self.spec
        if spec.kind == "linear":
            return F.linear(F.linear(x, down), self.lora_up.weight)
        h = F.conv2d(x, down, None, spec.stride, spec.padding, spec.dilation)
        return F.conv2d(h, self.lora_up.weight)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def resolve_patterns(targets: str | tuple[str, ...]) -> tuple[str, ...] | None:
    """Preset name or pattern tuple -> patterns; ``None`` means every Linear/Conv2d."""
    if isinstance(targets, str):
        return TARGET_PRESETS[targets] if targets else ()
    return targets


_ATTENTION_CLASSES = re.compile(r"attn|attention", re.IGNORECASE)
# modulation, norm, embedding and pooling modules: neither attention nor MLP, whatever their insides are called (a
# timestep embedder is often an "MLPEmbedder", a text pooler an "AttentionPool"); matched on whole path components
# and on the enclosing classes
_NEITHER = re.compile(r"(.*_)?mod(ulation)?(_.*)?|.*norm.*|.*embed.*|adaln.*|.*pool.*", re.IGNORECASE)
_MLP_CLASSES = re.compile(r"mlp|feedforward|feed_forward|ffn|swiglu|geglu", re.IGNORECASE)
_ATTENTION_LEAVES = re.compile(r"(to_)?(q|k|v|qkv|out|o)(_proj)?|(q|k|v|kv|qkv|out|o)_?(linear|proj)|proj|add_[qkv]_proj|"
                               r"to_add_out|to_out")
_MLP_LEAVES = re.compile(r"fc\d|w\d|(gate|up|down)_proj|linear_(in|out)|c_fc|c_proj")


def _block_pattern(name: str, modules: Mapping[str, nn.Module]) -> str:
    """``blocks.3.attn.qkv`` -> ``re:blocks\\.\\d+\\.attn\\.qkv``: the layer in every block of its stack. An index
    is a block index where its container holds blocks of one class (a ModuleList of blocks); a Sequential's mixed
    children (Linear, GELU, Linear) keep their literal index."""
    parts = name.split(".")
    out = []
    for i, part in enumerate(parts):
        container = modules.get(".".join(parts[:i]))
        children = list(container.children()) if container is not None and part.isdigit() else []
        same = len(children) > 1 and len({type(c) for c in children}) == 1
        out.append(r"\d+" if same else re.escape(part))
    return "re:" + r"\.".join(out)


def structural_targets(root: nn.Module) -> dict[str, tuple[str, ...]]:
    """The ``attn`` and ``attn+ff`` targets of a network whose names no preset knows, found by structure: a Linear
    layer inside a module whose class is an attention (``*Attention*``, ``*Attn*``) counts as attention, one inside an
    MLP / feed-forward class as feed-forward; where the classes do not say (an attention module of another name),
    the layer's own name does (q/k/v/out projections; fc1/fc2, w1/w2/w3, gate/up/down projections). Modulation,
    embedding and output layers are neither (``all`` trains them). Each found layer is written as a pattern over
    the block index, so the targets read like a preset: ``re:blocks\\.\\d+\\.attn\\.qkv``."""
    kinds: dict[str, str] = {}
    modules = dict(root.named_modules())
    classes = {name: type(module).__name__ for name, module in modules.items()}
    for name, module in root.named_modules():
        if not name or layer_kind(module) != "linear":
            continue
        parents = [".".join(name.split(".")[:i]) for i in range(len(name.split(".")) - 1, 0, -1)]
        owners = [classes.get(p, "") for p in parents]
        leaf = name.rsplit(".", 1)[-1]
        path = name.lower()
        if any(_NEITHER.fullmatch(part) for part in name.split(".")) or \
                any(re.search(r"embed|pool|norm|modulation", owner, re.IGNORECASE) for owner in owners):
            continue
        kind = None
        for owner in owners:  # the nearest enclosing module that says what it is
            if _MLP_CLASSES.search(owner):
                kind = "ff"
                break
            if _ATTENTION_CLASSES.search(owner):
                kind = "attn"
                break
        if kind is None:
            if _ATTENTION_LEAVES.fullmatch(leaf) and re.search(r"attn|attention", path):
                kind = "attn"
            elif _MLP_LEAVES.fullmatch(leaf) or re.search(r"(^|\.)(mlp|ff|ffn|feed_forward)(\.|$)", path):
                kind = "ff"
        if kind is not None:
            kinds.setdefault(_block_pattern(name, modules), kind)
    attn = tuple(p for p, k in kinds.items() if k == "attn")
    return {"attn": attn, "attn+ff": attn + tuple(p for p, k in kinds.items() if k == "ff")}


class UnadaptableLayerError(ValueError):
    """A layer the targets name that no adapter can sit on: training it partly would be silent partial training."""


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv"``, or ``None`` for a module that is not a layer an adapter can sit on.

    Linear means what the layer computes, not its class: ``nn.Linear``, and any module that declares integer
    ``in_features`` / ``out_features`` and carries a 2-D ``weight`` of shape ``(out_features, in_features)``, as
    hosts' mixed-precision and quantized layers do (their weight may be a quantized tensor subclass; its logical
    shape is what counts, and it is never read: the adapter only sees the layer's input and output).
    """
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    weight = getattr(module, "weight", None)
    if (isinstance(in_f, int) and isinstance(out_f, int) and isinstance(weight, torch.Tensor)
            and tuple(weight.shape) == (out_f, in_f)):
        return "linear"
    return None


def _is_layer(module: nn.Module) -> bool:
    """A module holding a weight of its own (a layer of some kind, adaptable or not), not a container."""
    return isinstance(module._parameters.get("weight"), torch.Tensor)


def find_targets(
    root: nn.Module, component: str, targets: str | tuple[str, ...], config: AdapterConfig
) -> list[AdapterSpec]:
    """Specs for every module of ``root`` the config targets, in ``named_modules`` order.

    A layer the targets name that no adapter can sit on (a grouped conv, a 3-D weight, an unknown layer class) is an
    :class:`UnadaptableLayerError` naming it and its type: a LoRA never trains fewer layers than its targets say.
    """
    patterns = resolve_patterns(targets)
    if patterns == ():
        return []
    specs: list[AdapterSpec] = []
    refused: list[str] = []
    for name, module in root.named_modules():
        if not name:
            continue
        kind = layer_kind(module)
        is_kxk_conv = kind == "conv" and tuple(module.kernel_size) != (1, 1)
        # "all" (no patterns) is every Linear and Conv2d; LoCon adds every k x k conv to the chosen targets.
        wanted = (kind is not None if patterns is None else _matches(name, patterns)) or (
            is_kxk_conv and config.algorithm == "locon")
        if not wanted:
            continue
        spec = module_spec(module, f"{component}.{name}", config) if kind is not None else None
        if spec is not None:
            specs.append(spec)
        elif kind is not None or _is_layer(module):
            refused.append(f"{component}.{name} ({_describe(module)})")
    if refused:
        raise UnadaptableLayerError(
            f"{len(refused)} targeted layer(s) cannot take an adapter: {', '.join(refused[:6])}"
            f"{' …' if len(refused) > 6 else ''}. Kiln adapts Linear layers (any weight type, quantized included) and "
            "ungrouped Conv2d; choose targets that leave these out (another preset, or a pattern list)"
        )
    return specs


def _describe(module: nn.Module) -> str:
    weight = getattr(module, "weight", None)
    shape = f", weight {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else ""
    return f"{type(module).__module__}.{type(module).__qualname__}{shape}"


def target_counts(specs: list[AdapterSpec], targets: str | tuple[str, ...]) -> dict[str, int]:
    """How many adapted layers each target pattern matched (``"all"``: per layer kind), in the patterns' order; a
    pattern that matched nothing counts 0, so a report shows what a preset did not find in this model."""
    patterns = resolve_patterns(targets)
    if patterns is None:
        counts: dict[str, int] = {}
        for s in specs:
            counts[s.kind] = counts.get(s.kind, 0) + 1
        return counts
    return {p: sum(1 for s in specs if _matches(s.name.partition(".")[2], (p,))) for p in patterns}


def module_spec(
    module: nn.Module, name: str, config: AdapterConfig, rank: int | None = None, alpha: float | None = None
) -> AdapterSpec | None:
    """The adapter shape for ``module``; ``None`` for layers an adapter cannot sit on (grouped convs)."""
    kind = layer_kind(module)
    if kind == "conv":
        if module.groups != 1 or isinstance(module.padding, str):
            return None
        kxk = tuple(module.kernel_size) != (1, 1)
        return AdapterSpec(
            name=name,
            kind="conv",
            in_features=module.in_channels,
            out_features=module.out_channels,
            rank=rank if rank is not None else (config.effective_conv_rank if kxk else config.rank),
            alpha=alpha if alpha is not None else (config.effective_conv_alpha if kxk else config.alpha),
            kernel_size=tuple(module.kernel_size),
            stride=tuple(module.stride),
            padding=tuple(module.padding),
            dilation=tuple(module.dilation),
        )
    if kind == "linear":
        return AdapterSpec(
            name=name,
            kind="linear",
            in_features=module.in_features,
            out_features=module.out_features,
            rank=rank if rank is not None else config.rank,
            alpha=alpha if alpha is not None else config.alpha,
        )
    return None


class AttachHandle:
    """Removes the hooks an :class:`AdapterSet` registered; usable as a context manager."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> AttachHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class AdapterSet(nn.Module):
    """A named collection of :class:`LoRAModule` that can be attached to (and removed from) module trees."""

    def __init__(self, specs: list[AdapterSpec], config: AdapterConfig) -> None:
        super().__init__()
        if not specs:
            raise ValueError(
                "no layer matched the adapter targets "
                f"(unet_targets={config.unet_targets!r}, text_targets={config.text_targets!r}); "
                "pick another preset or check the module-name patterns"
            )
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("adapter names must be unique")
        self.config = config
        self.specs: dict[str, AdapterSpec] = {s.name: s for s in specs}
        # ModuleDict keys cannot contain ".", so the modules are stored under positional keys.
        self.adapters = nn.ModuleList(LoRAModule(s, config.dropout, config.use_rslora) for s in specs)
        self._index = {s.name: i for i, s in enumerate(specs)}

    @classmethod
    def create(
        cls, roots: Mapping[str, nn.Module], config: AdapterConfig, seed: int = 0
    ) -> AdapterSet:
        """Find targets in each component root (``{"unet": ..., "te": ...}``) and initialise them from ``seed``."""
        specs: list[AdapterSpec] = []
        for component, root in roots.items():
            targets = config.text_targets if component.startswith("te") else config.unet_targets
            specs += find_targets(root, component, targets, config)
        adapters = cls(specs, config)
        generator = torch.Generator().manual_seed(seed)
        for module in adapters.adapters:
            module.reset_parameters(generator)
        return adapters

    def __getitem__(self, name: str) -> LoRAModule:
        return self.adapters[self._index[name]]  # type: ignore[return-value]

    def names(self) -> list[str]:
        return list(self.specs)

    def items(self) -> Iterator[tuple[str, LoRAModule]]:
        for name in self.specs:
            yield name, self[name]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attach(self, roots: Mapping[str, nn.Module]) -> AttachHandle:
        """Register a forward hook per adapter on the matching module of ``roots``."""
        handles = []
        try:
            for name, module in self.items():
                component, _, path = name.partition(".")
                if component not in roots:
                    continue
                target = roots[component].get_submodule(path)
                handles.append(target.register_forward_hook(_make_hook(module)))
        except Exception:
            for h in handles:
                h.remove()
            raise
        return AttachHandle(handles)

    def weights(self) -> dict[str, torch.Tensor]:
        """``{"<name>.lora_down.weight": ..., "<name>.lora_up.weight": ...}`` detached."""
        out: dict[str, torch.Tensor] = {}
        for name, module in self.items():
            out[f"{name}.lora_down.weight"] = module.lora_down.weight.detach()
            out[f"{name}.lora_up.weight"] = module.lora_up.weight.detach()
        return out

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy weights in; every key must exist and every shape must match (the error names the key)."""
        expected = set()
        with torch.no_grad():
            for name, module in self.items():
                for part in ("lora_down", "lora_up"):
                    key = f"{name}.{part}.weight"
                    expected.add(key)
                    if key not in weights:
                        raise ValueError(f"missing adapter weight {key}")
                    param = getattr(module, part).weight
                    src = weights[key]
                    if tuple(src.shape) != tuple(param.shape):
                        raise ValueError(
                            f"shape mismatch for {key}: got {tuple(src.shape)}, the model needs {tuple(param.shape)}"
                        )
                    param.copy_(src)
        extra = sorted(set(weights) - expected)
        if extra:
            raise ValueError(f"unexpected adapter weights: {', '.join(extra[:5])}{' …' if len(extra) > 5 else ''}")


def _make_hook(module: LoRAModule):  # noqa: ANN202 - torch hook signature
    def hook(_mod: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return module.add_to(output, args[0])

    return hook
