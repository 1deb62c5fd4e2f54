"""A Wan video run in ComfyUI's real frontend: the Train Steps live view shows each preview as a moving clip.

The shipped ``example_workflows/api/train_wan_lora.json`` with its loaders pointed at the tests' tiny Wan 2.1 (the
stock UNETLoader and VAELoader, the one-layer UMT5 fixture node) trains on clips PyAV writes; the preview strip's images
are the animated WEBPs Train Steps writes, and the browser decodes each as a 9-frame animation (WebCodecs'
ImageDecoder: what Chromium itself plays). Screenshot: ``test-artifacts/live_view_video.png``.
"""

from __future__ import annotations

import time

import pytest
from test_live_view import VIEW_STATE, Console, open_comfyui, show_node

from comfy_harness import FILES_2026, REPO, build_2026_files, link_models, load_api, write_clip

ARTIFACTS = REPO / "test-artifacts"
TRAIN, STEPS, PREVIEW_EVERY, FRAMES = 4, 4, 2, 9


@pytest.fixture(scope="module")
def wan_server(comfy, tmp_path_factory):
    if "class WAN22_T2V" not in (comfy.comfy / "comfy" / "supported_models.py").read_text():
        pytest.skip("Wan training needs ComfyUI v0.33 or newer")
    link_models(build_2026_files(comfy.comfy, tmp_path_factory.mktemp("wan_files")), comfy.base, FILES_2026)
    for k in range(2):
        clip = write_clip(comfy.base / "input" / "browser_clips" / f"clip{k}.mp4", 20, 16, seed=k)
        clip.with_suffix(".txt").write_text(f"a kilnshape disc moving, clip {k}")
    return comfy


def test_a_wan_run_shows_each_preview_as_a_moving_clip_in_the_live_view(wan_server, browser):
    api = load_api("train_wan_lora")
    api["1"]["inputs"].update(unet_name="tiny_wan21_t2v.safetensors")
    api["7"] = {"class_type": "TestTinyWanCLIP", "inputs": {"seed": 0, "min_length": 32}}
    api["8"]["inputs"].update(vae_name="tiny_wan21.safetensors")
    api["2"]["inputs"].update(folder="browser_clips", resolution=64, frames=FRAMES)
    api["3"]["inputs"].update(name="browser_wan", rank=4, alpha=4.0)
    api["4"]["inputs"].update(steps=STEPS, preview_every=PREVIEW_EVERY, preview_size=64, preview_steps=2, save_every=0,
                              warmup_steps=0)
    api["5"]["inputs"].update(filename="browser_wan", save_checkpoint=False)
    page = browser.new_page(viewport={"width": 1600, "height": 1400})
    console = Console(page)
    open_comfyui(page, wan_server.url)
    page.evaluate("(wf) => window.app.loadApiJson(wf, 'train_wan_lora.json')", api)
    show_node(page, TRAIN)
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    deadline, state = time.monotonic() + 300, None
    while time.monotonic() < deadline:
        state = page.evaluate(VIEW_STATE, TRAIN)
        if state and state["state"] == "done":
            break
        page.wait_for_timeout(200)
    else:
        pytest.fail(f"the Wan run did not finish in time; last view state: {state}\n{wan_server.log()[-3000:]}")
    assert state["previewSteps"] == list(range(PREVIEW_EVERY, STEPS + 1, PREVIEW_EVERY)), state
    page.wait_for_function("(id) => { const v = window.app.graph.getNodeById(id).kilnView;"
                           " return [...v.strip.querySelectorAll('img')].every((i) => i.complete && i.naturalWidth > 0) }",
                           arg=TRAIN, timeout=10_000)
    sources = page.evaluate("(id) => [...window.app.graph.getNodeById(id).kilnView.strip.querySelectorAll('img')]"
                            ".map((i) => i.src)", TRAIN)
    assert len(sources) == STEPS // PREVIEW_EVERY and all(".webp" in s for s in sources), sources
    frames = page.evaluate(
        """async (src) => {
            const decoder = new ImageDecoder({data: (await fetch(src)).body, type: "image/webp"});
            await decoder.tracks.ready;
            const track = decoder.tracks.selectedTrack;
            return {animated: track.animated, frames: track.frameCount};
        }""", sources[-1])
    assert frames == {"animated": True, "frames": FRAMES}, frames
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "live_view_video.png"))
    assert not [e for e in console.entries if "kiln" in (e["text"] + e["where"]).lower()], console.entries
