"""The pre-step memory estimate (lora_core.memory): measured saved tensors, checked against what torch's own
gradient checkpointing keeps, scaling with batch and resolution, advice, and a run that it leaves untouched."""

from __future__ import annotations

import pytest
import torch

from lora_core import AdapterConfig, AdapterSet, TrainCallback, TrainConfig, Trainer, TrainState
from lora_core.diffusion import diffusion_loss
from lora_core.memory import (
    ActivationProfile,
    MemoryEstimate,
    _counting,
    advice,
    measure_activations,
    module_bytes,
)
from lora_core.trainer import gradient_checkpointing
from tiny_models import TinyDiffusion, make_dataset, make_unet


def _setup(batch: int = 2, side: int = 8, unet=None):
    unet = unet or make_unet()
    adapters = AdapterSet.create({"unet": unet}, AdapterConfig(rank=4), seed=0)
    blocks = list(unet.down_blocks) + list(unet.up_blocks)
    data = make_dataset(n=batch, sizes=((side, side),))
    latents, cond = data.collate(list(range(batch)))
    model = TinyDiffusion(unet)

    def forward():
        return diffusion_loss(model, model.scale_latents(latents), cond, TrainConfig(), torch.Generator().manual_seed(0))

    return unet, adapters, blocks, forward


def test_the_checkpointed_figure_is_what_torch_checkpointing_keeps_outside_the_blocks():
    """Measured without checkpointing, the profile's total minus its blocks is exactly what autograd saves when the
    blocks really run under torch.utils.checkpoint (whose own hooks hold the blocks' tensors): so the per-block
    split is right, and the checkpointed estimate adds back only the blocks' inputs and one block."""
    unet, adapters, blocks, forward = _setup()
    weights = list(unet.parameters())
    with adapters.attach({"unet": unet}):
        profile = measure_activations(forward, blocks, exclude=weights)
        with gradient_checkpointing(blocks), _counting((), weights) as outside:
            forward()
    assert profile.total > 0 and len(profile.blocks) == 2 and all(b > 0 for b in profile.blocks)
    assert profile.block_inputs > 0
    # torch's checkpoint keeps the blocks' inputs as saved tensors and nothing of the blocks' insides
    assert outside.total == profile.total - sum(profile.blocks) + profile.block_inputs
    assert profile.checkpointed == outside.total + max(profile.blocks)
    assert profile.checkpointed < profile.total


def test_activations_scale_with_batch_and_resolution_and_weights_are_not_counted_twice():
    unet, adapters, blocks, _ = _setup()
    sizes = {}
    with adapters.attach({"unet": unet}):
        for batch, side in ((1, 8), (4, 8), (1, 16)):
            *_, forward = _setup(batch, side, unet)
            sizes[batch, side] = measure_activations(forward, blocks, exclude=unet.parameters()).total
    assert sizes[4, 8] == pytest.approx(4 * sizes[1, 8], rel=0.1)
    assert sizes[1, 16] == pytest.approx(4 * sizes[1, 8], rel=0.25)  # about the pixel count (attention: more)
    with adapters.attach({"unet": unet}):
        *_, forward = _setup(1, 8, unet)
        with_weights = measure_activations(forward, blocks).total
    assert with_weights > sizes[1, 8]  # frozen weights autograd keeps for the input gradients: excluded above
    assert module_bytes([unet, unet]) == sum(p.numel() * 4 for p in unet.parameters()) + sum(
        b.numel() * b.element_size() for b in unet.buffers())


def test_advice_names_settings_that_make_the_run_fit():
    profile = ActivationProfile(total=8 * 2**30, blocks=(3 * 2**30, 3 * 2**30), block_inputs=2**28)
    estimate = MemoryEstimate(weights=24 * 2**30, adapters=2**28, optimizer=2**28, activations=profile,
                              gradient_checkpointing=False, batch_size=4, optimizer_name="adamw",
                              trainable_params=2**25)
    tips = advice(estimate, free=4 * 2**30, stored_bytes_per_weight=2)
    assert tips[0].startswith("gradient_checkpointing on: 5.") and "(still short)" in tips[0]
    assert any(t.startswith("batch_size 1 with grad_accum 4: 2.50 GiB (fits)") for t in tips), tips
    assert any(t.startswith("optimizer adamw8bit") for t in tips)
    assert tips[-1].startswith("fp8 weights") and "12.00 GiB" in tips[-1]
    assert advice(estimate, free=None) == []
    assert advice(estimate, free=64 * 2**30) == []


class Reports(TrainCallback):
    def __init__(self):
        self.reports = []

    def on_memory(self, report):
        self.reports.append(report)


def test_the_trainer_reports_an_estimate_before_the_first_step_and_trains_exactly_as_without():
    def run(estimate: bool, ckpt: bool = False):
        unet = make_unet()
        adapters = AdapterSet.create({"unet": unet}, AdapterConfig(rank=4), seed=0)
        blocks = list(unet.down_blocks) + list(unet.up_blocks)
        cb = Reports()
        trainer = Trainer(TinyDiffusion(unet), {"unet": unet}, checkpoint_modules=blocks, estimate_memory=estimate,
                          free_memory=lambda device: 1)
        config = TrainConfig(steps=3, batch_size=2, gradient_checkpointing=ckpt, noise_offset=0.05)
        state = trainer.run(TrainState.from_adapters(adapters), make_dataset(), config, callbacks=[cb]).state
        return state, cb.reports, adapters

    plain, none, _ = run(False)
    measured, reports, adapters = run(True)
    assert none == [] and len(reports) == 1
    assert measured.history == plain.history and all(torch.equal(measured.weights[k], plain.weights[k])
                                                      for k in plain.weights)
    report = reports[0]
    params = sum(p.numel() for p in adapters.parameters())
    assert report.estimate.adapters == 8 * params and report.estimate.optimizer == 8 * params  # fp32 + grad; AdamW
    assert report.estimate.batch_size == 2 and report.estimate.activation_bytes == report.estimate.activations.total
    assert report.fits is False and report.advice[0].startswith("gradient_checkpointing on")
    assert "does NOT fit" in report.describe() and "Would help: gradient_checkpointing on" in report.describe()
    _, (checkpointed,), _ = run(True, ckpt=True)
    assert checkpointed.estimate.activation_bytes == checkpointed.estimate.activations.checkpointed


def test_a_failed_estimate_never_stops_training_but_running_out_of_memory_in_it_says_what_to_change(monkeypatch):
    import lora_core.trainer as trainer_module
    from lora_core import OutOfMemoryTrainingError

    def run():
        unet = make_unet()
        adapters = AdapterSet.create({"unet": unet}, AdapterConfig(rank=4), seed=0)
        cb = Reports()
        trainer = Trainer(TinyDiffusion(unet), {"unet": unet}, estimate_memory=True)
        start = TrainState.from_adapters(adapters)
        return trainer.run(start, make_dataset(), TrainConfig(steps=2), callbacks=[cb]), cb, start

    def broken(*_a, **_k):
        raise RuntimeError("a host network the counting hooks do not understand")

    monkeypatch.setattr(trainer_module, "measure_activations", broken)
    result, cb, _ = run()
    assert result.state.step == 2 and cb.reports == []

    def oom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(trainer_module, "measure_activations", oom)
    with pytest.raises(OutOfMemoryTrainingError, match="before the first step.*gradient_checkpointing=True") as info:
        run()
    assert info.value.last_good_state.step == 0
