"""The training graph on a real ComfyUI server: train, watch, preview, cancel, save, load with stock nodes."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from comfy_harness import tiny_train_workflow

KSAMPLER = {"seed": 42, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}


def render_graph(prefix: str, model_link, clip_link, sampler: str = "KSampler", base_id: int = 100) -> dict:
    """Nodes that render one 64x64 image from a MODEL/CLIP link and save it under ``prefix``."""
    i = [str(base_id + k) for k in range(6)]
    if sampler == "KSampler":
        sampler_inputs = {**KSAMPLER}
    else:  # same math as KSampler, different node type (a different cache key)
        sampler_inputs = {"add_noise": "enable", "noise_seed": KSAMPLER["seed"], "steps": KSAMPLER["steps"],
                          "cfg": KSAMPLER["cfg"], "sampler_name": "euler", "scheduler": "normal", "start_at_step": 0,
                          "end_at_step": 10000, "return_with_leftover_noise": "disable"}
    return {
        i[0]: {"class_type": "CLIPTextEncode", "inputs": {"text": "a kilnshape circle", "clip": clip_link}},
        i[1]: {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip_link}},
        i[2]: {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        i[3]: {"class_type": sampler, "inputs": {**sampler_inputs, "model": model_link, "positive": [i[0], 0],
                                                 "negative": [i[1], 0], "latent_image": [i[2], 0]}},
        i[4]: {"class_type": "VAEDecode", "inputs": {"samples": [i[3], 0], "vae": ["1", 2]}},
        i[5]: {"class_type": "SaveImage", "inputs": {"images": [i[4], 0], "filename_prefix": prefix}},
    }


def checkpoint_loader() -> dict:
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}}}


def render_with_stock_lora(server, lora_name: str, base_id: int, strength_model: float = 1.0,
                           strength_clip: float = 1.0, without_id: int | None = None):
    """Render through ComfyUI's stock LoraLoader (and, with ``without_id``, without it) in one prompt.

    Returns the result and what the server logged meanwhile (where ComfyUI reports keys it could not load)."""
    log_before = len(server.log())
    graph = {**checkpoint_loader(),
             "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
                                                          "strength_model": strength_model,
                                                          "strength_clip": strength_clip}}}
    graph.update(render_graph(f"lora_{base_id}", ["2", 0], ["2", 1], base_id=base_id))
    if without_id is not None:
        graph.update(render_graph(f"base_{without_id}", ["1", 0], ["1", 1], base_id=without_id))
    result = server.run(graph)
    assert result.status == "success", result.error
    return result, server.log()[log_before:]


def saved_image(server, result, node_id: str) -> np.ndarray:
    info = result.history["outputs"][node_id]["images"][0]
    path = server.base / "output" / info["subfolder"] / info["filename"]
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def lora_file(server, name: str):
    return server.base / "models" / "loras" / f"{name}.safetensors"


@pytest.fixture(scope="module")
def trained(server):
    """One full run of the shipped example workflow (with previews and periodic checkpoints)."""
    wf = tiny_train_workflow("e2e", steps=12, save_every=6, preview_every=6)
    result = server.run(wf, timeout=600)
    assert result.status == "success", result.error
    return result


@pytest.mark.compat
def test_example_workflow_trains_and_saves_a_kohya_lora(server, trained):
    path = lora_file(server, "e2e")
    assert path.is_file()
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    bases = {k.rsplit(".", 2)[0] for k in keys if k.endswith(".weight")}
    assert all(k.startswith("lora_unet_") for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in bases
    assert "lora_unet_up_blocks_0_attentions_1_proj_out" in bases
    assert {k.rsplit(".", 1)[1] if k.endswith("alpha") else k.split(".", 1)[1] for k in keys} == {
        "lora_down.weight", "lora_up.weight", "alpha"}
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_steps"] == "12" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_optimizer"] == "adamw" and meta["ss_learning_rate"] == "0.001"
    assert json.loads(meta["ss_tag_frequency"])["1_shapes"]["a kilnshape circle"] == 4
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["prompt"])["4"]["class_type"] == "KilnTrainSteps"
    ckpts = sorted(p.name for p in (server.base / "output" / "lora_kiln" / "e2e" / "checkpoints").iterdir())
    assert ckpts == ["e2e_step000006.kiln.safetensors", "e2e_step000012.kiln.safetensors"]
    assert list((server.base / "output" / "lora_kiln" / "e2e" / "logs").glob("events.out.tfevents.*"))


@pytest.mark.compat
def test_progress_text_and_previews_arrive_while_training(server, trained):
    progress = [d for d in trained.of_type("progress") if d["node"] == "4" and d["max"] == 12]  # the training steps
    steps = [d["value"] for d in progress]  # every step (v0.3.64), or those ComfyUI sends (v0.33: >= 100 ms apart)
    assert steps[0] == 1 and steps == sorted(steps) and progress[-1] == {**progress[-1], "value": 12, "max": 12}
    live = [d for d in trained.of_type("kiln.train.progress") if d["node"] == "4"]
    assert live and live[-1]["step"] == 12 and live[-1]["loss"] is not None and "eta_seconds" in live[-1]
    texts = [d["text"] for d in trained.of_type("progress_text") if d["node"] == "4"]
    assert any("loss" in t and "ETA" in t for t in texts)
    kinds = [k for k, _ in trained.messages]
    done = max(i for i, (k, d) in enumerate(trained.messages) if k == "executed" and d["node"] == "4")
    previews = [i for i, k in enumerate(kinds) if k == "preview_image"]
    assert len(previews) == 2 and previews[0] < done  # mid-run, before the node finished
    ui = trained.history["outputs"]["4"]
    assert [h[0] for h in ui["kiln_history"]] == list(range(1, 13))
    assert [p["step"] for p in ui["kiln_previews"]] == [6, 12]  # temp PNGs the live view (web/js) shows
    for ref in ui["kiln_previews"]:
        assert ref["type"] == "temp" and (server.base / "temp" / ref["subfolder"] / ref["filename"]).is_file()
    sent = [d for d in trained.of_type("kiln.train.preview") if d["node"] == "4"]
    assert [d["filename"] for d in sent] == [p["filename"] for p in ui["kiln_previews"]]
    assert sorted(s for d in live for s, _, _ in d["points"]) == list(range(1, 13))  # no step lost to throttling


@pytest.mark.compat
def test_stock_lora_loader_loads_every_key_and_changes_the_image(server, trained):
    result, new_log = render_with_stock_lora(server, "e2e.safetensors", base_id=100, without_id=200)
    assert "lora key not loaded" not in new_log
    assert "NOT LOADED" not in new_log
    with_lora, without = saved_image(server, result, "105"), saved_image(server, result, "205")
    assert np.abs(with_lora - without).max() > 0


@pytest.mark.parametrize("precision", ["auto", "bf16"])
@pytest.mark.compat
def test_original_model_branch_renders_exactly_as_without_kiln(server, precision):
    """Also for bf16 on the CPU, where the trainer swaps bf16 copies of the frozen weights in for the run and the
    fp32 originals back around each preview and at the end."""
    server.post("/free", {"unload_models": True, "free_memory": True})  # fresh model objects, empty cache
    time.sleep(1.0)
    baseline = server.run({**checkpoint_loader(), **render_graph("baseline", ["1", 0], ["1", 1])})
    assert baseline.status == "success", baseline.error
    # train on the same (cached) model objects and render with the LoRA in the same prompt
    previews = 2 if precision == "bf16" else 0
    wf = tiny_train_workflow(f"isolation_{precision}", steps=6, precision=precision,
                             preview_every=3 if previews else 0)
    wf.update(render_graph("kiln_branch", ["4", 1], ["1", 1], base_id=300))
    trained = server.run(wf)
    assert trained.status == "success", trained.error
    assert len(trained.of_type("preview_image")) == previews
    # now the original MODEL again, through another sampler node type so nothing comes from the cache
    after = server.run({**checkpoint_loader(), **render_graph("after", ["1", 0], ["1", 1], sampler="KSamplerAdvanced")})
    assert after.status == "success", after.error
    assert "1" in [n for d in after.of_type("execution_cached") for n in d["nodes"]]  # same model object
    base_img = saved_image(server, baseline, "105")
    assert np.array_equal(saved_image(server, after, "105"), base_img)
    assert not np.array_equal(saved_image(server, trained, "305"), base_img)


@pytest.mark.compat
def test_chained_train_steps_continue_and_requeue_reuses_the_first(server):
    wf = tiny_train_workflow("chain", steps=4)
    wf["7"] = {"class_type": "KilnTrainSteps", "inputs": {**wf["4"]["inputs"], "state": ["4", 0], "steps": 3}}
    wf["5"]["inputs"]["state"] = ["7", 0]
    wf.update(render_graph("between", ["4", 1], ["1", 1], base_id=400))
    first = server.run(wf)
    assert first.status == "success", first.error
    assert [h[0] for h in first.history["outputs"]["7"]["kiln_history"]] == list(range(1, 8))
    with safe_open(str(lora_file(server, "chain")), "pt") as f:
        assert f.metadata()["ss_steps"] == "7"
    wf["7"]["inputs"]["steps"] = 2
    second = server.run(wf)
    assert second.status == "success", second.error
    cached = {n for d in second.of_type("execution_cached") for n in d["nodes"]}
    assert {"2", "3", "4"} <= cached and "7" not in cached
    assert [h[0] for h in second.history["outputs"]["7"]["kiln_history"]][-3:] == [4, 5, 6]
    # the first node's part of the history is identical: its result came from the cache
    assert first.history["outputs"]["7"]["kiln_history"][:4] == second.history["outputs"]["7"]["kiln_history"][:4]
    assert lora_file(server, "chain_00001").is_file()  # never overwritten silently


@pytest.mark.compat
def test_cancel_stops_within_a_step_and_keeps_a_checkpoint(server):
    """Cancel mid-run: the node stops within a step (ComfyUI >= 0.3.7x raises the interrupt inside the step's
    forward pass; the step is discarded) and writes a checkpoint of the last whole step."""
    wf = tiny_train_workflow("cancel", steps=100000, save_every=2)
    asked: list[tuple[float, int]] = []

    def on_message(kind, data):
        # Kiln's live event: every step reaches it (ComfyUI's own bar is throttled to every 0.5 % of 100000 in v0.33)
        if kind == "kiln.train.progress" and data.get("node") == "4" and data["step"] >= 5 and not asked:
            asked.append((time.monotonic(), data["step"]))
            server.interrupt()

    result = server.run(wf, on_message=on_message, timeout=300)
    assert result.status == "interrupted"
    stopped_at = time.monotonic()
    folder = server.base / "output" / "lora_kiln" / "cancel" / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    cancelled = [n for n in names if n.endswith("_cancelled.kiln.safetensors")]
    assert len(cancelled) == 1
    step = int(cancelled[0].split("_step")[1][:6])
    assert asked[0][1] <= step <= asked[0][1] + 40, (asked, step)  # the steps done before the request are kept
    assert "cancel_step000002.kiln.safetensors" in names and "cancel_step000004.kiln.safetensors" in names
    for name in names:
        with safe_open(str(folder / name), "pt") as f:
            assert f.metadata()["format"] == "lora-kiln.checkpoint/1"
        assert int(name.split("_step")[1][:6]) <= step  # nothing after the cancelled step
    assert server.get("/system_stats")  # still serving
    assert stopped_at - asked[0][0] < 30


@pytest.mark.compat
def test_resume_from_checkpoint_continues_the_step_count(server):
    graph = {**checkpoint_loader(),
             "2": tiny_train_workflow("x")["2"],
             "3": {"class_type": "KilnLoadCheckpoint", "inputs": {"model": ["1", 0],
                                                                  "checkpoint": "e2e/checkpoints/e2e_step000006.kiln.safetensors"}},
             "4": {"class_type": "KilnTrainSteps", "inputs": {**tiny_train_workflow("x")["4"]["inputs"], "steps": 3}},
             "5": {"class_type": "KilnSaveLoRA", "inputs": {"state": ["4", 0], "filename": "resumed", "dtype": "fp16",
                                                            "save_checkpoint": False}}}
    result = server.run(graph)
    assert result.status == "success", result.error
    assert [h[0] for h in result.history["outputs"]["4"]["kiln_history"]][-3:] == [7, 8, 9]
    with safe_open(str(lora_file(server, "resumed")), "pt") as f:
        assert f.metadata()["ss_steps"] == "9"


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("missing", "does not exist"),
        ("empty", "no image"),
        ("corrupt", "broken.png"),
        ("not_an_image", "notes.jpg"),
    ],
)
def test_bad_dataset_folders_give_clear_errors_and_the_server_keeps_serving(server, setup, expected):
    folder = server.base / "input" / f"bad_{setup}"
    if setup != "missing":
        folder.mkdir(exist_ok=True)
    if setup == "corrupt":
        import shutil

        shutil.copy(server.base / "input" / "shapes" / "img_00.png", folder / "good.png")
        data = (server.base / "input" / "shapes" / "img_01.png").read_bytes()
        (folder / "broken.png").write_bytes(data[: len(data) // 2])
    if setup == "not_an_image":
        (folder / "notes.jpg").write_text("this is not a picture")
    wf = tiny_train_workflow(f"bad_{setup}")
    wf["2"]["inputs"]["folder"] = f"bad_{setup}"
    result = server.run(wf)
    assert result.status == "error"
    err = result.error
    assert err["node_type"] == "KilnLoadDataset"
    assert expected in err["exception_message"].lower() or expected in err["exception_message"]
    assert len(err["exception_message"]) < 2000
    assert server.get("/system_stats")
    if setup == "corrupt":  # the user's other choice: skip the bad file and train on the rest
        wf["2"]["inputs"]["on_error"] = "skip"
        ok = server.run(wf)
        assert ok.status == "success", ok.error
        assert "skipped 1" in ok.history["outputs"]["2"]["text"][0]


def test_locon_on_every_layer_maps_onto_comfyui_and_loads_without_missing_keys(server):
    wf = tiny_train_workflow("everything", steps=2)
    wf["3"]["inputs"].update(targets="all", algorithm="locon", conv_rank=4)
    result = server.run(wf)
    assert result.status == "success", result.error
    with safe_open(str(lora_file(server, "everything")), "pt") as f:
        bases = {k.rsplit(".", 2)[0] for k in f.keys() if k.endswith(".weight")}
        meta = f.metadata()
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in bases  # 3x3 conv (LoCon)
    assert "lora_unet_conv_in" in bases and "lora_unet_time_embedding_linear_1" in bases
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "8.0"}
    _, new_log = render_with_stock_lora(server, "everything.safetensors", base_id=500)
    assert "lora key not loaded" not in new_log


def test_training_can_start_from_an_existing_lora(server, trained):
    wf = tiny_train_workflow("continued", steps=2)
    wf["3"]["inputs"]["init_lora"] = "e2e.safetensors"
    result = server.run(wf)
    assert result.status == "success", result.error
    with safe_open(str(lora_file(server, "continued")), "pt") as f, safe_open(str(lora_file(server, "e2e")), "pt") as g:
        assert set(f.keys()) == set(g.keys())


@pytest.mark.parametrize(
    ("filename", "message"),
    [("../escape", "'..'"), ("/tmp/absolute", "relative name"), ("a/../../b", "'..'"),
     ("linked/escape", "resolves outside")],
)
def test_save_refuses_names_that_escape_models_loras(server, tmp_path, filename, message):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = server.base / "models" / "loras" / "linked"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(outside, target_is_directory=True)  # a folder inside models/loras that points outside
    wf = tiny_train_workflow("escape", steps=1)
    wf["5"]["inputs"]["filename"] = filename
    result = server.run(wf)
    assert result.status == "error"
    assert result.error["node_type"] == "KilnSaveLoRA"
    assert message in result.error["exception_message"]
    assert not list(outside.iterdir())
    assert not (server.base / "models" / "escape.safetensors").exists()
    assert not list(server.base.parent.glob("escape*"))


def test_text_encoder_training_saves_lora_te_keys_that_the_stock_loader_applies(server):
    wf = tiny_train_workflow("with_te", steps=3)
    wf["3"]["inputs"].update(train_text_encoder=True, clip=["1", 1])
    wf["4"]["inputs"].update(text_encoder_lr=5e-4, preview_every=3)
    result = server.run(wf)
    assert result.status == "success", result.error
    assert "(72 on the text encoder)" in result.history["outputs"]["3"]["text"][0]  # 12 layers x 6 projections
    with safe_open(str(lora_file(server, "with_te")), "pt") as f:
        bases = {k.rsplit(".", 2)[0] for k in f.keys() if k.endswith(".weight")}
        meta = f.metadata()
        up = f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight")
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in bases
    assert any(b.startswith("lora_unet_") for b in bases)
    assert up.abs().sum() > 0  # trained, not just initialised
    assert json.loads(meta["prompt"])["3"]["inputs"]["train_text_encoder"] is True
    loaded, new_log = render_with_stock_lora(server, "with_te.safetensors", base_id=600, strength_model=0.0,
                                             without_id=700)
    assert "lora key not loaded" not in new_log
    # the text-encoder half alone changes the image: the CLIP weights really carry the LoRA
    assert not np.array_equal(saved_image(server, loaded, "605"), saved_image(server, loaded, "705"))


def test_changed_files_rerun_load_dataset_but_only_changed_images_are_encoded(server):
    import shutil

    folder = server.base / "input" / "recache"
    shutil.copytree(server.base / "input" / "shapes", folder)
    wf = tiny_train_workflow("recache", steps=1)
    wf["2"]["inputs"]["folder"] = "recache"
    first = server.run(wf)
    assert first.status == "success", first.error
    (folder / "img_00.txt").write_text("a kilnshape circle, edited by hand", encoding="utf-8")
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 20, 30)).save(folder / "img_01.png")
    second = server.run(wf)
    assert second.status == "success", second.error
    assert "2" not in {n for d in second.of_type("execution_cached") for n in d["nodes"]}
    assert "latents: 1 encoded, 3 from cache" in second.history["outputs"]["2"]["text"][0]



def test_train_steps_model_and_clip_render_like_the_stock_lora_loader_with_the_saved_file(server):
    """Train Steps' MODEL (Kiln's adapters, unmerged) and CLIP outputs render what CheckpointLoaderSimple ->
    LoraLoader(saved file) renders, with the same sampler settings (UNet only here, the CLIP output passes the
    CLIP through; test_sdxl.py compares trained text encoders too).

    The file is saved in fp32, so both sides apply the same numbers: what differs is only ComfyUI merging
    ``W + alpha / rank * up @ down`` into the weights versus Kiln adding ``x @ down @ up`` beside them (fp32 rounding,
    about 1e-6 relative). After two Euler steps, TAESD and 8-bit quantisation that flips at most a few pixel values
    by one level, so the mean absolute difference must stay below 0.25 of 255 and no pixel may differ by more than
    2 levels; the LoRA itself moves the image far more than that (checked below, so the test can fail).
    """
    wf = tiny_train_workflow("render_match", steps=3, learning_rate=5e-3)
    wf["5"]["inputs"].update(dtype="fp32")
    wf.update(render_graph("kiln_outputs", ["4", 1], ["4", 4], base_id=800))
    trained = server.run(wf)
    assert trained.status == "success", trained.error
    assert lora_file(server, "render_match").is_file()  # after the prompt: the file exists now
    stock, new_log = render_with_stock_lora(server, "render_match.safetensors", base_id=900, without_id=1000)
    assert "lora key not loaded" not in new_log
    kiln, loaded, base = (saved_image(server, trained, "805"), saved_image(server, stock, "905"),
                          saved_image(server, stock, "1005"))
    diff, effect = np.abs(kiln - loaded), np.abs(loaded - base).mean()
    assert diff.mean() < 0.25 and diff.max() <= 2, (diff.mean(), diff.max())
    assert effect > 10 * 0.25, effect  # a render without the LoRA (or with half of it) would fail the check above
