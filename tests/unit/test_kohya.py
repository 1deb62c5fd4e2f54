import json

import pytest
import torch
from safetensors import safe_open

from lora_core import AdapterConfig, AdapterSet, TrainState
from lora_core.formats.kohya import KohyaNaming, build_metadata, export_tensors, load_lora_as_state, save_lora
from tiny_models import make_unet

IDENTITY = KohyaNaming(path_maps={})


def _trained_state(cfg=AdapterConfig(rank=4, alpha=2, unet_targets="attn")):
    unet = make_unet()
    adapters = AdapterSet.create({"unet": unet}, cfg, seed=0)
    with torch.no_grad():
        for _, m in adapters.items():
            m.lora_up.weight.normal_()
    return unet, TrainState.from_adapters(adapters, info={"resolution": (64, 64), "num_train_images": 3})


def test_golden_sd15_key_names():
    _, state = _trained_state()
    keys = sorted(export_tensors(state, IDENTITY))
    block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"
    for attn in ("attn1", "attn2"):
        for layer in ("to_q", "to_k", "to_v", "to_out_0"):
            for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
                assert f"{block}_{attn}_{layer}.{suffix}" in keys
    assert len(keys) == 16 * 3
    assert all(k.startswith(("lora_unet_down_blocks_0_", "lora_unet_up_blocks_0_")) for k in keys)


def test_path_map_renames_ldm_paths_and_refuses_unmapped_layers():
    naming = KohyaNaming(path_maps={"unet": {"input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in"}})
    assert naming.kohya_name("unet.input_blocks.1.1.proj_in") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    with pytest.raises(ValueError, match="has no name in the kohya format"):
        naming.kohya_name("unet.input_blocks.9.0.foo")
    te = KohyaNaming(path_maps={})
    assert te.kohya_name("te.text_model.encoder.layers.3.self_attn.q_proj") == (
        "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
    )


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_export_import_round_trip(tmp_path, dtype):
    unet, state = _trained_state(AdapterConfig(rank=4, alpha=2, algorithm="locon", conv_rank=2, conv_alpha=1))
    path = save_lora(state, tmp_path / "x.safetensors", IDENTITY, dtype=dtype)
    back = load_lora_as_state(path, {"unet": unet}, IDENTITY, AdapterConfig())
    assert {s.name for s in back.specs} == {s.name for s in state.specs}
    specs = {s.name: s for s in state.specs}
    for s in back.specs:
        assert (s.rank, s.kind, s.kernel_size) == (specs[s.name].rank, specs[s.name].kind, specs[s.name].kernel_size)
    tol = {"fp32": 1e-6, "fp16": 1e-3, "bf16": 1e-2}[dtype]
    for s in back.specs:  # the same update: down equal, (alpha / rank) * up equal (alphas are unified on export)
        orig = specs[s.name]
        down, up = f"{s.name}.lora_down.weight", f"{s.name}.lora_up.weight"
        assert torch.allclose(back.weights[down], state.weights[down], atol=tol, rtol=tol), down
        assert torch.allclose(back.weights[up] * (s.alpha / s.rank), state.weights[up] * (orig.alpha / orig.rank),
                              atol=tol, rtol=tol), up
    # the re-imported state gives the model the same output
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 7, 16)
    outs = []
    for st in (state, back):
        with st.build_adapters().attach({"unet": unet}):
            outs.append(unet(x, t, ctx))
    assert torch.allclose(outs[0], outs[1], atol=10 * tol + 1e-6)


def test_metadata_has_the_kohya_and_modelspec_keys(tmp_path):
    _, state = _trained_state()
    state = state.replace(step=42, info={**state.info, "tag_frequency": {"1_cat": {"cat": 3}}, "trigger_word": "sks"})
    meta = build_metadata(
        state, title="my_lora", train={"learning_rate": 1e-4, "optimizer": "adamw", "scheduler": "cosine"},
        extra={"workflow": {"nodes": []}},
    )
    path = save_lora(state, tmp_path / "m.safetensors", IDENTITY, metadata=meta)
    with safe_open(str(path), "pt") as f:
        got = f.metadata()
    assert got["ss_network_dim"] == "4" and got["ss_network_alpha"] == "2"
    assert got["ss_steps"] == "42" and got["ss_learning_rate"] == "0.0001"
    assert got["ss_base_model_version"] == "sd_v1" and got["ss_resolution"] == "(64, 64)"
    assert json.loads(got["ss_tag_frequency"]) == {"1_cat": {"cat": 3}}
    assert got["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert got["modelspec.trigger_phrase"] == "sks"
    assert json.loads(got["workflow"]) == {"nodes": []}
    assert all(isinstance(v, str) for v in got.values())


def test_flow_metadata_records_the_objective_and_flux_variant_as_kohyas_flux_trainer():
    _, state = _trained_state()
    train = {"timestep_sampling": "logit_normal", "flow_shift": 0.0, "loss_weighting": "none", "guidance": 1.0}
    meta = build_metadata(state, title="f", base_model_version="flux1", prediction_type="flow", train=train,
                          model_spec="flux1-schnell", guidance=False, model_flow_shift=1.0)
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-schnell/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["ss_timestep_sampling"] == "logit_normal" and meta["ss_discrete_flow_shift"] == "1.0"  # the model's
    assert "ss_guidance_scale" not in meta and "modelspec.prediction_type" not in meta  # schnell takes no guidance
    dev = build_metadata(state, title="f", base_model_version="flux1", prediction_type="flow", train=train,
                         model_spec="flux1-dev", guidance=True)
    assert dev["modelspec.architecture"] == "flux-1-dev/lora" and dev["ss_guidance_scale"] == "1.0"
    assert "ss_discrete_flow_shift" not in dev  # FLUX.1-dev as loaded: the shift follows the image size
    fixed = build_metadata(state, title="f", prediction_type="flow", train={**train, "flow_shift": 3.5},
                           model_flow_shift=3.0)
    assert fixed["ss_discrete_flow_shift"] == "3.5"  # the run's own override
    sd15 = build_metadata(state, title="f", train=train)
    assert "ss_timestep_sampling" not in sd15 and sd15["modelspec.prediction_type"] == "epsilon"


def test_import_refuses_foreign_and_mismatched_files(tmp_path):
    unet, state = _trained_state()
    tensors = export_tensors(state, IDENTITY)
    from safetensors.torch import save_file

    bad = dict(tensors)
    bad["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    bad["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    save_file(bad, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="match no layer of this model, e.g. lora_unet_input_blocks_4_1_proj_in"):
        load_lora_as_state(tmp_path / "foreign.safetensors", {"unet": unet}, IDENTITY, AdapterConfig())

    wrong = dict(tensors)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    wrong[key] = torch.zeros(4, 31)
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match=rf"{key} has shape \(4, 31\).*needs \(4, 32\)"):
        load_lora_as_state(tmp_path / "wrong.safetensors", {"unet": unet}, IDENTITY, AdapterConfig())

    loha = {"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}
    save_file(loha, tmp_path / "loha.safetensors")
    with pytest.raises(ValueError, match="unsupported keys"):
        load_lora_as_state(tmp_path / "loha.safetensors", {"unet": unet}, IDENTITY, AdapterConfig())

    (tmp_path / "pickle.ckpt").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="only .safetensors files are loaded"):
        load_lora_as_state(tmp_path / "pickle.ckpt", {"unet": unet}, IDENTITY, AdapterConfig())


def test_atomic_save_keeps_the_previous_file_when_writing_fails(tmp_path, monkeypatch):
    from lora_core import fileio

    _, state = _trained_state()
    path = save_lora(state, tmp_path / "keep.safetensors", IDENTITY)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(fileio.SaveError, match="disk is full.*previous file there is intact"):
        save_lora(state.replace(step=9), path, IDENTITY)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


def test_mixed_alphas_are_exported_as_one_alpha_with_the_same_effect(tmp_path):
    unet, state = _trained_state(AdapterConfig(rank=4, alpha=2, algorithm="locon", conv_rank=2, conv_alpha=8))
    assert len({s.alpha for s in state.specs}) == 2
    tensors = export_tensors(state, IDENTITY, dtype="fp32")
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {2.0}  # the linear layers' alpha wins
    path = save_lora(state, tmp_path / "mixed.safetensors", IDENTITY, dtype="fp32")
    back = load_lora_as_state(path, {"unet": unet}, IDENTITY, AdapterConfig())
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 7, 16)
    outs = []
    for st in (state, back):
        with st.build_adapters().attach({"unet": unet}):
            outs.append(unet(x, t, ctx))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


@pytest.mark.parametrize(("cfg", "expected"), [
    (AdapterConfig(rank=4, alpha=2.0, unet_targets="attn"), None),  # no k x k conv trained
    (AdapterConfig(rank=4, alpha=2.0, unet_targets="all"), {"conv_dim": "4", "conv_alpha": "2.0"}),  # all, lora
    (AdapterConfig(rank=4, alpha=2.0, algorithm="locon", conv_rank=2, conv_alpha=1.0),
     {"conv_dim": "2", "conv_alpha": "1.0"}),
])
def test_network_args_say_whether_and_how_3x3_convs_were_trained(cfg, expected):
    """kohya-style readers learn from conv_dim that k x k convs carry adapters (and their rank): a LoRA whose `all`
    targets adapted them must say so even with algorithm lora."""
    _, state = _trained_state(cfg)
    assert any(s.kind == "conv" and s.kernel_size != (1, 1) for s in state.specs) == (expected is not None)
    args = build_metadata(state, title="t", train={"learning_rate": 1e-4}).get("ss_network_args")
    assert (json.loads(args) if args else None) == expected


@pytest.mark.parametrize(("te_lr", "recorded"), [(0.0, "0.0001"), (5e-5, "5e-05")])
def test_the_text_encoder_learning_rate_is_the_effective_one(te_lr, recorded):
    """The node's 0 means "the same as the UNet's"; the file says the rate that was used, which readers take as is."""
    _, state = _trained_state()
    meta = build_metadata(state, title="t", train={"learning_rate": 1e-4, "text_encoder_lr": te_lr})
    assert meta["ss_text_encoder_lr"] == recorded
