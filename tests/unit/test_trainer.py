import math

import pytest
import torch
from torch import nn

from lora_core import AdapterConfig, AdapterSet, NonFiniteLossError, TrainCallback, TrainConfig, Trainer, TrainState
from lora_core.data.latents import LatentDataset, LatentItem
from tiny_models import TinyDiffusion, make_dataset, make_unet


def _setup(adapter_cfg=None, seed=0):
    unet = make_unet()
    adapters = AdapterSet.create({"unet": unet}, adapter_cfg or AdapterConfig(rank=4, alpha=4), seed=seed)
    state = TrainState.from_adapters(adapters, seed=seed)
    return unet, Trainer(TinyDiffusion(unet), {"unet": unet}), state


class Regression:
    """A 'denoiser' whose learnable target is exact: the loss can go to ~0."""

    prediction_type = "epsilon"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 4, bias=False))
        self.alphas_cumprod = torch.full((10,), 0.5)
        self.target_map = torch.randn(4, 4) * 0.3

    def scale_latents(self, x):
        return x

    def __call__(self, x, t, cond):
        return self.net(x.transpose(1, 3)).transpose(1, 3)


def test_loss_falls_to_near_zero_on_a_learnable_target():
    model = Regression()
    # eps-prediction from x_t = sqrt(.5) x0 + sqrt(.5) eps is learnable exactly when x0 = 0.
    items = tuple(LatentItem(torch.zeros(4, 2, 2), {"c": torch.zeros(1)}) for _ in range(4))
    adapters = AdapterSet.create({"m": model.net}, AdapterConfig(rank=4, alpha=4, unet_targets="all"), seed=0)
    state = TrainState.from_adapters(adapters)
    trainer = Trainer(model, {"m": model.net})
    cfg = TrainConfig(steps=300, learning_rate=3e-2, batch_size=4, weight_decay=0.0, max_grad_norm=0)
    result = trainer.run(state, LatentDataset(items), cfg)
    losses = [h[1] for h in result.state.history]
    assert losses[0] > 0.5
    assert sum(losses[-20:]) / 20 < 0.05 * losses[0]


def test_loss_falls_on_the_tiny_unet():
    unet, trainer, state = _setup(AdapterConfig(rank=8, alpha=8, algorithm="locon"))
    cfg = TrainConfig(steps=120, learning_rate=5e-3, batch_size=4, timestep_sampling="uniform")
    result = trainer.run(state, make_dataset(n=4), cfg)
    losses = [h[1] for h in result.state.history]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)


def test_run_never_mutates_its_input_state_or_the_base_model():
    unet, trainer, state = _setup()
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    weights = {k: v.clone() for k, v in state.weights.items()}
    first = trainer.run(state, make_dataset(), TrainConfig(steps=5, learning_rate=1e-2)).state
    opt_before = {i: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for i, s in first.optimizer_state["state"].items()}
    trainer.run(first, make_dataset(), TrainConfig(steps=5, learning_rate=1e-2))
    assert all(torch.equal(weights[k], state.weights[k]) for k in weights)
    assert state.step == 0 and state.optimizer_state is None
    for i, s in first.optimizer_state["state"].items():
        for k, v in opt_before[i].items():
            assert torch.equal(v, s[k])
    assert all(torch.equal(base[k], v) for k, v in unet.state_dict().items())
    assert all(p.requires_grad for p in unet.parameters())
    assert sum(len(m._forward_hooks) for m in unet.modules()) == 0


def _resume_cfg(steps):
    return TrainConfig(
        steps=steps, learning_rate=2e-3, batch_size=2, grad_accum=2, scheduler="cosine", warmup_steps=5,
        schedule_steps=40, noise_offset=0.05, min_snr_gamma=5.0,
    )


def test_resume_is_exact(tmp_path):
    adapter_cfg = AdapterConfig(rank=4, alpha=4, dropout=0.1)
    data = make_dataset(n=5, sizes=((8, 8), (8, 12)), repeats=2)
    _, trainer, state = _setup(adapter_cfg, seed=3)
    straight = trainer.run(state, data, _resume_cfg(40)).state

    _, trainer2, state2 = _setup(adapter_cfg, seed=3)
    half = trainer2.run(state2, data, _resume_cfg(20)).state
    half.save(tmp_path / "half.safetensors")
    loaded = TrainState.load(tmp_path / "half.safetensors")
    resumed = trainer2.run(loaded, data, _resume_cfg(20)).state

    assert resumed.step == straight.step == 40
    assert (resumed.epoch, resumed.batch_index) == (straight.epoch, straight.batch_index)
    assert [h[1] for h in resumed.history] == [h[1] for h in straight.history]
    assert [h[2] for h in resumed.history] == [h[2] for h in straight.history]
    for k in straight.weights:
        assert torch.equal(straight.weights[k], resumed.weights[k]), k


def test_fp16_resume_keeps_the_loss_scale(tmp_path):
    """fp16 trains with a GradScaler; a resumed run continues its loss scale and growth counter, not from scratch."""
    cfg = dict(learning_rate=1e-3, batch_size=2, precision="fp16", min_snr_gamma=0.0)
    data = make_dataset(n=4)
    _, trainer, state = _setup(seed=5)
    straight = trainer.run(state, data, TrainConfig(steps=8, **cfg)).state
    assert straight.scaler_state is not None and straight.scaler_state["_growth_tracker"] == 8  # 8 clean steps
    _, trainer2, state2 = _setup(seed=5)
    half = trainer2.run(state2, data, TrainConfig(steps=4, **cfg)).state
    half.save(tmp_path / "half.safetensors")
    loaded = TrainState.load(tmp_path / "half.safetensors")
    assert loaded.scaler_state == half.scaler_state
    resumed = trainer2.run(loaded, data, TrainConfig(steps=4, **cfg)).state
    assert resumed.scaler_state == straight.scaler_state
    assert [h[1] for h in resumed.history] == [h[1] for h in straight.history]
    for k in straight.weights:
        assert torch.equal(straight.weights[k], resumed.weights[k]), k


def test_same_seed_same_run_and_other_seed_differs():
    def run(seed):
        _, trainer, state = _setup(seed=seed)
        return trainer.run(state, make_dataset(), TrainConfig(steps=6, learning_rate=1e-2)).state

    a, b, c = run(1), run(1), run(2)
    assert [h[1] for h in a.history] == [h[1] for h in b.history]
    assert [h[1] for h in a.history] != [h[1] for h in c.history]


def test_lr_schedule_warmup_and_cosine():
    _, trainer, state = _setup()
    cfg = TrainConfig(steps=20, learning_rate=1e-3, scheduler="cosine", warmup_steps=4)
    lrs = [h[2] for h in trainer.run(state, make_dataset(), cfg).state.history]
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(1e-3)
    assert lrs[1] < lrs[2] < lrs[3] < lrs[4]
    assert lrs[-1] < 0.05e-3
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_nan_loss_stops_with_the_last_good_state():
    class Poison(TinyDiffusion):
        calls = 0

        def __call__(self, x, t, cond):
            Poison.calls += 1
            out = super().__call__(x, t, cond)
            return out * float("nan") if Poison.calls == 4 else out

    unet = make_unet()
    adapters = AdapterSet.create({"unet": unet}, AdapterConfig(rank=4), seed=0)
    state = TrainState.from_adapters(adapters)
    trainer = Trainer(Poison(unet), {"unet": unet})
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 4.*learning rate.*fp16.*VAE") as info:
        trainer.run(state, make_dataset(), TrainConfig(steps=10, learning_rate=1e-2))
    good = info.value.last_good_state
    assert good.step == 3 and len(good.history) == 3
    assert all(math.isfinite(float(v.abs().sum())) for v in good.weights.values())
    assert sum(len(m._forward_hooks) for m in unet.modules()) == 0


def test_cancel_stops_within_one_step_and_checkpoints_fire():
    class Stopper(TrainCallback):
        def __init__(self):
            self.steps, self.saved = [], []

        def on_step(self, info):
            self.steps.append(info.step)

        def on_checkpoint(self, state):
            self.saved.append(state.step)

        def should_stop(self):
            return len(self.steps) >= 7

    _, trainer, state = _setup()
    cb = Stopper()
    result = trainer.run(state, make_dataset(), TrainConfig(steps=50), callbacks=[cb], save_every=3)
    assert result.stopped_early and result.state.step == 7
    assert cb.saved == [3, 6]


def test_gradient_checkpointing_gives_the_same_gradients():
    def run(ckpt):
        unet = make_unet()
        adapters = AdapterSet.create({"unet": unet}, AdapterConfig(rank=4), seed=0)
        state = TrainState.from_adapters(adapters)
        blocks = list(unet.down_blocks) + list(unet.up_blocks)
        trainer = Trainer(TinyDiffusion(unet), {"unet": unet}, checkpoint_modules=blocks)
        out = trainer.run(state, make_dataset(), TrainConfig(steps=3, gradient_checkpointing=ckpt)).state
        assert all("forward" not in b.__dict__ for b in blocks)
        return out

    a, b = run(False), run(True)
    for k in a.weights:
        assert torch.allclose(a.weights[k], b.weights[k], atol=1e-6)


def test_missing_optional_optimizer_names_the_package():
    pytest.importorskip("torch")
    try:
        import lion_pytorch  # noqa: F401
        pytest.skip("lion-pytorch is installed")
    except ImportError:
        pass
    _, trainer, state = _setup()
    with pytest.raises(ValueError, match="pip install lion-pytorch"):
        trainer.run(state, make_dataset(), TrainConfig(steps=1, optimizer="lion"))


def test_tensorboard_scalars_are_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora_core.tb import TensorBoardCallback

    _, trainer, state = _setup()
    trainer.run(state, make_dataset(), TrainConfig(steps=4), callbacks=[TensorBoardCallback(tmp_path)])
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert {"loss/raw", "loss/smoothed", "lr", "grad_norm", "speed/sec_per_step"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss/raw")] == [1, 2, 3, 4]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_keeps_fp32_adapter_weights(precision):
    _, trainer, state = _setup()
    result = trainer.run(state, make_dataset(), TrainConfig(steps=4, learning_rate=1e-2, precision=precision)).state
    assert all(math.isfinite(h[1]) for h in result.history)
    assert all(v.dtype == torch.float32 for v in result.weights.values())
    assert any(torch.count_nonzero(v) for k, v in result.weights.items() if "lora_up" in k)


def test_out_of_memory_gives_concrete_options_and_the_last_good_state():
    class Greedy(TinyDiffusion):
        calls = 0

        def __call__(self, x, t, cond):
            Greedy.calls += 1
            if Greedy.calls == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return super().__call__(x, t, cond)

    from lora_core import OutOfMemoryTrainingError

    unet = make_unet()
    state = TrainState.from_adapters(AdapterSet.create({"unet": unet}, AdapterConfig(rank=4)))
    trainer = Trainer(Greedy(unet), {"unet": unet})
    with pytest.raises(OutOfMemoryTrainingError, match=r"out of memory at step 3: try a smaller batch_size \(now 2\)"
                       r".*resolution.*gradient_checkpointing=True.*bf16") as info:
        trainer.run(state, make_dataset(), TrainConfig(steps=5, batch_size=2))
    assert info.value.last_good_state.step == 2
    assert sum(len(m._forward_hooks) for m in unet.modules()) == 0


def test_text_encoder_adapters_get_their_own_learning_rate_and_a_changed_lr_applies_on_resume():
    from lora_core.optim import param_groups

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = torch.nn.Sequential(torch.nn.Linear(4, 4))
            self.te = torch.nn.Sequential(torch.nn.Linear(4, 4))

    m = Two()
    adapters = AdapterSet.create({"unet": m.unet, "te": m.te},
                                 AdapterConfig(rank=2, unet_targets="all", text_targets="all"))
    groups = param_groups(adapters.items(), TrainConfig(learning_rate=1e-3, text_encoder_lr=1e-4))
    assert [g["lr"] for g in groups] == [1e-3, 1e-4] and [len(g["params"]) for g in groups] == [2, 2]

    _, trainer, state = _setup()
    first = trainer.run(state, make_dataset(), TrainConfig(steps=2, learning_rate=1e-3)).state
    second = trainer.run(first, make_dataset(), TrainConfig(steps=2, learning_rate=5e-4)).state
    assert [h[2] for h in second.history] == [1e-3, 1e-3, 5e-4, 5e-4]
    assert second.optimizer_state["param_groups"][0]["lr"] == 5e-4


def test_bf16_cpu_runs_on_cast_copies_bit_identically_and_restores_the_originals(monkeypatch):
    """A CPU bf16 run swaps bf16 copies of the frozen weights in (autocast would re-cast them every forward):
    same numbers as without, fp32 originals during previews, the original tensors back afterwards."""
    from lora_core import trainer as trainer_module

    cfg = TrainConfig(steps=4, learning_rate=1e-3, batch_size=2, precision="bf16")
    unet, trainer, state = _setup(AdapterConfig(rank=4, alpha=4, algorithm="locon"), seed=2)
    originals = {name: p for name, p in unet.named_parameters()}
    seen = {}

    class Probe(TrainCallback):
        def on_step(self, info):
            seen.setdefault("train", {p.dtype for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                                      for p in m.parameters(recurse=False)})

        def on_preview(self, step, adapters):
            seen["preview"] = {p.dtype for p in unet.parameters()}
            unet(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 7, 16))  # a sampler's forward

    cast = trainer.run(state, make_dataset(), cfg, callbacks=[Probe()], preview_every=2).state
    assert seen["train"] == {torch.bfloat16} and seen["preview"] == {torch.float32}
    assert all(p is originals[name] for name, p in unet.named_parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in unet.parameters())

    monkeypatch.setattr(trainer_module.FrozenWeightCast, "apply", lambda self: None)
    _, trainer2, state2 = _setup(AdapterConfig(rank=4, alpha=4, algorithm="locon"), seed=2)
    plain = trainer2.run(state2, make_dataset(), cfg).state
    assert [h[1] for h in cast.history] == [h[1] for h in plain.history]
    for k in plain.weights:
        assert torch.equal(plain.weights[k], cast.weights[k]), k


def test_unequal_micro_batches_weigh_every_sample_equally(monkeypatch):
    """Three same-bucket images at batch_size 2 give micro-batches of 2 and 1: with grad_accum 2 the step must equal
    one batch of 3 (each sample 1/3 of the gradient), not weigh the lone sample twice as much."""
    import lora_core.trainer as trainer_module

    def per_sample_loss(model, latents, cond, config, generator):  # deterministic: no noise, no timesteps
        return ((model(latents, None, cond) - 2.0 * latents) ** 2).mean(dim=(1, 2, 3)).mean()

    monkeypatch.setattr(trainer_module, "diffusion_loss", per_sample_loss)
    g = torch.Generator().manual_seed(1)
    items = tuple(LatentItem(torch.randn(4, 2, 2, generator=g), {"c": torch.zeros(1)}) for _ in range(3))

    def one_step(batch_size, grad_accum):
        model = Regression()
        adapters = AdapterSet.create({"m": model.net}, AdapterConfig(rank=4, alpha=4, unet_targets="all"), seed=0)
        state = TrainState.from_adapters(adapters)
        cfg = TrainConfig(steps=1, learning_rate=0.1, optimizer="sgd", batch_size=batch_size, grad_accum=grad_accum,
                          weight_decay=0.0, max_grad_norm=0)
        return Trainer(model, {"m": model.net}).run(state, LatentDataset(items), cfg).state

    whole, split = one_step(3, 1), one_step(2, 2)
    assert split.history[0][1] == pytest.approx(whole.history[0][1], rel=1e-6)  # the per-sample mean loss
    for key, w in whole.weights.items():
        torch.testing.assert_close(split.weights[key], w, rtol=1e-5, atol=1e-7)
    start = TrainState.from_adapters(
        AdapterSet.create({"m": Regression().net}, AdapterConfig(rank=4, alpha=4, unet_targets="all"), seed=0))
    assert any(not torch.equal(w, start.weights[k]) for k, w in whole.weights.items())  # the step did move


class HostInterrupt(BaseException):
    """Like ComfyUI's InterruptProcessingException (a BaseException since ComfyUI 0.3.7x), raised inside a layer."""


@pytest.mark.parametrize("checkpointing", [False, True])
def test_an_interrupt_inside_a_step_discards_that_step_and_keeps_the_last_whole_one(tmp_path, checkpointing):
    """The host's Cancel raised from a layer's forward (the 2nd micro-batch of step 7; with gradient checkpointing
    also possible in backward's recomputation): the run ends at step 6 exactly, and resuming from it reproduces the
    uninterrupted run bit for bit, so nothing of the interrupted step leaked into the weights, optimizer or RNG."""
    data = make_dataset(n=5, sizes=((8, 8), (8, 12)), repeats=2)
    cfg = dict(_resume_cfg(10).to_dict(), gradient_checkpointing=checkpointing)
    _, trainer, state = _setup(seed=3)
    straight = trainer.run(state, data, TrainConfig(**cfg)).state

    unet, trainer2, state2 = _setup(seed=3)
    trainer2.interrupts = (HostInterrupt,)
    trainer2.checkpoint_modules = [unet.down_blocks[0]] if checkpointing else []
    calls = {"n": 0}
    per_step = 2 * 2 if checkpointing else 2  # grad_accum 2 micro-batches; checkpointing runs each block twice

    def interrupt_in_step_7(module, args):
        calls["n"] += 1
        if calls["n"] == per_step * 6 + (per_step if checkpointing else 2):
            raise HostInterrupt()

    layer = unet.down_blocks[0].get_submodule("resnets.0.conv1")  # a layer inside the checkpointed block
    handle = layer.register_forward_pre_hook(interrupt_in_step_7)
    result = trainer2.run(state2, data, TrainConfig(**cfg))
    handle.remove()
    assert result.stopped_early and result.state.step == 6
    assert [h[0] for h in result.state.history] == [1, 2, 3, 4, 5, 6]
    result.state.save(tmp_path / "cut.safetensors")
    _, trainer3, _ = _setup(seed=3)
    resumed = trainer3.run(TrainState.load(tmp_path / "cut.safetensors"), data, TrainConfig(**{**cfg, "steps": 4}))
    assert resumed.state.step == 10
    assert [h[1] for h in resumed.state.history] == [h[1] for h in straight.history]
    for k in straight.weights:
        assert torch.equal(straight.weights[k], resumed.state.weights[k]), k


def test_an_interrupt_the_host_did_not_declare_propagates():
    unet, trainer, state = _setup()

    def boom(module, args):
        raise HostInterrupt()

    handle = unet.down_blocks[0].register_forward_pre_hook(boom)
    try:
        with pytest.raises(HostInterrupt):
            trainer.run(state, make_dataset(), TrainConfig(steps=2, learning_rate=1e-2))
    finally:
        handle.remove()
