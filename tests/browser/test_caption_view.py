"""The Auto Caption view, as a user sees it: ComfyUI's real frontend in headless Chromium, a real server.

Loads ``example_workflows/caption_and_train.json`` (a tiny checkpoint, a tiny random BLIP in models/captioners, three test
images without captions, a 2-step run), queues it like the Run button and expects the captions on the Auto
Caption node, the sidecar files on disk, a re-queue that re-runs nothing, the captions back after a page reload,
and no console error the stock page does not log by itself. Screenshot: ``test-artifacts/caption_view.png``.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from test_live_view import (
    ARTIFACTS,
    assert_no_new_console_errors,
    node_clip,
    open_stock_page,
    show_node,
    widget_slots,
)

from comfy_harness import REPO, make_images

CAPTION, TRAIN = 9, 4  # node ids in example_workflows/caption_and_train.json
FOLDER, MODEL, IMAGES = "caption_view", "tiny-blip", 3

# The caption box of an Auto Caption node: its text, placeholder, state and whether it is on screen.
BOX = """(id) => {
    const n = window.app.graph.getNodeById(id), w = n?.widgets?.find((w) => w.name === 'kiln_captions');
    if (!w) return null;
    const e = w.element, r = e?.getBoundingClientRect();
    return {value: w.value, text: e?.value, placeholder: e?.placeholder, readOnly: !!e?.readOnly,
            state: e?.dataset.state ?? null, connected: !!e?.isConnected,
            visible: !!e && e.isConnected && getComputedStyle(e).display !== 'none' && r.height > 20,
            height: r?.height ?? 0, scrollHeight: e?.scrollHeight ?? 0, clientHeight: e?.clientHeight ?? 0,
            widgets: n.widgets.map((w) => w.name)};
}"""


# Where the caption box is on screen, in rows of its font, and where its node ends.
GEOMETRY = """(id) => {
    const n = window.app.graph.getNodeById(id), e = n.widgets.find((w) => w.name === 'kiln_captions').element;
    const c = window.app.canvas, r = e.getBoundingClientRect(), area = c.canvas.getBoundingClientRect();
    const style = getComputedStyle(e), ctx = document.createElement('canvas').getContext('2d');
    ctx.font = style.font;
    const m = ctx.measureText('Xg');
    const line = parseFloat(style.lineHeight) || m.fontBoundingBoxAscent + m.fontBoundingBoxDescent;
    return {rows: (e.clientHeight - parseFloat(style.paddingTop) - parseFloat(style.paddingBottom)) / line,
            right: r.right, bottom: r.bottom, scrollWidth: e.scrollWidth, clientWidth: e.clientWidth,
            nodeRight: area.left + (n.pos[0] + n.size[0] + c.ds.offset[0]) * c.ds.scale,
            nodeBottom: area.top + (n.pos[1] + n.size[1] + c.ds.offset[1]) * c.ds.scale};
}"""


def tiny_caption_workflow(object_info: dict[str, Any]) -> dict[str, Any]:
    """The shipped caption-and-train workflow with the tiny checkpoint and captioner, the test images, 2 steps."""
    wf = json.loads((REPO / "example_workflows" / "caption_and_train.json").read_text())
    patch = {
        "CheckpointLoaderSimple": {"ckpt_name": "tiny_sd15.safetensors"},
        "KilnLoadDataset": {"folder": FOLDER, "resolution": 64},
        "KilnAutoCaption": {"model": MODEL, "max_tokens": 8, "batch_size": 2},
        "KilnInjectLoRA": {"name": "browser_caption", "rank": 4, "alpha": 4.0},
        "KilnTrainSteps": {"steps": 2, "save_every": 0, "preview_every": 0},
        "KilnSaveLoRA": {"filename": "browser_caption", "save_checkpoint": False},
    }
    for node in wf["nodes"]:
        slots = widget_slots(object_info[node["type"]])
        for name, value in patch.get(node["type"], {}).items():
            node["widgets_values"][slots.index(name)] = value
    return wf


def show_caption_box(page, node_id: int) -> None:
    show_node(page, node_id, ready=f"(id) => ({BOX})(id)?.visible")


def caption_lines(text: str) -> dict[str, tuple[str, str]]:
    """``{file: (status, caption)}`` from the ``[status] file: caption`` lines of the node's text."""
    return {m[2]: (m[1], m[3]) for m in re.finditer(r"^\[(\w+)\] (\S+): (.*)$", text, re.M)}


def finished_prompt(comfy, after: str | None = None, timeout: float = 60) -> dict[str, Any]:
    """The newest prompt in the server's history once it has finished (and is not prompt ``after``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for item in comfy.get("/history?max_items=1").values():
            if item["prompt"][1] != after and item.get("status", {}).get("completed") is not None:
                return item
        time.sleep(0.2)
    pytest.fail(f"no finished prompt in the history after {timeout}s\n{comfy.log()[-3000:]}")


def test_auto_caption_view_shows_the_captions_and_comes_back_after_reload(comfy, browser):
    started = time.monotonic()
    build_tiny_blip = pytest.importorskip("lora_core.caption.tiny").build_tiny_blip
    build_tiny_blip(comfy.base / "models" / "captioners" / MODEL)
    folder = make_images(comfy.base / "input" / FOLDER, n=IMAGES, captions=False)
    assert not list(folder.glob("*.txt"))
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "caption_view.png"
    shot.unlink(missing_ok=True)
    workflow = tiny_caption_workflow(comfy.get("/object_info"))

    # 1. The stock page (default graph, no Kiln node) and its own console errors: the baseline.
    page, console, baseline = open_stock_page(browser, comfy.url, ("LoRAKiln.TrainView", "LoRAKiln.CaptionView"))

    # 2. Open the workflow: the Auto Caption node has an empty, read-only caption box that is not a prompt input.
    mark = console.mark()
    page.evaluate("(wf) => window.app.loadGraphData(wf)", workflow)
    show_caption_box(page, CAPTION)
    idle = page.evaluate(BOX, CAPTION)
    assert idle["value"] == "" and idle["readOnly"] and "Captions appear here" in idle["placeholder"], idle
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert prompt[str(CAPTION)]["inputs"]["model"] == MODEL
    assert "kiln_captions" not in prompt[str(CAPTION)]["inputs"], "the caption box is sent as a node input"

    # 3. Run it (like pressing Run); the node shows one line per image once Auto Caption has run.
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function(f"(id) => ({BOX})(id)?.value", arg=CAPTION, timeout=60_000)
    run = finished_prompt(comfy)
    assert run["status"]["status_str"] == "success", run["status"]
    done = page.evaluate(BOX, CAPTION)
    text = done["value"]
    assert done["text"] == text and done["state"] == "done", done
    head, _, listing = text.partition("\n\n")
    assert head.startswith(f"{IMAGES} images: {IMAGES} new; {IMAGES} caption files written"), text
    assert f"model {MODEL} (BLIP) on cpu: {IMAGES} images in" in head, text
    lines = caption_lines(listing)
    assert listing.count("\n") == IMAGES - 1 and sorted(lines) == [f"img_{i:02d}.png" for i in range(IMAGES)], text
    for name, (status, caption) in lines.items():
        sidecar = folder / name.replace(".png", ".txt")
        assert status == "new" and sidecar.is_file(), (name, status)
        assert sidecar.read_text(encoding="utf-8") == caption and caption.startswith("sks, "), (caption, sidecar)
    assert text == run["outputs"][str(CAPTION)]["text"][0]

    show_caption_box(page, CAPTION)
    page.wait_for_timeout(300)
    page.screenshot(path=str(shot), clip=node_clip(page, CAPTION))
    box = page.evaluate(BOX, CAPTION)
    assert box["scrollHeight"] <= box["clientHeight"] + 2, f"the captions do not fit in the box: {box}"

    # Nothing of it is saved in the workflow; a re-queue without changes re-runs nothing (cached, same text).
    saved = json.dumps(page.evaluate("() => window.app.graph.serialize()"))
    assert lines["img_00.png"][1] not in saved, "the captions were saved into the workflow"
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    again = finished_prompt(comfy, after=run["prompt"][1])
    cached = {n for kind, data in again["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}
    assert {str(CAPTION), str(TRAIN)} <= cached, f"the re-queue ran nodes again: cached only {sorted(cached)}"
    assert page.evaluate(BOX, CAPTION)["value"] == text
    run_errors = console.since(mark)

    # 4. Reload the page: the frontend restores the open workflow, the box gets the last captions back.
    mark = console.mark()
    page.reload(wait_until="domcontentloaded")
    page.wait_for_function("(id) => window.app?.vueAppReady && window.app.graph?.getNodeById(id)?.widgets",
                           arg=CAPTION, timeout=60_000)
    page.wait_for_function(f"(id) => ({BOX})(id)?.state === 'restored'", arg=CAPTION, timeout=15_000)
    restored = page.evaluate(BOX, CAPTION)
    assert text in restored["value"] and caption_lines(restored["value"]) == lines, restored
    show_caption_box(page, CAPTION)
    page.screenshot(path=str(ARTIFACTS / "caption_view_after_reload.png"), clip=node_clip(page, CAPTION))

    # Removing the node, then loading the workflow again: a fresh, empty box that is filled from the history.
    page.evaluate("(id) => { const g = window.app.graph; window.__removed = g.getNodeById(id); g.remove(__removed); }",
                  CAPTION)
    assert page.evaluate("() => window.__removed.kilnCaptionView") is None
    page.evaluate("(wf) => window.app.loadGraphData(wf)", workflow)
    page.wait_for_function(f"(id) => ({BOX})(id)?.state === 'restored'", arg=CAPTION, timeout=15_000)
    assert caption_lines(page.evaluate(BOX, CAPTION)["value"]) == lines

    # Many images: the box grows up to 16 rows (the node with it), then scrolls; long captions wrap, nothing sticks out.
    many = "40 images: 40 new\n\n" + "\n".join(f"[new] img_{i:02d}.png: sks, " + "a long caption " * (i % 4 + 1)
                                                for i in range(40))
    page.evaluate("([id, text]) => window.app.graph.getNodeById(id).onExecuted({text: [text]})", [CAPTION, many])
    show_caption_box(page, CAPTION)
    page.wait_for_timeout(300)
    box = page.evaluate(BOX, CAPTION)
    grown = page.evaluate(GEOMETRY, CAPTION)
    page.screenshot(path=str(ARTIFACTS / "caption_view_many.png"), clip=node_clip(page, CAPTION))
    assert box["value"] == many and box["scrollHeight"] > box["clientHeight"], box
    assert 15 <= grown["rows"] <= 17, f"not about 16 rows: {grown}"
    assert grown["bottom"] <= grown["nodeBottom"] and grown["right"] <= grown["nodeRight"], f"sticks out: {grown}"
    assert grown["scrollWidth"] <= grown["clientWidth"], f"scrolls sideways: {grown}"
    reload_errors = console.since(mark)

    # 5. Console: nothing from Kiln, and nothing the stock page does not log by itself.
    assert_no_new_console_errors(console, baseline, run_errors, reload_errors, "caption_view_console.json")
    page.close()
    print(f"browser caption-view test took {time.monotonic() - started:.1f}s")
