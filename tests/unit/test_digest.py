"""The run digest (lora_core/digest.py): it changes when anything that shapes a training result changes, not when
only what is shown changes, and it is the same in every process (a restarted ComfyUI finds its finished runs)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from test_settings import SCHEMAS

from lora_core import AdapterConfig, AdapterSet, TrainCallback, TrainConfig, Trainer, TrainState, digest, settings
from lora_core.data.latents import LatentDataset
from lora_core.state import TRAINED_FIELDS, checkpoint_metadata
from tiny_models import TinyDiffusion, make_dataset, make_unet

ROOT = Path(__file__).resolve().parents[2]


def fresh_state(seed: int = 0, rank: int = 4) -> tuple[torch.nn.Module, TrainState]:
    unet = make_unet()
    adapters = AdapterSet.create({"unet": unet}, AdapterConfig(rank=rank, alpha=rank), seed=seed)
    return unet, TrainState.from_adapters(adapters, seed=seed)


@pytest.fixture(scope="module")
def trained() -> TrainState:
    unet, state = fresh_state()
    return Trainer(TinyDiffusion(unet), {"unet": unet}).run(state, make_dataset(), TrainConfig(steps=3)).state


def run_digest(start: TrainState, data: LatentDataset | None = None, config: TrainConfig | None = None,
               base: dict | None = None, code: str = "host") -> str:
    return digest.run_digest(start=start, dataset=data or make_dataset(), config=config or TrainConfig(steps=5),
                             base=base if base is not None else {"unet": "f" * 64}, code=code)


# ---- the start state ------------------------------------------------------------------------------------------

def test_a_saved_and_loaded_state_has_the_same_digest(trained, tmp_path):
    """A finished state read back from disk must hash like the one that was trained: a chained node after a reused
    one then finds its own finished run too."""
    loaded = TrainState.load(trained.save(tmp_path / "s.kiln.safetensors"))
    assert loaded is not trained
    assert digest.state_digest(loaded) == digest.state_digest(trained)


def test_info_is_not_part_of_the_state_digest(trained):
    """``info`` is export metadata (start time, tag frequency): it never changes the trained weights."""
    other = trained.replace(info={**trained.info, "training_started_at": 123.0, "trigger_word": "x"})
    assert digest.state_digest(other) == digest.state_digest(trained)


def _changed(state: TrainState, name: str) -> TrainState:
    if name == "weights":
        key = next(iter(state.weights))
        w = dict(state.weights)
        w[key] = w[key].clone()
        w[key].view(-1)[0] += 1e-6
        return state.replace(weights=w)
    if name == "optimizer_state":
        opt = {"state": {i: dict(e) for i, e in state.optimizer_state["state"].items()},
               "param_groups": state.optimizer_state["param_groups"]}
        opt["state"][0]["exp_avg"] = opt["state"][0]["exp_avg"] + 1e-9
        return state.replace(optimizer_state=opt)
    if name == "rng":
        noise = state.rng["noise"].clone()
        noise[-1] ^= 1
        return state.replace(rng={**state.rng, "noise": noise})
    if name == "history":
        return state.replace(history=state.history[:-1] + ((state.history[-1][0], state.history[-1][1] + 1e-9,
                                                            state.history[-1][2]),))
    changes = {"step": state.step + 1, "epoch": state.epoch + 1, "batch_index": state.batch_index + 1,
               "optimizer_name": "lion", "scaler_state": {"scale": 2.0}, "seed": state.seed + 1,
               "adapter_config": dataclasses.replace(state.adapter_config, dropout=0.1),
               "specs": state.specs[:-1]}
    return state.replace(**{name: changes[name]})


@pytest.mark.parametrize("name", [*TRAINED_FIELDS, "seed", "adapter_config", "specs"])
def test_every_field_of_the_start_state_changes_the_digest(trained, name):
    assert digest.state_digest(_changed(trained, name)) != digest.state_digest(trained)
    assert run_digest(_changed(trained, name)) != run_digest(trained)


def test_with_training_of_rebuilds_what_training_returns(trained):
    _, start = fresh_state()
    start = start.replace(info={"trigger_word": "now"})
    rebuilt = start.with_training_of(trained)
    assert rebuilt.info == {"trigger_word": "now"}  # this run's facts, not the stored file's
    assert digest.state_digest(rebuilt) == digest.state_digest(trained)


# ---- the data -------------------------------------------------------------------------------------------------

def _item(data: LatentDataset, i: int, **changes) -> LatentDataset:
    items = list(data.items)
    items[i] = dataclasses.replace(items[i], **changes)
    return LatentDataset(tuple(items))


@pytest.mark.parametrize("change", ["latent value", "bucket", "caption", "repeats", "encoding", "cond key", "order"])
def test_any_change_to_the_data_changes_the_digest(change):
    data = make_dataset()
    item = data.items[1]
    if change == "latent value":
        latent = item.latent.clone()
        latent[0, 0, 0] += 1e-6
        other = _item(data, 1, latent=latent)
    elif change == "bucket":
        other = _item(data, 1, latent=item.latent.reshape(4, 4, 16))
    elif change == "caption":
        other = _item(data, 1, caption=item.caption + " ")
    elif change == "repeats":
        other = _item(data, 1, repeats=2)
    elif change == "encoding":
        other = _item(data, 1, cond={"context": item.cond["context"] * (1 + 1e-6)})
    elif change == "cond key":
        other = _item(data, 1, cond={**item.cond, "size": torch.tensor([64, 64, 0, 0, 64, 64])})
    else:
        other = LatentDataset((data.items[1], data.items[0], *data.items[2:]))
    assert digest.dataset_digest(other) != digest.dataset_digest(data)
    assert run_digest(fresh_state()[1], other) != run_digest(fresh_state()[1], data)


def test_the_same_data_built_again_has_the_same_digest():
    data, again = make_dataset(), make_dataset()
    assert data.items[0].latent is not again.items[0].latent
    assert digest.dataset_digest(data) == digest.dataset_digest(again)
    renamed = _item(data, 0, key="elsewhere/img0.png")  # where a file came from is only for messages
    assert digest.dataset_digest(renamed) == digest.dataset_digest(data)


# ---- the settings -------------------------------------------------------------------------------------------

VARIANTS = {"steps": 6, "learning_rate": 2e-4, "text_encoder_lr": 5e-5, "optimizer": "lion", "weight_decay": 0.02,
            "betas": (0.9, 0.99), "scheduler": "cosine", "warmup_steps": 1, "schedule_steps": 10, "num_cycles": 2,
            "batch_size": 2, "grad_accum": 2, "max_grad_norm": 0.5, "precision": "bf16",
            "gradient_checkpointing": True, "loss": "huber", "huber_delta": 0.2, "min_snr_gamma": 5.0,
            "noise_offset": 0.05, "timestep_sampling": "logit_normal", "logit_mean": 0.5, "logit_std": 1.5,
            "min_timestep": 1, "max_timestep": 999, "flow_shift": 3.0, "loss_weighting": "cosmap", "guidance": 3.5,
            "expert": "high_noise"}


def test_every_training_setting_changes_the_digest():
    assert set(VARIANTS) == {f.name for f in fields(TrainConfig)}, "give a new TrainConfig field a variant here"
    base = TrainConfig(steps=5)
    seen = {digest.config_digest(base)}
    for name, value in VARIANTS.items():
        changed = dataclasses.replace(base, **{name: value})
        assert getattr(changed, name) != getattr(base, name), name
        d = digest.config_digest(changed)
        assert d not in seen, name
        seen.add(d)
        assert run_digest(fresh_state()[1], config=changed) != run_digest(fresh_state()[1], config=base)


def test_only_presentation_inputs_of_train_steps_stay_out_of_the_digest():
    """Every Train Steps input either reaches TrainConfig through the settings table (so it is hashed) or is one
    of the inputs that only change what is shown or written: previews, save_every, retrain. A new input that
    shapes training but is neither fails here."""
    widgets = set(SCHEMAS["KilnTrainSteps"]["widgets"])
    hashed = {name for s in settings.SETTINGS for node, name in s.node_inputs
              if node == settings.TRAIN_NODE and s.engine_class is TrainConfig}
    assert widgets - hashed == digest.PRESENTATION_INPUTS
    assert not hashed & digest.PRESENTATION_INPUTS


# ---- the base model and the code -----------------------------------------------------------------------------

def test_a_model_fingerprint_sees_values_dtypes_shapes_and_names():
    unet = make_unet()
    named = dict(unet.state_dict())
    ref = digest.tensors_fingerprint(named.items())
    assert digest.tensors_fingerprint({k: v.clone() for k, v in named.items()}.items()) == ref
    assert digest.tensors_fingerprint(reversed(list(named.items()))) == ref  # order does not matter
    key = next(k for k, v in named.items() if v.numel() > 4 * digest.SAMPLES_PER_TENSOR)
    bumped = named[key].clone()
    bumped.view(-1)[-1] += 1e-3  # the last element is always sampled
    assert digest.tensors_fingerprint({**named, key: bumped}.items()) != ref
    assert digest.tensors_fingerprint({**named, key: named[key].half()}.items()) != ref
    assert digest.tensors_fingerprint({**named, key: named[key].reshape(-1)}.items()) != ref
    assert digest.tensors_fingerprint({**{k: v for k, v in named.items() if k != key}, key + "x": named[key]}.items()) != ref
    # the sample is strided: small tensors are hashed whole, large ones at SAMPLES_PER_TENSOR points
    small = torch.arange(10.0)
    assert digest.tensors_fingerprint([("s", small)]) != digest.tensors_fingerprint([("s", small + (small == 5))])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.bool, torch.int64])
def test_a_fingerprint_takes_any_dtype(dtype):
    t = (torch.arange(5000) % 7).to(dtype)
    assert digest.tensors_fingerprint([("t", t), ("empty", torch.zeros(0)), ("scalar", torch.tensor(1.0))])


def test_the_base_and_the_code_are_part_of_the_run_digest():
    _, start = fresh_state()
    ref = run_digest(start)
    assert run_digest(start, base={"unet": "e" * 64}) != ref
    assert run_digest(start, code="other host code") != ref
    assert run_digest(start) == ref


def test_parts_say_when_only_the_code_differs():
    _, start = fresh_state()
    args = dict(start=start, dataset=make_dataset(), config=TrainConfig(steps=5), base={"unet": "f"}, code="host")
    parts = digest.run_digest_parts(**args)
    assert digest.digest_of_parts(parts) == digest.run_digest(**args)
    assert digest.same_but_code(parts, {**parts, "host_sources": "older"})
    assert digest.same_but_code(parts, {**parts, "training_code_version": 0})
    assert not digest.same_but_code(parts, parts)  # the same run: a match, not "another version"
    assert not digest.same_but_code(parts, {**parts, "host_sources": "older", "config": "other"})


def test_source_digest_sees_every_byte(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    ref = digest.source_digest([a, b])
    a.write_text("x = 1 \n")
    assert digest.source_digest([a, b]) != ref
    assert all(p.is_file() for p in digest.ENGINE_SOURCES), digest.ENGINE_SOURCES


STABLE = """
import sys
sys.path[:0] = [{root!r}, {unit!r}]
import torch
from lora_core import AdapterConfig, AdapterSet, TrainConfig, TrainState, digest
from tiny_models import make_dataset, make_unet
unet = make_unet()
state = TrainState.from_adapters(AdapterSet.create({{"unet": unet}}, AdapterConfig(rank=4, alpha=4), seed=0), seed=0)
base = {{"unet": digest.tensors_fingerprint(unet.state_dict().items())}}
print(digest.run_digest(start=state, dataset=make_dataset(), config=TrainConfig(steps=5), base=base, code="host"))
"""


def test_the_digest_is_the_same_in_another_process():
    unet, state = fresh_state()
    here = digest.run_digest(start=state, dataset=make_dataset(), config=TrainConfig(steps=5),
                             base={"unet": digest.tensors_fingerprint(unet.state_dict().items())}, code="host")
    script = STABLE.format(root=str(ROOT), unit=str(ROOT / "tests" / "unit"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == here
    assert len(here) == 64


# ---- files, previews, resume ---------------------------------------------------------------------------------

def test_plain_metadata_is_written_as_given(trained, tmp_path):
    path = trained.save(tmp_path / "c.kiln.safetensors", extra_metadata={"kiln_name": "n"},
                        plain_metadata={"kiln_digest": "ab" * 32, "kiln_step": "3"})
    meta = checkpoint_metadata(path)
    assert meta["kiln_digest"] == "ab" * 32 and meta["kiln_step"] == "3" and meta["kiln_name"] == "n"
    assert checkpoint_metadata(tmp_path / "missing.kiln.safetensors") == {}


@pytest.mark.parametrize(("start", "end", "every", "expected"),
                         [(0, 6, 3, [3, 6]), (4, 10, 3, [6, 9]), (0, 5, 0, []), (6, 6, 3, []), (0, 2, 5, [])])
def test_preview_steps_are_those_the_trainer_renders(start, end, every, expected):
    assert digest.preview_steps(start, end, every) == expected


def test_a_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """What Train Steps does on resume: the start state with the checkpoint's training, the remaining steps, the
    same settings otherwise (schedule_steps 0: the schedule still ends at start + steps)."""
    cfg = TrainConfig(steps=10, learning_rate=2e-3, scheduler="cosine", warmup_steps=2, batch_size=2,
                      min_snr_gamma=5.0, noise_offset=0.05)
    data = make_dataset(n=5, sizes=((8, 8), (8, 12)))
    unet, start = fresh_state(seed=3)
    trainer = Trainer(TinyDiffusion(unet), {"unet": unet})
    straight = trainer.run(start, data, cfg).state
    saved = []

    class SaveEverySixThenStop(TrainCallback):  # as save_every=6 and a kill right after the checkpoint would leave it
        def on_checkpoint(self, state):
            saved.append(state.save(tmp_path / "ckpt.kiln.safetensors"))

        def should_stop(self):
            return bool(saved)

    stopped = trainer.run(start, data, cfg, [SaveEverySixThenStop()], save_every=6)
    assert stopped.stopped_early and stopped.state.step == 6
    begin = start.with_training_of(TrainState.load(saved[0]))
    resumed = trainer.run(begin, data, dataclasses.replace(cfg, steps=10 - begin.step)).state
    assert resumed.step == straight.step == 10
    assert [h[1:] for h in resumed.history] == [h[1:] for h in straight.history]
    for k in straight.weights:
        assert torch.equal(straight.weights[k], resumed.weights[k]), k
    assert digest.state_digest(resumed) == digest.state_digest(straight)
