"""The settings table (lora_core/settings.py): complete, consistent, and the config <-> graph mapping built on it."""

from __future__ import annotations

import ast
import json
from dataclasses import fields
from pathlib import Path

import pytest

from lora_core import AdapterConfig, TrainConfig, settings
from lora_core.data import DatasetConfig
from lora_core.runconfig import RunConfig, config_from_graph, training_graph
from lora_core.settings import SETTINGS, Setting

REPO = Path(__file__).resolve().parents[2]
NODES_DIR = REPO / "nodes"
WIDGETS = {"Int", "Float", "String", "Boolean", "Combo"}  # io.<kind>.Input: a value, not a socket
# engine fields no node exposes (engine defaults); a new field must be added to the table or to this list
ENGINE_ONLY = {
    AdapterConfig: {"conv_alpha", "use_rslora"},
    TrainConfig: {"weight_decay", "betas", "num_cycles", "loss", "huber_delta", "logit_mean",
                  "logit_std", "min_timestep", "max_timestep"},
    DatasetConfig: {"min_bucket", "max_bucket", "bucket_step", "max_image_pixels", "max_clip_seconds"},
}
# config keys that have no node input: kiln.py uses them around the graph
NOT_IN_GRAPH = {"output_dir", "epochs", "resume_from_checkpoint"}
SPLIT_MODEL = {"clip_l", "t5xxl", "ae", "fp8_base", "text_encoder_type"}  # a checkpoint graph has none: test_flux_config_... has them


def node_schemas() -> dict[str, dict[str, object]]:
    """node_id -> {"widgets": [input names], "execute": [parameter names]}, read from the nodes' source."""
    found: dict[str, dict[str, object]] = {}
    for path in sorted(NODES_DIR.glob("*.py")):
        for cls in (n for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.ClassDef)):
            node_id = next((kw.value.value for call in ast.walk(cls) if isinstance(call, ast.Call)
                            for kw in call.keywords if kw.arg == "node_id" and isinstance(kw.value, ast.Constant)),
                           None)
            if node_id not in settings.NODES:
                continue
            widgets = [call.args[0].value for call in ast.walk(cls)
                       if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                       and call.func.attr == "Input" and isinstance(call.func.value, ast.Attribute)
                       and call.func.value.attr in WIDGETS and call.args and isinstance(call.args[0], ast.Constant)]
            execute = next(f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "execute")
            found[node_id] = {"widgets": widgets, "execute": [a.arg for a in execute.args.args[1:]]}
    return found


SCHEMAS = node_schemas()


def test_the_four_kiln_nodes_are_found_in_the_source():
    assert set(SCHEMAS) == {"KilnLoadDataset", "KilnInjectLoRA", "KilnTrainSteps", "KilnSaveLoRA"}
    assert "learning_rate" in SCHEMAS["KilnTrainSteps"]["widgets"]


def test_every_config_key_has_exactly_one_row():
    assert sorted(settings.BY_KEY) == sorted(RunConfig.keys())


@pytest.mark.parametrize("node", sorted(SCHEMAS))
def test_every_value_input_of_a_node_has_a_row_and_every_row_names_a_real_input(node):
    rows = {name for s in SETTINGS for n, name in s.node_inputs if n == node}
    widgets = set(SCHEMAS[node]["widgets"])
    assert widgets - rows == set(), f"{node} inputs without a row in lora_core/settings.py"
    assert rows - widgets == set(), f"rows naming inputs {node} does not have"


@pytest.mark.parametrize("engine", [AdapterConfig, TrainConfig, DatasetConfig])
def test_every_engine_field_has_a_row_or_is_engine_only(engine):
    mapped = {s.engine_field for s in SETTINGS if s.engine_class is engine}
    names = {f.name for f in fields(engine)}
    assert names - mapped - ENGINE_ONLY[engine] == set(), f"{engine.__name__} fields without a row"
    assert mapped & ENGINE_ONLY[engine] == set()


def test_a_node_input_that_sets_an_engine_field_without_a_row_is_caught():
    """The check above is real: an input the table does not know shows up."""
    with_extra = [*SCHEMAS["KilnTrainSteps"]["widgets"], "weight_decay"]
    rows = {name for s in SETTINGS for n, name in s.node_inputs if n == "KilnTrainSteps"}
    assert set(with_extra) - rows == {"weight_decay"}


def test_train_steps_builds_its_train_config_from_its_inputs_through_the_table():
    params = SCHEMAS["KilnTrainSteps"]["execute"]
    values = {"steps": 7, "learning_rate": 2e-4, "optimizer": "lion", "scheduler": "cosine", "warmup_steps": 5,
              "schedule_steps": 40, "batch_size": 2, "grad_accum": 3, "precision": "bf16",
              "gradient_checkpointing": True, "min_snr_gamma": 1.5, "noise_offset": 0.05, "save_every": 9,
              "preview_every": 10, "preview_prompt": "p", "preview_seed": 1, "preview_size": 256, "preview_steps": 12,
              "text_encoder_lr": 5e-5, "max_grad_norm": 2.5, "timestep_sampling": "logit_normal", "flow_shift": 3.5,
              "loss_weighting": "cosmap", "guidance": 3.5, "expert": "high_noise"}
    inputs = {name: values.get(name, object()) for name in params}  # what execute's locals() holds
    config = TrainConfig(**settings.engine_kwargs_from_node(TrainConfig, settings.TRAIN_NODE, inputs))
    assert config == TrainConfig(steps=7, learning_rate=2e-4, optimizer="lion", scheduler="cosine", warmup_steps=5,
                                 schedule_steps=40, batch_size=2, grad_accum=3, precision="bf16",
                                 gradient_checkpointing=True, min_snr_gamma=1.5, noise_offset=0.05,
                                 text_encoder_lr=5e-5, max_grad_norm=2.5, timestep_sampling="logit_normal",
                                 flow_shift=3.5, loss_weighting="cosmap", guidance=3.5, expert="high_noise")
    del inputs["grad_accum"]
    with pytest.raises(ValueError, match=r"KilnTrainSteps input 'grad_accum' is missing \(it sets TrainConfig.grad_accum\)"):
        settings.engine_kwargs_from_node(TrainConfig, settings.TRAIN_NODE, inputs)


def full_config(folder: Path) -> RunConfig:
    """A config with a distinct, non-default value for every key that travels through the graph."""
    cfg = RunConfig.from_mapping({
        "base_model": "sd15.safetensors", "train_data_dir": str(folder), "output_name": "cat",
        "caption_extension": ".caption", "trigger_word": "sks", "repeats": 3, "resolution": 768, "enable_bucket": False,
        "lora_rank": 8, "lora_alpha": 4, "targets": "attn", "algorithm": "locon", "conv_rank": 6, "dropout": 0.1,
        "train_text_encoder": True, "text_encoder_lr": 5e-5, "batch_size": 2, "gradient_accumulation_steps": 3,
        "max_steps": 7, "learning_rate": 2e-4, "lr_scheduler": "cosine", "lr_warmup_steps": 5, "optimizer": "lion",
        "mixed_precision": "bf16", "gradient_checkpointing": True, "min_snr_gamma": 1.5, "noise_offset": 0.05,
        "max_grad_norm": 2.5, "save_steps": 9, "save_precision": "bf16", "seed": 42, "sample_prompts": ["a cat"],
        "sample_every": 10, "sample_size": 256, "sample_steps": 12, "sample_cfg": 3.5, "timestep_sampling": "logit_normal",
        "discrete_flow_shift": 3.5, "weighting_scheme": "cosmap", "keep_checkpoints": 2, "guidance_scale": 3.5,
        "expert": "low_noise", "target_frames": 49, "frame_extraction": "uniform", "frame_sample": 3, "fps": 24.0,
    })
    defaults = RunConfig.from_mapping({"base_model": "x", "train_data_dir": "y", "max_steps": 1})
    same = {k for k in RunConfig.keys() if getattr(cfg, k) == getattr(defaults, k)}
    assert same == NOT_IN_GRAPH | SPLIT_MODEL, "give every new config key a non-default value here"
    return cfg


def test_graph_is_the_hand_wired_graph(tmp_path):
    folder = tmp_path.resolve() / "cat"
    graph = training_graph(full_config(folder), 7, None, "sd15.safetensors")
    assert {k: v["class_type"] for k, v in graph.items()} == {
        "1": "CheckpointLoaderSimple", "2": "KilnLoadDataset", "3": "KilnInjectLoRA", "4": "KilnTrainSteps",
        "5": "KilnSaveLoRA"}
    assert {k: v["inputs"] for k, v in graph.items()} == {
        "1": {"ckpt_name": "sd15.safetensors"},
        "2": {"folder": str(folder), "vae": ["1", 2], "clip": ["1", 1], "resolution": 768, "bucketing": False,
              "trigger_word": "sks", "repeats": 3, "caption_extension": ".caption", "on_error": "error",
              "frames": 49, "frame_sampling": "uniform", "windows": 3, "fps": 24.0},
        "3": {"model": ["1", 0], "name": "cat", "rank": 8, "alpha": 4.0, "targets": "attn", "algorithm": "locon",
              "conv_rank": 6, "dropout": 0.1, "init_lora": "none", "seed": 42, "train_text_encoder": True,
              "clip": ["1", 1]},
        "4": {"state": ["3", 0], "dataset": ["2", 0], "steps": 7, "learning_rate": 2e-4, "optimizer": "lion",
              "scheduler": "cosine", "warmup_steps": 5, "schedule_steps": 0, "batch_size": 2, "grad_accum": 3,
              "precision": "bf16", "gradient_checkpointing": True, "min_snr_gamma": 1.5, "noise_offset": 0.05,
              "save_every": 9, "preview_every": 10, "preview_prompt": "a cat", "preview_seed": 42, "preview_size": 256,
              "preview_steps": 12, "text_encoder_lr": 5e-5, "max_grad_norm": 2.5, "timestep_sampling": "logit_normal",
              "flow_shift": 3.5, "loss_weighting": "cosmap", "keep_checkpoints": 2, "guidance": 3.5, "preview_cfg": 3.5,
              "expert": "low_noise"},
        "5": {"state": ["4", 0], "filename": "cat", "dtype": "bf16", "save_checkpoint": True},
    }


def test_config_to_graph_to_config_is_the_same_config(tmp_path):
    cfg = full_config(tmp_path.resolve() / "cat")
    assert config_from_graph(training_graph(cfg, cfg.max_steps, None, cfg.base_model)) == cfg
    minimal = RunConfig.from_mapping({"base_model": "m.ckpt", "train_data_dir": str(tmp_path.resolve()), "max_steps": 3})
    assert config_from_graph(training_graph(minimal, 3, None, "m.ckpt")) == minimal


def test_flux_config_in_separate_files_is_the_example_graph_and_comes_back(tmp_path):
    """kohya's FLUX options (pretrained_model_name_or_path + clip_l + t5xxl + ae, fp8_base) become the stock loaders
    of example_workflows/api/train_flux_lora.json, wired the same way, and the graph reads back as the config."""
    cfg = full_config(tmp_path.resolve() / "cat").replace(
        base_model="flux1-dev.safetensors", clip_l="clip_l.safetensors", t5xxl="t5xxl_fp16.safetensors",
        ae="ae.safetensors", fp8_base=True, train_text_encoder=False)
    graph = training_graph(cfg, 7, None, cfg.base_model, {"clip_l": "clip_l.safetensors",
                                                          "t5xxl": "t5xxl_fp16.safetensors", "ae": "ae.safetensors"})
    assert {k: v["class_type"] for k, v in graph.items()} == {
        "1": "UNETLoader", "6": "DualCLIPLoader", "7": "VAELoader", "2": "KilnLoadDataset", "3": "KilnInjectLoRA",
        "4": "KilnTrainSteps", "5": "KilnSaveLoRA"}
    assert graph["1"]["inputs"] == {"unet_name": "flux1-dev.safetensors", "weight_dtype": "fp8_e4m3fn"}
    assert graph["6"]["inputs"] == {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                    "type": "flux"}
    assert graph["7"]["inputs"] == {"vae_name": "ae.safetensors"}
    assert graph["2"]["inputs"]["vae"] == ["7", 0] and graph["2"]["inputs"]["clip"] == ["6", 0]
    assert graph["3"]["inputs"]["model"] == ["1", 0] and "clip" not in graph["3"]["inputs"]
    example = json.loads((REPO / "example_workflows" / "api" / "train_flux_lora.json").read_text())
    for node in ("1", "7"):
        assert graph[node]["class_type"] == example[node if node == "1" else "8"]["class_type"]
    assert set(graph["6"]["inputs"]) <= set(example["7"]["inputs"])
    assert config_from_graph(graph) == cfg
    assert config_from_graph(training_graph(cfg.replace(fp8_base=False), 7, None, cfg.base_model)).fp8_base is False
    with pytest.raises(ValueError, match=r"clip_l, t5xxl given without ae: a model in separate files"):
        cfg.replace(ae="")
    with pytest.raises(ValueError, match=r"fp8_base applies to a diffusion model in separate files"):
        full_config(tmp_path.resolve() / "cat").replace(fp8_base=True)


def test_chroma_config_without_clip_l_is_the_chroma_example_graph_and_comes_back(tmp_path):
    """kohya's Chroma options (the FLUX ones without clip_l) become example_workflows/api/train_chroma_lora.json's
    stock loaders: CLIPLoader type chroma with the T5 in DualCLIPLoader's place, and the graph reads back as the
    config; a partial set is refused naming what is missing."""
    cfg = full_config(tmp_path.resolve() / "cat").replace(
        base_model="Chroma1-HD.safetensors", t5xxl="t5xxl_fp16.safetensors", ae="ae.safetensors", fp8_base=True,
        train_text_encoder=False)
    assert cfg.split_files == ("t5xxl", "ae")
    graph = training_graph(cfg, 7, None, cfg.base_model, {"t5xxl": "t5xxl_fp16.safetensors", "ae": "ae.safetensors"})
    example = json.loads((REPO / "example_workflows" / "api" / "train_chroma_lora.json").read_text())
    assert graph["6"] == {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5xxl_fp16.safetensors",
                                                                  "type": "chroma"}}
    assert example["7"]["class_type"] == "CLIPLoader" and set(graph["6"]["inputs"]) <= set(example["7"]["inputs"])
    assert example["7"]["inputs"]["type"] == "chroma"
    assert graph["1"]["inputs"] == {"unet_name": "Chroma1-HD.safetensors", "weight_dtype": "fp8_e4m3fn"}
    assert graph["2"]["inputs"]["clip"] == ["6", 0] and graph["2"]["inputs"]["vae"] == ["7", 0]
    assert config_from_graph(graph) == cfg
    with pytest.raises(ValueError, match=r"t5xxl given without ae: a model in separate files needs t5xxl"):
        cfg.replace(ae="")
    with pytest.raises(ValueError, match=r"clip_l, ae given without t5xxl"):
        cfg.replace(t5xxl="", clip_l="clip_l.safetensors")


def test_a_checkpoint_graph_with_its_own_vae_or_clip_loader_is_still_a_checkpoint_config(tmp_path):
    """A separate VAELoader (a better VAE) or CLIPLoader beside Load Checkpoint does not make the graph a model in
    separate files: the export is the checkpoint config (and valid)."""
    cfg = full_config(tmp_path.resolve() / "cat")
    graph = training_graph(cfg, cfg.max_steps, None, cfg.base_model)
    graph["90"] = {"class_type": "VAELoader", "inputs": {"vae_name": "vae-ft-mse-840000.safetensors"}}
    graph["91"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5xxl_fp16.safetensors", "type": "sd3"}}
    assert config_from_graph(graph) == cfg and cfg.split_files == ()
    graph["2"]["inputs"]["vae"] = ["90", 0]  # wired in: the config would silently train with the checkpoint's VAE
    with pytest.raises(ValueError, match=r"Load Dataset's VAE comes from a VAELoader \('vae-ft-mse-840000.safetensors'"
                                         r"\) beside Load Checkpoint.*kiln.py run WORKFLOW"):
        config_from_graph(graph)


def test_a_text_encoder_loader_of_another_type_is_not_exported_as_flux_or_chroma(tmp_path):
    cfg = full_config(tmp_path.resolve() / "cat").replace(
        base_model="Chroma1-HD.safetensors", t5xxl="t5xxl_fp16.safetensors", ae="ae.safetensors",
        train_text_encoder=False)
    graph = training_graph(cfg, 7, None, cfg.base_model, {"t5xxl": "t5xxl_fp16.safetensors", "ae": "ae.safetensors"})
    assert config_from_graph(graph) == cfg
    graph["6"]["inputs"]["type"] = "sd3"
    with pytest.raises(ValueError, match=r"Load Dataset's CLIP comes from a CLIPLoader of type 'sd3'.*kiln.py run"):
        config_from_graph(graph)


def test_a_wan_config_in_musubi_s_spelling_is_the_wan_graph_and_comes_back(tmp_path):
    """musubi-tuner's Wan options (--dit, --t5, --vae; target_frames, frame_extraction, frame_sample) as a config: the
    UNETLoader / CLIPLoader type wan / VAELoader graph with the clip settings on Load Dataset, and back."""
    cfg = RunConfig.from_mapping({
        "base_model": "wan2.1_t2v_1.3B_bf16.safetensors", "t5": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        "vae": "wan_2.1_vae.safetensors", "text_encoder_type": "wan", "train_data_dir": str(tmp_path.resolve()),
        "max_steps": 10, "resolution": 640, "target_frames": 33, "frame_extraction": "uniform", "frame_sample": 2,
        "expert": "high_noise"})
    names = {"t5xxl": cfg.t5xxl, "ae": cfg.ae}
    graph = training_graph(cfg, 10, None, cfg.base_model, names)
    assert graph["6"] == {"class_type": "CLIPLoader", "inputs": {"clip_name": cfg.t5xxl, "type": "wan"}}
    assert graph["1"]["class_type"] == "UNETLoader" and graph["7"]["inputs"]["vae_name"] == cfg.ae
    assert {k: graph["2"]["inputs"][k] for k in ("frames", "frame_sampling", "windows", "fps")} == {
        "frames": 33, "frame_sampling": "uniform", "windows": 2, "fps": 0.0}
    assert graph["4"]["inputs"]["expert"] == "high_noise"
    assert config_from_graph(graph) == cfg


def test_graph_paths_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig.from_mapping({"base_model": "/models/m.safetensors", "train_data_dir": "data",
                                  "sample_prompts": ["a", "b"], "sample_every": 5, "max_steps": 100})
    graph = training_graph(cfg, 40, "cat/checkpoints/cat_step000060.kiln.safetensors", "m.safetensors")
    assert graph["1"]["inputs"] == {"ckpt_name": "m.safetensors"}  # the loader's name, not the config's path
    assert graph["2"]["inputs"]["folder"] == str(tmp_path.resolve() / "data")
    assert graph["3"] == {"class_type": "KilnLoadCheckpoint", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "checkpoint": "cat/checkpoints/cat_step000060.kiln.safetensors"}}
    assert graph["4"]["inputs"]["steps"] == 40 and graph["4"]["inputs"]["preview_prompt"] == "a"


def test_chained_train_steps_add_up_and_missing_inputs_take_the_defaults(tmp_path):
    cfg = full_config(tmp_path.resolve() / "cat")
    graph = training_graph(cfg, 7, None, cfg.base_model)
    graph["6"] = {"class_type": "KilnTrainSteps", "inputs": {**graph["4"]["inputs"], "steps": 5, "learning_rate": 1.0}}
    for name in ("text_encoder_lr", "max_grad_norm"):  # optional inputs, absent in older workflows
        del graph["4"]["inputs"][name]
    graph["4"]["inputs"]["preview_prompt"] = ""
    back = config_from_graph(graph)
    assert back.max_steps == 12 and back.learning_rate == 2e-4  # summed; the rest from the first node
    assert (back.text_encoder_lr, back.max_grad_norm) == (0.0, 1.0)
    assert back.sample_prompts == () and back.sample_every == 0  # previews without a prompt: no config prompt
    del graph["3"]  # no Inject LoRA: the adapter settings are the defaults, the name too
    assert config_from_graph(graph).lora_rank == 16 and config_from_graph(graph).output_name == "my_lora"
    with pytest.raises(ValueError, match=r"the workflow has no KilnLoadDataset node to export"):
        config_from_graph({k: v for k, v in graph.items() if k != "2"})


def test_engine_configs_come_from_the_table():
    cfg = full_config(Path("/data/cat"))
    assert cfg.adapter_config() == AdapterConfig(rank=8, alpha=4.0, unet_targets="attn", algorithm="locon",
                                                 conv_rank=6, dropout=0.1, text_targets="text")
    assert RunConfig.from_mapping({**cfg.to_dict(), "conv_rank": 0, "train_text_encoder": False}).adapter_config() \
        == AdapterConfig(rank=8, alpha=4.0, unet_targets="attn", algorithm="locon", dropout=0.1)
    assert cfg.train_config(3) == TrainConfig(
        steps=3, learning_rate=2e-4, text_encoder_lr=5e-5, optimizer="lion", scheduler="cosine", warmup_steps=5,
        batch_size=2, grad_accum=3, precision="bf16", gradient_checkpointing=True, min_snr_gamma=1.5,
        noise_offset=0.05, max_grad_norm=2.5, timestep_sampling="logit_normal", flow_shift=3.5, loss_weighting="cosmap",
        guidance=3.5, expert="low_noise")
    kwargs = settings.engine_kwargs(DatasetConfig, cfg.to_dict())
    assert kwargs == {"folder": "/data/cat", "caption_extension": ".caption", "trigger_word": "sks",
                      "default_repeats": 3, "resolution": 768, "bucketing": False, "frames": 49,
                      "frame_sampling": "uniform", "windows": 3, "fps": 24.0}


@pytest.mark.parametrize(("key", "value", "message"), [
    ("gradient_accumulation_steps", 0, r"gradient_accumulation_steps=0 is out of range"),
    ("lr_warmup_steps", -1, r"lr_warmup_steps=-1 is out of range"),
    ("lora_alpha", 0, r"lora_alpha=0.0 is out of range"),
])
def test_engine_errors_name_the_config_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_mapping({"base_model": "m", "train_data_dir": "d", "max_steps": 1, key: value})


def test_kohya_aliases_and_the_set_names():
    assert settings.ALIASES == {
        "pretrained_model_name_or_path": "base_model", "network_dim": "lora_rank", "network_alpha": "lora_alpha",
        "train_batch_size": "batch_size", "max_train_steps": "max_steps", "max_train_epochs": "epochs",
        "save_every_n_steps": "save_steps", "lr_warmup": "lr_warmup_steps", "optimizer_type": "optimizer",
        "t5": "t5xxl", "vae": "ae", "frames": "target_frames", "dit": "base_model"}
    assert settings.SET_NAMES == {
        "dataset": ("KilnLoadDataset", "folder"), "folder": ("KilnLoadDataset", "folder"),
        "steps": ("KilnTrainSteps", "steps"), "lr": ("KilnTrainSteps", "learning_rate"),
        "learning_rate": ("KilnTrainSteps", "learning_rate"), "base_model": ("CheckpointLoaderSimple", "ckpt_name"),
        "checkpoint": ("CheckpointLoaderSimple", "ckpt_name"), "name": ("KilnInjectLoRA", "name"),
        "rank": ("KilnInjectLoRA", "rank"), "resolution": ("KilnLoadDataset", "resolution")}


def test_metadata_is_no_longer_a_config_key():
    with pytest.raises(ValueError, match=r"unknown config key 'metadata'"):
        RunConfig.from_mapping({"base_model": "m", "train_data_dir": "d", "max_steps": 1, "metadata": "metadata.csv"})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"key": "x", "inputs": ("KilnNope.a",)}, r"input 'KilnNope.a' must be Node.input"),
    ({"key": "x", "engine": "TrainConfig.nope"}, r"engine='TrainConfig.nope' is not a field"),
    ({"key": None, "inputs": ()}, r"a graph-only setting needs inputs"),
    ({"key": "x", "inputs": ("KilnTrainSteps.a",), "fixed": 1}, r"only graph-only settings .* have a fixed value"),
    ({"key": "x", "set_names": ("y",)}, r"set_names and summed need a node input"),
    ({"key": "bad key"}, r"setting key='bad key' must be an identifier"),
])
def test_a_bad_row_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Setting(**kwargs)


def test_a_table_with_a_doubled_key_or_input_is_refused():
    with pytest.raises(ValueError, match=r"config key 'network_dim' is claimed by 'lora_rank' and 'rank2'"):
        settings._check_table((*SETTINGS, Setting("rank2", aliases=("network_dim",))))
    with pytest.raises(ValueError, match=r"node input KilnInjectLoRA.rank has more than one row"):
        settings._check_table((*SETTINGS, Setting("rank2", ("KilnInjectLoRA.rank",))))


@pytest.mark.parametrize("name, clip_type", [("train_zimage_lora", "lumina2"), ("train_flux2_klein_lora", "flux2"),
                                             ("train_qwen_image_lora", "qwen_image")])
def test_the_2026_example_graphs_are_not_exported_as_flux_or_chroma_configs(name, clip_type):
    """Their CLIPLoader types are none a config can rebuild: kiln.py export says to run the graph itself (README)."""
    graph = json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text())
    with pytest.raises(ValueError, match=rf"CLIPLoader of type '{clip_type}'.*kiln.py run WORKFLOW"):
        config_from_graph(graph)
