"""Precision over weights stored in half precision (issue 12), on the CPU.

ComfyUI keeps SD weights in fp16 on most GPUs. The trainer picks the compute dtype from the requested precision and
the stored dtype (``resolve_precision`` / ``plan_precision``, pure functions, tested as tables), makes copies of the
frozen weights once per run where the two differ, and trains fp16 compute with a GradScaler, always.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_core import AdapterConfig, AdapterSet, TrainCallback, TrainConfig, Trainer, TrainState
from lora_core import trainer as trainer_module
from lora_core.trainer import PrecisionPlan, plan_precision, resolve_precision
from tiny_models import TinyDiffusion, TinyUNet, make_dataset

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FP8 = torch.float8_e4m3fn
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("cpu", "cuda", "mps")
STORED = (F32, F16, BF16, FP8, None)


# --- the decision table ------------------------------------------------------------------------------------------

# auto, by (device, stored, bf16_supported); every other request is taken as asked
AUTO = {
    **{("cpu", s, b): F32 for s in STORED for b in (True, False)},  # CPU bf16 GEMMs are slower than fp32
    **{("cuda", s, True): BF16 for s in STORED},
    ("cuda", F16, False): F16,
    ("cuda", F32, False): F32,
    ("cuda", BF16, False): F32,
    ("cuda", FP8, False): F32,
    ("cuda", None, False): F32,
    **{("mps", s, b): F16 if s == F16 else F32 for s in STORED for b in (True, False)},  # bf16 probe: CUDA only
}


@pytest.mark.parametrize(
    "precision,device,stored,bf16", list(itertools.product(PRECISIONS, DEVICES, STORED, (True, False)))
)
def test_resolve_precision_table(precision, device, stored, bf16):
    want = AUTO[(device, stored, bf16)] if precision == "auto" else {"fp32": F32, "bf16": BF16, "fp16": F16}[precision]
    assert resolve_precision(precision, device, stored, bf16) == want


def test_resolve_precision_refuses_an_unknown_name():
    with pytest.raises(ValueError, match=r"precision='fp8'.*auto, fp32, bf16, fp16"):
        resolve_precision("fp8", "cuda", F16, True)


@pytest.mark.parametrize(
    "args,want",
    [
        # really fp32: copies of every frozen fp16/bf16 parameter, on any device, no autocast
        (("fp32", "cuda", F16, True), PrecisionPlan(F32, False, frozenset({F16, BF16}), matmul_only=False)),
        (("fp32", "cpu", F16, False), PrecisionPlan(F32, False, frozenset({F16, BF16}), matmul_only=False)),
        (("auto", "cpu", F32, False), PrecisionPlan(F32, False, frozenset({F16, BF16}), matmul_only=False)),
        # auto on a GPU without bf16 over fp16 weights: fp16 under autocast, no copies needed
        (("auto", "cuda", F16, False), PrecisionPlan(F16, True, frozenset({BF16}))),
        # bf16 over fp16 weights: bf16 copies of Linear/Conv2d once per run, GPU or CPU
        (("auto", "cuda", F16, True), PrecisionPlan(BF16, True, frozenset({F16}))),
        (("bf16", "cpu", F16, False), PrecisionPlan(BF16, True, frozenset({F32, F16}))),
        # fp32 weights under autocast: copied on the CPU (as before), not on a GPU (VRAM; ~1 % of a step there)
        (("bf16", "cuda", F32, True), PrecisionPlan(BF16, True, frozenset({F16}))),
        (("fp16", "cuda", F32, True), PrecisionPlan(F16, True, frozenset({BF16}))),
        (("fp16", "cpu", F32, False), PrecisionPlan(F16, True, frozenset({F32, BF16}))),
    ],
)
def test_plan_without_manual_cast(args, want):
    assert plan_precision(*args) == want


@pytest.mark.parametrize(
    "args,want",
    [  # ComfyUI casts per layer: nothing is copied; fp32 computes in the manual-cast dtype, as ComfyUI itself does
        (("fp32", "cuda", FP8, False, F16), PrecisionPlan(F16, False)),
        (("fp32", "cuda", FP8, True, BF16), PrecisionPlan(BF16, False)),
        (("fp32", "cpu", FP8, False, F32), PrecisionPlan(F32, False)),
        (("auto", "cuda", FP8, False, F16), PrecisionPlan(F16, True)),
        (("auto", "cuda", FP8, True, F16), PrecisionPlan(BF16, True)),
        (("auto", "cuda", BF16, False, F32), PrecisionPlan(F32, False)),
        (("bf16", "cuda", FP8, False, F16), PrecisionPlan(BF16, True)),
        (("fp16", "cpu", FP8, False, F32), PrecisionPlan(F16, True)),
    ],
)
def test_plan_with_manual_cast(args, want):
    assert plan_precision(*args) == want


def test_every_plan_scales_fp16_losses_and_copies_only_to_another_dtype():
    for args in itertools.product(PRECISIONS, DEVICES, STORED, (True, False), (None, F16, BF16, F32)):
        precision, _, _, _, manual = args
        plan = plan_precision(*args)
        assert plan.loss_scaling == (plan.compute == F16), args
        assert plan.compute not in plan.cast_from, args
        assert plan.autocast == (plan.compute != F32 and not (manual is not None and precision == "fp32")), args
        if manual is not None:
            assert not plan.cast_from, args  # ComfyUI's manual-cast ops cast per layer; copies would only cost memory


# --- hosts over weights stored in half precision ------------------------------------------------------------------


class HalfUNet(TinyUNet):
    """TinyUNet whose forward follows its input's dtype, as ComfyUI's UNet does (``t_emb.to(x.dtype)``)."""

    def forward(self, x, t, ctx):
        temb = self.time_embedding(self.timestep_embedding(t).to(x.dtype))
        h = self.conv_in(x)
        h = self.down_blocks[0](h, temb, ctx)
        h = self.up_blocks[0](h, temb, ctx)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class StoredDiffusion(TinyDiffusion):
    """A host like ComfyDiffusion: declares how its weights are stored, feeds inputs of the dtype it is told."""

    def __init__(self, unet, weight_dtype, manual_cast_dtype=None):
        super().__init__(unet)
        self.weight_dtype = weight_dtype
        self.manual_cast_dtype = manual_cast_dtype
        self.compute_dtype = None

    def __call__(self, x, t, cond):
        if torch.is_autocast_enabled(x.device.type):
            dtype = x.dtype
        else:
            dtype = self.compute_dtype or self.manual_cast_dtype or self.weight_dtype
        return self.unet(x.to(dtype), t, cond["context"].to(dtype)).float()


def _half_unet(seed=0, dtype=F16):
    torch.manual_seed(seed)
    return HalfUNet().eval().to(dtype)


def _layers(module):
    return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _record_matmuls(module, seen):
    def hook(layer, args):
        seen.append((args[0].dtype, layer.weight.dtype, id(layer.weight)))

    return [m.register_forward_pre_hook(hook) for m in _layers(module)]


def _trainer(model, root, seed=0, adapter_cfg=None):
    adapters = AdapterSet.create({"unet": root}, adapter_cfg or AdapterConfig(rank=4, alpha=4), seed=seed)
    return Trainer(model, {"unet": root}), TrainState.from_adapters(adapters, seed=seed)


def test_fp32_over_fp16_weights_computes_in_fp32_and_puts_the_fp16_parameters_back():
    unet = _half_unet()
    originals = dict(unet.named_parameters())
    values = {k: v.detach().clone() for k, v in originals.items()}
    model = StoredDiffusion(unet, F16)
    trainer, state = _trainer(model, unet)
    seen, previews = [], []

    class Probe(TrainCallback):
        def on_preview(self, step, adapters):  # a sampler runs the stored weights
            previews.append(all(p is originals[k] for k, p in unet.named_parameters()))

    hooks = _record_matmuls(unet, seen)
    cfg = TrainConfig(steps=4, learning_rate=1e-3, batch_size=2, precision="fp32")
    result = trainer.run(state, make_dataset(), cfg, callbacks=[Probe()], preview_every=2).state
    for h in hooks:
        h.remove()

    assert seen and {(x, w) for x, w, _ in seen} == {(F32, F32)}  # every matmul and convolution in fp32
    assert previews == [True, True]
    assert result.scaler_state is None  # no fp16 compute, no loss scaling
    assert all(p is originals[k] for k, p in unet.named_parameters())  # the same fp16 objects...
    assert all(p.dtype == F16 and torch.equal(p, values[k]) for k, p in unet.named_parameters())  # ...and values
    assert model.compute_dtype is None  # what the host was told holds for the run only

    # really fp32: the same run as on an fp32 model holding the fp16-rounded values, bit for bit
    twin = _half_unet().float()
    twin_trainer, twin_state = _trainer(TinyDiffusion(twin), twin)
    reference = twin_trainer.run(twin_state, make_dataset(), cfg).state
    assert [h[1] for h in result.history] == [h[1] for h in reference.history]
    for k in reference.weights:
        assert torch.equal(reference.weights[k], result.weights[k]), k


def test_fp16_over_fp16_weights_trains_with_loss_scaling():
    unet = _half_unet()
    trainer, state = _trainer(StoredDiffusion(unet, F16), unet)
    result = trainer.run(state, make_dataset(), TrainConfig(steps=3, learning_rate=1e-3, precision="fp16")).state
    assert result.scaler_state is not None and result.scaler_state["_growth_tracker"] == 3
    assert all(p.dtype == F16 for p in unet.parameters())


def test_auto_over_fp16_weights_on_a_gpu_without_bf16_is_fp16_with_a_grad_scaler(monkeypatch):
    unet = _half_unet()
    model = StoredDiffusion(unet, F16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    gpu = Trainer(model, {"unet": unet}, device="cuda").precision_plan("auto")  # the decision, not a CUDA run
    assert gpu == PrecisionPlan(F16, True, frozenset({BF16})) and gpu.loss_scaling
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert Trainer(model, {"unet": unet}, device="cuda").precision_plan("auto").compute == BF16

    # the run follows the plan: simulate the GPU's decision, execute on the CPU
    monkeypatch.setattr(
        Trainer,
        "precision_plan",
        lambda self, precision: plan_precision(
            precision, "cuda", self.stored_dtype(), False, getattr(self.model, "manual_cast_dtype", None)
        ),
    )
    trainer, state = _trainer(model, unet)
    result = trainer.run(state, make_dataset(), TrainConfig(steps=2, learning_rate=1e-3, precision="auto")).state
    assert result.scaler_state is not None and result.scaler_state["_growth_tracker"] == 2


class Plain(nn.Module):
    """Convolutions only (no norms: CPU autocast would not upcast a norm's fp16 weight)."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.proj = nn.Linear(8, 8)
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x, t, ctx):
        h = F.silu(self.conv_in(x))
        h = self.proj(h.transpose(1, 3)).transpose(1, 3)
        return self.conv_out(F.silu(h))


def _plain(dtype=F16, seed=0):
    torch.manual_seed(seed)
    return Plain().eval().to(dtype)


def test_bf16_over_fp16_weights_makes_the_copies_once_per_run(monkeypatch):
    net = _plain()
    originals = dict(net.named_parameters())
    values = {k: v.detach().clone() for k, v in originals.items()}
    copies = []
    real_copy = getattr(trainer_module.FrozenWeightCast, "_copy", None)
    monkeypatch.setattr(
        trainer_module.FrozenWeightCast, "_copy", lambda self, p: copies.append(p) or real_copy(self, p), raising=False
    )
    trainer, state = _trainer(StoredDiffusion(net, F16), net, adapter_cfg=AdapterConfig(rank=2, unet_targets="all"))
    seen = []
    hooks = _record_matmuls(net, seen)
    cfg = TrainConfig(steps=6, learning_rate=1e-3, batch_size=2, precision="bf16")
    result = trainer.run(state, make_dataset(), cfg, preview_every=2).state
    for h in hooks:
        h.remove()

    assert len(copies) == len(originals) == 6  # 3 weights + 3 biases, once, not per step nor per preview
    assert {w for _, w, _ in seen} == {BF16}
    per_layer = len(_layers(net))
    assert len(seen) == per_layer * 6 and len({i for _, _, i in seen}) == per_layer  # same copy in every step
    assert not {i for _, _, i in seen} & {id(p) for p in originals.values()}
    assert all(p is originals[k] and p.dtype == F16 and torch.equal(p, values[k]) for k, p in net.named_parameters())
    assert result.scaler_state is None and all(v.dtype == F32 for v in result.weights.values())


def test_a_weight_the_host_replaces_during_a_preview_is_copied_again_and_stays(monkeypatch):
    """ComfyUI may reload (and re-patch) the model during a preview, putting new parameter objects in place."""
    net = _plain()
    trainer, state = _trainer(StoredDiffusion(net, F16), net, adapter_cfg=AdapterConfig(rank=2, unet_targets="all"))
    replaced = {}

    class Reload(TrainCallback):
        def on_preview(self, step, adapters):
            if not replaced:
                old = net.conv_out._parameters["weight"]
                replaced["p"] = nn.Parameter(old.detach() * 2, requires_grad=False)
                net.conv_out._parameters["weight"] = replaced["p"]

    first = net.conv_out.weight.detach().clone()
    seen = []
    hook = net.conv_out.register_forward_pre_hook(lambda layer, args: seen.append(layer.weight))
    trainer.run(
        state, make_dataset(), TrainConfig(steps=4, batch_size=2, precision="bf16"), [Reload()], preview_every=2
    )
    hook.remove()
    assert seen[0] is seen[1] and seen[2] is seen[3] and seen[1] is not seen[2]  # one copy each side of the preview
    assert torch.equal(seen[1], first.to(BF16)) and torch.equal(seen[2], replaced["p"].detach().to(BF16))
    assert net.conv_out.weight is replaced["p"] and net.conv_out.weight.dtype == F16  # the host's tensor stays


class CastConv(nn.Conv2d):
    """A ComfyUI manual-cast layer: the stored weight is cast to the input's dtype per call."""

    def forward(self, x):
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride, self.padding)


class Fp8Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = CastConv(4, 8, 3, padding=1)
        self.conv_out = CastConv(8, 4, 3, padding=1)

    def forward(self, x, t, ctx):
        return self.conv_out(F.silu(self.conv_in(x)))


def test_fp32_over_manual_cast_weights_computes_in_the_manual_cast_dtype_with_loss_scaling_and_copies_nothing():
    torch.manual_seed(0)
    net = Fp8Net().eval().to(FP8)
    originals = dict(net.named_parameters())
    model = StoredDiffusion(net, FP8, manual_cast_dtype=F16)
    trainer, state = _trainer(model, net, adapter_cfg=AdapterConfig(rank=2, unet_targets="all"))
    seen = []
    hooks = _record_matmuls(net, seen)
    result = trainer.run(state, make_dataset(), TrainConfig(steps=3, batch_size=2, precision="fp32")).state
    for h in hooks:
        h.remove()
    assert {(x, w) for x, w, _ in seen} == {(F16, FP8)}  # ComfyUI's ops cast per layer; the weights stay fp8
    assert result.scaler_state is not None  # fp16 compute: loss scaling, although fp32 was asked for
    assert all(p is originals[k] and p.dtype == FP8 for k, p in net.named_parameters())


def test_fp32_weights_on_the_cpu_are_untouched_by_an_fp32_run(monkeypatch):
    """The common CPU case: nothing to copy, the host is told fp32, the run is as before."""
    copies = []
    monkeypatch.setattr(trainer_module.FrozenWeightCast, "_copy", lambda self, p: copies.append(p), raising=False)
    unet = _half_unet(dtype=F32)
    model = StoredDiffusion(unet, F32)
    trainer, state = _trainer(model, unet)
    told = []
    real_call = StoredDiffusion.__call__
    monkeypatch.setattr(
        StoredDiffusion, "__call__", lambda self, *a: told.append(self.compute_dtype) or real_call(self, *a)
    )
    trainer.run(state, make_dataset(), TrainConfig(steps=2, precision="auto"))
    assert copies == [] and told == [F32, F32] and model.compute_dtype is None
