"""Wan video LoRAs (issue 23) end to end on a real ComfyUI v0.33 server: clips and images in one folder, moving
previews, the file ComfyUI and diffusers load.

The models are tiny files the stock loaders detect (nodes/tiny_checkpoint.py): a Wan 2.1 T2V and a Wan 2.2 TI2V 5B for
UNETLoader (one 128-wide head, two blocks), the Wan 2.1 VAE at width 8 and Wan 2.2's tiny autoencoder (TAEHV, 48
channels; ComfyUI detects the real Wan 2.2 VAE only at its 705 M parameters) for VAELoader; UMT5 is ComfyUI's own Wan
text encoder in a one-layer configuration (TestTinyWanCLIP, tests/fixture_nodes). The clips are written with PyAV and
Pillow: a coloured disc moving across the frame, as .mp4 (H.264), .webm (VP9) and .gif, next to a still image.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_sdxl import cancel_then_requeue, keys_and_metadata

from comfy_harness import FILES_2026, kiln_nodes, link_models, make_images, write_clip
from conftest import COMFY

pytestmark = pytest.mark.skipif(
    COMFY is None or "class WAN22_T2V" not in (COMFY / "comfy" / "supported_models.py").read_text()
    or not (COMFY / "comfy" / "taesd" / "taehv.py").exists(),
    reason="the Wan tests need ComfyUI v0.33 or newer (COMFYUI_PATH): its Wan 2.2 tiny autoencoder (taehv)")

ALPHA, RANK = 8.0, 4
FRAMES = 9  # 4k+1: the first frame alone, then 4 per latent frame -> 3 latent frames
WAN_LAYERS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
              "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


@dataclass(frozen=True)
class Spec:
    family: str
    unet: str
    vae: str
    fps: int
    base_version: str
    architecture: str

    def loaders(self, base: int) -> dict:
        return {
            str(base): {"class_type": "UNETLoader", "inputs": {"unet_name": self.unet, "weight_dtype": "default"}},
            str(base + 1): {"class_type": "TestTinyWanCLIP", "inputs": {"seed": 0, "min_length": 32}},
            str(base + 2): {"class_type": "VAELoader", "inputs": {"vae_name": self.vae}},
        }


WAN21 = Spec("Wan 2.1 / 2.2 14B", "tiny_wan21_t2v.safetensors", "tiny_wan21.safetensors", 16, "wan21_t2v",
             "Wan2.1-T2V-1.3B/lora")
WAN22 = Spec("Wan 2.2 5B", "tiny_wan22_5b.safetensors", "tiny_taew22.safetensors", 24, "wan22_ti2v_5b",
             "Wan2.2-TI2V-5B/lora")
KSAMPLER = {"seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}


@pytest.fixture(scope="module")
def installed(server, families_2026_files):
    link_models(families_2026_files, server.base, FILES_2026)
    clips = server.base / "input" / "clips"
    if not clips.exists():
        # 1.25 s at 32 fps (resampled to 16: every second frame), 20 frames at 16 fps, a 12-frame GIF at 10 fps
        for name, frames, fps, seed in (("walk.mp4", 40, 32, 0), ("spin.webm", 20, 16, 1), ("bounce.gif", 12, 10, 2)):
            write_clip(clips / name, frames, fps, seed=seed)
            (clips / name).with_suffix(".txt").write_text(f"a kilnshape disc moving, clip {seed}")
        make_images(clips, n=1)
    return server


def render(spec: Spec, prefix: str, base: int, model: list | None = None, lora: str | None = None) -> dict:
    """A 9-frame 64 x 64 clip as a user's Wan graph makes it (CLIPTextEncode, the family's empty video latent,
    KSampler at cfg 1, VAE Decode, SaveImage of every frame), from the loader, through LoraLoaderModelOnly(``lora``),
    or from the ``model`` link."""
    i = [str(base + k) for k in range(10)]
    graph = spec.loaders(base)
    model = model or [i[0], 0]
    if lora:
        graph[i[3]] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora,
                                                                        "strength_model": 1.0}}
        model = [i[3], 0]
    graph[i[4]] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a kilnshape disc moving", "clip": [i[1], 0]}}
    size = {"width": 64, "height": 64, "length": FRAMES, "batch_size": 1}
    graph[i[6]] = {"class_type": "EmptyHunyuanLatentVideo", "inputs": size} if spec is WAN21 else \
        {"class_type": "Wan22ImageToVideoLatent", "inputs": {**size, "vae": [i[2], 0]}}
    graph.update({
        i[7]: {"class_type": "KSampler", "inputs": {**KSAMPLER, "model": model, "positive": [i[4], 0],
                                                    "negative": [i[4], 0], "latent_image": [i[6], 0]}},
        i[8]: {"class_type": "VAEDecode", "inputs": {"samples": [i[7], 0], "vae": [i[2], 0]}},
        i[9]: {"class_type": "SaveImage", "inputs": {"images": [i[8], 0], "filename_prefix": prefix}},
    })
    return graph


def train_graph(spec: Spec, name: str, steps: int, folder: str = "clips", **train) -> dict:
    """Loaders -> Load Dataset (the clips folder: 9-frame windows, two per clip, and the image) -> Inject LoRA (rank 4,
    attn+ff) -> Train Steps (auto settings, fp32) -> Save LoRA (fp32, with its checkpoint)."""
    graph = spec.loaders(1)
    graph.update({
        "4": {"class_type": "KilnTrainSteps", "inputs": {
            "state": ["7", 0], "dataset": ["6", 0], "steps": steps, "learning_rate": 5e-3, "optimizer": "adamw",
            "scheduler": "constant", "warmup_steps": 0, "schedule_steps": 0, "batch_size": 1, "grad_accum": 1,
            "precision": "fp32", "gradient_checkpointing": True, "min_snr_gamma": -1.0, "noise_offset": 0.0,
            "save_every": 0, "preview_every": 0, "preview_prompt": "a kilnshape disc moving", "preview_seed": 0,
            "preview_size": 64, "preview_steps": 2, "timestep_sampling": "auto", **train}},
        **kiln_nodes(name, RANK, ALPHA, model=["1", 0], clip=["2", 0], vae=["3", 0]),
    })
    graph["6"]["inputs"].update(folder=folder, frames=FRAMES, frame_sampling="uniform", windows=2, fps=0.0)
    return graph


def frames_of(server, result, node_id: str) -> np.ndarray:
    """Every frame a SaveImage node wrote, [F, H, W, 3]."""
    infos = result.history["outputs"][node_id]["images"]
    return np.stack([np.asarray(Image.open(server.base / "output" / i["subfolder"] / i["filename"]), dtype=np.int16)
                     for i in infos])


@pytest.fixture(scope="module")
def wan21_trained(installed):
    """The base render, then 4 steps with previews at 2 and 4 and a render from Train Steps' MODEL."""
    before = installed.run(render(WAN21, "wan_base_before", 100))
    assert before.status == "success", before.error
    graph = train_graph(WAN21, "wan_lora", steps=4, preview_every=2)
    graph.update(render(WAN21, "wan_kiln_model", 200, model=["4", 1]))
    result = installed.run(graph, timeout=1200)
    assert result.status == "success", result.error
    return before, result


def test_load_dataset_reads_clips_at_the_model_frame_rate_in_windows_and_images_as_one_frame(installed, wan21_trained):
    _, result = wan21_trained
    text = result.history["outputs"]["6"]["text"][0]
    # three clips, two 9-frame windows each, and the image as a one-frame clip; resampled to 16 fps (the Wan 2.1 VAE's)
    assert "7 samples (6 clip windows of 9 frames at 16 fps, 1 images)" in text, text
    assert "64x64x9: 6" in text and "64x64: 1" in text, text
    assert "fps auto: 16 for Wan 2.1 / 2.2 14B (Wan 2.1 VAE)" in text, text
    assert "latents: 7 encoded" in text, text
    graph = train_graph(WAN21, "wan_lora_cached", steps=1)
    graph["6"]["inputs"]["trigger_word"] = "kilnshape"  # Load Dataset runs again (ComfyUI caches unchanged nodes)
    again = installed.run(graph)
    assert again.status == "success", again.error
    assert "latents: 0 encoded, 7 from cache" in again.history["outputs"]["6"]["text"][0]


def test_wan_trains_with_progress_and_moving_previews_and_writes_the_wan_layout(installed, wan21_trained):
    _, result = wan21_trained
    out = result.history["outputs"]["4"]
    assert [h[0] for h in out["kiln_history"]] == [1, 2, 3, 4] and all(math.isfinite(h[1]) for h in out["kiln_history"])
    assert "auto for Wan 2.1 / 2.2 14B: min_snr_gamma 0, timestep_sampling logit_normal" in out["text"][0]
    previews = out["kiln_previews"]
    assert [p["step"] for p in previews] == [2, 4] and all(p.get("animated") for p in previews)
    for ref in previews:  # an animated WEBP of the preview clip in ComfyUI's temp folder, playing at 16 fps
        with Image.open(installed.base / "temp" / ref["subfolder"] / ref["filename"]) as clip:
            assert clip.format == "WEBP" and clip.is_animated and clip.n_frames == FRAMES
            clip.seek(FRAMES - 1)
            clip.load()
            assert clip.info["duration"] == round(1000 / 16) and clip.size == (64, 64)
            assert clip.info["timestamp"] == (FRAMES - 1) * round(1000 / 16)
    samples = installed.base / "output" / "lora_kiln" / "wan_lora" / "samples"
    assert sorted(p.name for p in samples.glob("step*")) == ["step000002.webp", "step000004.webp"]
    keys, meta = keys_and_metadata(installed, "wan_lora")
    modules = {k.rsplit(".", 2)[0] for k in keys}
    assert modules == {f"diffusion_model.blocks.{b}.{m}" for b in (0, 1) for m in WAN_LAYERS}, sorted(modules)
    assert {k[len(m) + 1:] for k in keys for m in modules if k.startswith(m + ".")} == {"lora_A.weight",
                                                                                        "lora_B.weight"}
    assert meta["ss_base_model_version"] == WAN21.base_version
    assert meta["modelspec.architecture"] == WAN21.architecture


def test_the_stock_lora_loader_applies_every_key_and_renders_the_clip_like_train_steps(installed, wan21_trained):
    """LoraLoaderModelOnly (no ``lora key not loaded``) renders every frame as Train Steps' MODEL does, within
    rounding; the LoRA changes the clip; the base renders as before."""
    before, result = wan21_trained
    log_start = len(installed.log())
    stock = installed.run({**render(WAN21, "wan_stock_lora", 300, lora="wan_lora.safetensors"),
                           **render(WAN21, "wan_base_after", 400)})
    assert stock.status == "success", stock.error
    assert "lora key not loaded" not in installed.log()[log_start:]
    base, kiln = frames_of(installed, before, "109"), frames_of(installed, result, "209")
    loaded, after = frames_of(installed, stock, "309"), frames_of(installed, stock, "409")
    assert base.shape == (FRAMES, 64, 64, 3)
    diff, effect = np.abs(kiln - loaded), np.abs(loaded - base).mean()
    assert diff.mean() < 0.25 and diff.max() <= 2, (diff.mean(), diff.max(), effect)
    assert effect > 10 * 0.25, effect
    assert np.array_equal(base, after)


def test_diffusers_wan_loader_injects_every_key_with_kilns_deltas(installed, wan21_trained):
    """diffusers' WanLoraLoaderMixin (``lora_state_dict``: its converter of this layout, then
    ``load_lora_into_transformer``) on a WanTransformer3DModel of the same architecture: a peft layer on every
    attention and feed-forward layer of both blocks, each with Kiln's delta (alpha / rank * up @ down)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders import WanLoraLoaderMixin
    from peft.tuners.lora import LoraLayer

    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=256, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    state = WanLoraLoaderMixin.lora_state_dict(str(installed.base / "models" / "loras" / "wan_lora.safetensors"))
    WanLoraLoaderMixin.load_lora_into_transformer(state, transformer=transformer, adapter_name="kiln")
    injected = {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer)}
    names = {"self_attn": "attn1", "cross_attn": "attn2"}
    parts = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
    expected = {f"blocks.{b}.{names[a]}.{parts[p]}": f"blocks.{b}.{a}.{p}" for b in (0, 1) for a in names for p in parts}
    expected.update({f"blocks.{b}.ffn.net.0.proj": f"blocks.{b}.ffn.0" for b in (0, 1)})
    expected.update({f"blocks.{b}.ffn.net.2": f"blocks.{b}.ffn.2" for b in (0, 1)})
    assert set(injected) == set(expected), sorted(set(injected) ^ set(expected))
    checkpoint = next((installed.base / "output" / "lora_kiln" / "wan_lora" / "checkpoints").glob("*.kiln.safetensors"))
    kiln = load_file(str(checkpoint))
    for theirs, ours in expected.items():
        layer = injected[theirs]
        delta = layer.scaling["kiln"] * layer.lora_B["kiln"].weight @ layer.lora_A["kiln"].weight
        up, down = kiln[f"weights/unet.{ours}.lora_up.weight"], kiln[f"weights/unet.{ours}.lora_down.weight"]
        assert (ALPHA / RANK * up @ down).abs().max() > 0, ours
        torch.testing.assert_close(delta, ALPHA / RANK * up @ down, rtol=1e-5, atol=1e-7, msg=ours)


def test_cancel_keeps_a_checkpoint_and_the_requeue_resumes(installed):
    graph = train_graph(WAN21, "wan_cancel", steps=200, gradient_checkpointing=False)
    graph["5"]["inputs"]["save_checkpoint"] = False
    cancel_then_requeue(installed, graph, "wan_cancel", 200)


def test_wan22_5b_trains_clips_at_24_fps_with_a_moving_preview_and_renders_through_the_stock_loader(installed):
    before = installed.run(render(WAN22, "wan22_base", 100))
    assert before.status == "success", before.error
    graph = train_graph(WAN22, "wan22_lora", steps=2, preview_every=2, learning_rate=5e-2)
    graph.update(render(WAN22, "wan22_kiln_model", 200, model=["4", 1]))
    result = installed.run(graph, timeout=1200)
    assert result.status == "success", result.error
    text = result.history["outputs"]["6"]["text"][0]
    assert "fps auto: 24 for Wan 2.2 5B (Wan 2.2 VAE)" in text and "clip windows of 9 frames at 24 fps" in text, text
    out = result.history["outputs"]["4"]
    assert [h[0] for h in out["kiln_history"]] == [1, 2] and len(out["kiln_previews"]) == 1
    assert out["kiln_previews"][0]["filename"].endswith(".webp")
    keys, meta = keys_and_metadata(installed, "wan22_lora")
    assert {k.rsplit(".", 2)[0] for k in keys} == {f"diffusion_model.blocks.{b}.{m}" for b in (0, 1) for m in WAN_LAYERS}
    assert meta["ss_base_model_version"] == WAN22.base_version
    assert meta["modelspec.architecture"] == WAN22.architecture
    log_start = len(installed.log())
    stock = installed.run(render(WAN22, "wan22_stock", 300, lora="wan22_lora.safetensors"))
    assert stock.status == "success", stock.error
    assert "lora key not loaded" not in installed.log()[log_start:]
    base, kiln, loaded = (frames_of(installed, r, n) for r, n in ((before, "109"), (result, "209"), (stock, "309")))
    diff, effect = np.abs(kiln - loaded), np.abs(loaded - base).mean()
    assert diff.mean() < 0.25 and diff.max() <= 2, (diff.mean(), diff.max(), effect)
    assert effect > 4 * max(diff.mean(), 0.05), effect  # the tiny autoencoder renders dark clips: small pixel values


def test_an_expert_trains_on_a_two_expert_model_and_is_refused_by_name_elsewhere(installed):
    """Wan 2.2 14B loads as WAN21_T2V: expert high_noise / low_noise trains its noise levels; on the 5B (one model) it
    is refused with what to do."""
    result = installed.run(train_graph(WAN21, "wan_high", steps=2, expert="high_noise"))
    assert result.status == "success", result.error
    bad = installed.run(train_graph(WAN22, "wan22_high", steps=1, expert="high_noise"))
    assert bad.status == "error"
    message = bad.error["exception_message"]
    assert "expert='high_noise' is for two-expert models" in message and "set expert to all" in message, message


def test_bad_clips_are_named_or_skipped_and_the_server_stays_alive(installed):
    folder = installed.base / "input" / "bad_clips"
    shutil.rmtree(folder, ignore_errors=True)
    write_clip(folder / "good.mp4", 20, 16)
    write_clip(folder / "short.mp4", 4, 16)  # 0.25 s: fewer than 9 frames at 16 fps
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    graph = train_graph(WAN21, "wan_bad", steps=1, folder="bad_clips")
    result = installed.run(graph)
    assert result.status == "error"
    message = result.error["exception_message"]
    assert "broken.mp4" in message or "short.mp4" in message, message
    graph["6"]["inputs"]["on_error"] = "skip"
    skipped = installed.run(graph)
    assert skipped.status == "success", skipped.error
    text = skipped.history["outputs"]["6"]["text"][0]
    assert "skipped 2 files" in text and "broken.mp4" in text and "short.mp4" in text, text
    assert "2 samples (2 clip windows" in text, text  # good.mp4's two windows


def test_an_image_model_trains_on_the_stills_of_a_clip_folder_and_names_the_clips_it_leaves_out(installed):
    """An SD1.5 user's folder with clips in it (the checkpoint's image VAE): Load Dataset trains what it trained before
    clips existed (the image, the animated GIF as its first frame) and names the video files it leaves out."""
    from test_sdxl import train_graph as sd_train_graph

    graph = sd_train_graph("tiny_sd15.safetensors", "sd_on_clips", steps=1)
    graph["2"]["inputs"].update(folder="clips", frames=33)  # the node's default; an image VAE makes it 1
    result = installed.run(graph)
    assert result.status == "success", result.error
    text = result.history["outputs"]["2"]["text"][0]
    assert text.startswith("2 images (2 samples per epoch"), text
    assert "left out 2 video clip(s)" in text and "walk.mp4" in text and "spin.webm" in text, text
    assert "1 animated GIF(s) train as their first frame" in text and "bounce.gif" in text, text


def test_the_shipped_example_workflow_trains_with_its_loaders_pointed_at_the_tiny_model(installed):
    """example_workflows/api/train_wan_lora.json as shipped (UNETLoader, CLIPLoader type wan, VAELoader; auto
    resolution and frame rate, uniform windows, gradient checkpointing, previews): only the loaders, the sizes and
    the step counts change."""
    from comfy_harness import load_api

    wf = load_api("train_wan_lora")
    assert wf["1"]["class_type"] == "UNETLoader" and wf["7"]["class_type"] == "CLIPLoader"
    assert wf["7"]["inputs"]["type"] == "wan" and wf["2"]["inputs"]["fps"] == 0.0
    assert wf["2"]["inputs"]["frames"] == 33 and wf["4"]["inputs"]["expert"] == "all"
    tiny = WAN21.loaders(1)
    wf["1"], wf["7"], wf["8"] = tiny["1"], tiny["2"], tiny["3"]
    wf["2"]["inputs"].update(folder="clips", resolution=64, frames=FRAMES)
    wf["3"]["inputs"].update(name="wan_example", rank=4, alpha=4.0)
    wf["4"]["inputs"].update(steps=2, preview_every=2, preview_size=64, save_every=0, warmup_steps=0)
    result = installed.run(wf, timeout=1200)
    assert result.status == "success", result.error
    out = result.history["outputs"]["4"]
    assert [h[0] for h in out["kiln_history"]] == [1, 2] and len(out["kiln_previews"]) == 1
    assert out["kiln_previews"][0].get("animated")
    assert (installed.base / "models" / "loras" / "wan_example.safetensors").exists()


def test_chained_train_steps_on_clips_continue_exactly(installed):
    """1 + 1 chained Train Steps and one 2-step node, from one Inject LoRA on the clips folder: the same losses and the
    same LoRA, bit for bit (the epoch order of clip windows and images is a function of the seed)."""
    graph = train_graph(WAN21, "wan_chain_2", steps=2, gradient_checkpointing=False)
    graph["5"]["inputs"]["save_checkpoint"] = False
    graph["8"] = {"class_type": "KilnTrainSteps", "inputs": {**graph["4"]["inputs"], "steps": 1}}
    graph["9"] = {"class_type": "KilnTrainSteps", "inputs": {**graph["8"]["inputs"], "state": ["8", 0]}}
    graph["10"] = {"class_type": "KilnSaveLoRA", "inputs": {**graph["5"]["inputs"], "state": ["9", 0],
                                                            "filename": "wan_chain_1_1"}}
    result = installed.run(graph, timeout=1200)
    assert result.status == "success", result.error
    one, chained = result.history["outputs"]["4"]["kiln_history"], result.history["outputs"]["9"]["kiln_history"]
    assert [h[0] for h in chained] == [1, 2] and chained == one
    loras = installed.base / "models" / "loras"
    two, one_one = load_file(str(loras / "wan_chain_2.safetensors")), load_file(str(loras / "wan_chain_1_1.safetensors"))
    assert two.keys() == one_one.keys() and all(torch.equal(two[k], one_one[k]) for k in two)
    assert all(v.abs().sum() > 0 for k, v in two.items() if k.endswith("lora_B.weight"))
