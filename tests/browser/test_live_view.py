"""The Train Steps live view, as a user sees it: ComfyUI's real frontend in headless Chromium, a real server.

Loads ``example_workflows/train_sd15_lora.json`` (pointed at a tiny checkpoint), queues it, and watches the loss chart and
the preview strip on the Train Steps node fill while training runs; then reloads the page and opens the workflow
again and expects the last run back. Screenshots go to ``test-artifacts/``. Console errors are compared with the
stock page's own (it logs a few by itself).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from comfy_harness import REPO

ARTIFACTS = REPO / "test-artifacts"

TRAIN = 4  # the Train Steps node of example_workflows/train_sd15_lora.json
STEPS, PREVIEW_EVERY = 30, 10
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def widget_slots(info: dict[str, Any]) -> list[str | None]:
    """Input name per widgets_values slot, as the frontend lays them out (None: a 'control after generate')."""
    slots: list[str | None] = []
    for group in ("required", "optional"):
        spec = info["input"].get(group, {})
        for name in info.get("input_order", {}).get(group, list(spec)):
            kind, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {}) or {}
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput"):
                slots.append(name)
                if opts.get("control_after_generate"):
                    slots.append(None)
    return slots


def tiny_ui_workflow(object_info: dict[str, Any]) -> dict[str, Any]:
    """The shipped UI workflow with the tiny checkpoint, the test images and a short run with previews."""
    wf = json.loads((REPO / "example_workflows" / "train_sd15_lora.json").read_text())
    patch = {
        "CheckpointLoaderSimple": {"ckpt_name": "tiny_sd15.safetensors"},
        "KilnLoadDataset": {"folder": "shapes", "resolution": 64},
        "KilnInjectLoRA": {"name": "browser_live", "rank": 4, "alpha": 4.0},
        "KilnTrainSteps": {"steps": STEPS, "learning_rate": 1e-3, "save_every": 0, "preview_every": PREVIEW_EVERY,
                           "preview_size": 64, "preview_steps": 2},
        "KilnSaveLoRA": {"filename": "browser_live", "save_checkpoint": False},
    }
    for node in wf["nodes"]:
        values = patch.get(node["type"], {})
        slots = widget_slots(object_info[node["type"]])
        for name, value in values.items():
            node["widgets_values"][slots.index(name)] = value
    return wf


class Console:
    """Console errors, uncaught exceptions and failed requests of a page, in order."""

    def __init__(self, page) -> None:
        self.entries: list[dict[str, str]] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.entries.append({"kind": "pageerror", "text": str(exc),
                                                               "where": getattr(exc, "stack", "") or ""}))
        page.on("requestfailed", lambda req: self.entries.append({"kind": "requestfailed", "text": req.failure or "",
                                                                  "where": req.url}))

    def _console(self, msg) -> None:
        if msg.type == "error":
            self.entries.append({"kind": "console", "text": msg.text, "where": (msg.location or {}).get("url", "")})

    def mark(self) -> int:
        return len(self.entries)

    def since(self, mark: int) -> list[dict[str, str]]:
        return self.entries[mark:]


def normalised(entry: dict[str, str]) -> str:
    """An error without the parts that change between page loads (ids, ports, timings)."""
    text = re.sub(r"https?://[^/\s]+", "", f"{entry['kind']}: {entry['text']}")
    return re.sub(r"\d+", "N", text)[:300]


# Backend endpoints newer frontends (1.58) call that ComfyUI 0.3.64 lacks: their 404s, and the frontend's own messages
# about them (stack traces that differ with the caller), are the frontend's, logged whenever it polls.
NEWER_BACKEND_404 = re.compile(r"/api/(jobs|global_subgraphs)\b|JobsApiError")


def is_newer_backend_404(entry: dict[str, str]) -> bool:
    return bool(NEWER_BACKEND_404.search(f"{entry['where']} {entry['text']}"))


def is_ours(entry: dict[str, str]) -> bool:
    return "lora-kiln" in entry["where"] or "lora-kiln" in entry["text"] or "kiln" in entry["text"].lower()

def assert_no_new_console_errors(console: Console, baseline: list, run_errors: list, reload_errors: list,
                                 artifact: str) -> None:
    """Nothing from Kiln in the console, and no error the stock page does not log by itself; record all of it."""
    known = {normalised(e) for e in baseline}
    new = [e for e in run_errors + reload_errors if normalised(e) not in known and not is_newer_backend_404(e)]
    (ARTIFACTS / artifact).write_text(json.dumps(
        {"baseline": baseline, "run": run_errors, "reload": reload_errors, "new": new}, indent=2))
    assert not [e for e in console.entries if is_ours(e)], console.entries
    assert not new, f"console errors the stock page does not log: {new}"



def open_comfyui(page, url: str, extensions: tuple[str, ...] = ("LoRAKiln.TrainView",)) -> None:
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_function(
        "(names) => window.app?.vueAppReady && window.app.graph && window.LiteGraph?.registered_node_types?.KilnTrainSteps "
        "&& names.every((name) => window.app.extensions?.some((e) => e.name === name))",
        arg=list(extensions),
        timeout=60_000,
    )


def open_stock_page(browser, url: str, extensions: tuple[str, ...] = ("LoRAKiln.TrainView",)):
    """A new page on ComfyUI's default graph (no Kiln node yet) and the console errors the stock page logs by
    itself: the baseline later errors are compared with. Returns (page, console, baseline)."""
    page = browser.new_page(viewport={"width": 1600, "height": 1400})  # Train Steps is a tall node
    console = Console(page)
    open_comfyui(page, url, extensions)
    page.wait_for_timeout(1500)
    baseline = console.since(0)
    assert not [e for e in baseline if is_ours(e)], baseline
    return page, console, baseline


def show_node(page, node_id: int,
              ready: str = "(id) => window.app.graph.getNodeById(id)?.kilnView?.root.isConnected") -> None:
    """Zoom to 1 and put the node at the top left, so its DOM widgets are on screen (hidden when zoomed out);
    then wait until ``ready`` (a JS predicate of the node id) holds."""
    page.evaluate(
        """(id) => {
            const c = window.app.canvas, n = window.app.graph.getNodeById(id);
            c.ds.scale = 1; c.ds.offset = [-n.pos[0] + 80, -n.pos[1] + 60]; c.setDirty(true, true);
        }""",
        node_id,
    )
    page.wait_for_function(ready, arg=node_id, timeout=10_000)


VIEW_STATE = """(id) => {
    const v = window.app.graph.getNodeById(id)?.kilnView;
    if (!v) return null;
    const imgs = [...v.strip.querySelectorAll('img')];
    return {state: v.state, points: v.points.length, previews: v.previews.length,
            steps: v.points.map((p) => p[0]), previewSteps: v.previews.map((p) => p.step),
            loaded: imgs.filter((i) => i.complete && i.naturalWidth > 0).length, imgs: imgs.length,
            connected: v.root.isConnected, canvas: !!v.root.querySelector('canvas.kiln-chart'),
            draws: v.chart.drawCount, stats: v.stats.textContent, data: {...v.root.dataset}};
}"""

# Pixels of the smoothed-loss colour (#ff9f43) on the chart: the curve is really drawn, not just an empty canvas.
ORANGE_PIXELS = """(id) => {
    const c = window.app.graph.getNodeById(id).kilnView.canvas;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4)
        if (Math.abs(d[i] - 255) < 30 && Math.abs(d[i + 1] - 159) < 40 && Math.abs(d[i + 2] - 67) < 50) n++;
    return n;
}"""


def node_clip(page, node_id: int) -> dict[str, float]:
    box = page.evaluate(
        """(id) => {
            const n = window.app.graph.getNodeById(id), c = window.app.canvas;
            const r = c.canvas.getBoundingClientRect(), s = c.ds.scale;
            return {x: r.left + (n.pos[0] + c.ds.offset[0]) * s - 4, y: r.top + (n.pos[1] + c.ds.offset[1]) * s - 36,
                    width: n.size[0] * s + 8, height: n.size[1] * s + 40};
        }""",
        node_id,
    )
    return {k: max(0.0, v) for k, v in box.items()}


@pytest.mark.newest_frontend  # also on the newer frontend package when installed (conftest.py)
def test_live_chart_and_previews_update_while_training_and_come_back_after_reload(comfy, browser):
    started = time.monotonic()
    out = ARTIFACTS if comfy.frontend == "stock" else ARTIFACTS / f"frontend-{comfy.frontend}"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("live_view_*"):
        old.unlink()
    workflow = tiny_ui_workflow(comfy.get("/object_info"))
    # 1. The stock page (default graph, no Kiln node) and its own console errors: the baseline.
    page, console, baseline = open_stock_page(browser, comfy.url)

    # 2. Open the shipped workflow: the Train Steps node has the (empty) live view, nothing else changed.
    mark = console.mark()
    page.evaluate("(wf) => window.app.loadGraphData(wf)", workflow)
    show_node(page, TRAIN)
    idle = page.evaluate(VIEW_STATE, TRAIN)
    assert idle["state"] == "idle" and idle["canvas"] and idle["points"] == 0 and idle["imgs"] == 0
    before = page.evaluate("() => window.app.graph.serialize()")

    # 3. Run it (like pressing Run) and watch the view while it trains.
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    seen: list[dict[str, Any]] = []
    shot_running = out / "live_view_running.png"
    deadline = time.monotonic() + 300  # generous: a shared CI machine can be slow
    while time.monotonic() < deadline:
        s = page.evaluate(VIEW_STATE, TRAIN)
        seen.append(s)
        if s["state"] == "running" and s["loaded"] >= 1 and not shot_running.exists():
            page.screenshot(path=str(shot_running), clip=node_clip(page, TRAIN))
        if s["state"] == "done":
            break
        page.wait_for_timeout(100)
    else:
        pytest.fail(f"the run did not finish in time; last view state: {seen[-1]}\n{comfy.log()[-3000:]}")

    running = [s for s in seen if s["state"] == "running"]
    counts = [s["points"] for s in running]
    assert len(set(counts)) >= 3 and counts == sorted(counts), f"the chart did not grow live: {counts}"
    assert max(counts) >= PREVIEW_EVERY and any(s["previews"] >= 1 for s in running), running[-1]
    assert any("ETA" in s["stats"] and f"/{STEPS})" in s["stats"] for s in running), running[-1]["stats"]
    assert any(s["draws"] > 0 for s in running)
    assert shot_running.exists(), "no frame with a loaded preview image while running"

    done = page.evaluate(VIEW_STATE, TRAIN)
    assert done["steps"] == list(range(1, STEPS + 1))
    assert done["previewSteps"] == list(range(PREVIEW_EVERY, STEPS + 1, PREVIEW_EVERY))
    page.wait_for_function("(id) => { const v = window.app.graph.getNodeById(id).kilnView;"
                           " return [...v.strip.querySelectorAll('img')].every((i) => i.complete && i.naturalWidth > 0) }",
                           arg=TRAIN, timeout=10_000)
    page.wait_for_timeout(200)
    assert page.evaluate(ORANGE_PIXELS, TRAIN) > 50, "the smoothed loss curve is not on the chart canvas"

    # Hover: step and loss under the pointer.
    box = page.evaluate("(id) => { const r = window.app.graph.getNodeById(id).kilnView.canvas.getBoundingClientRect();"
                        " return {x: r.left, y: r.top, w: r.width, h: r.height} }", TRAIN)
    page.mouse.move(box["x"] + box["w"] * 0.6, box["y"] + box["h"] * 0.5)
    page.wait_for_timeout(200)
    hover = page.evaluate("(id) => window.app.graph.getNodeById(id).kilnView.chart.hover", TRAIN)
    assert hover and 1 <= hover["step"] <= STEPS and hover["loss"] > 0, hover
    page.screenshot(path=str(out / "live_view_done.png"), clip=node_clip(page, TRAIN))

    # Log scale toggle, then a preview enlarged by a click (Esc closes it).
    page.locator(".kiln-view button.kiln-toggle", has_text="log").first.click()
    assert page.evaluate("(id) => window.app.graph.getNodeById(id).kilnView.chart.logScale", TRAIN) is True
    page.locator(".kiln-view .kiln-strip figure").first.click()
    page.wait_for_selector(".kiln-lightbox img", timeout=5000)
    page.wait_for_function("() => document.querySelector('.kiln-lightbox img').naturalWidth > 0", timeout=5000)
    assert "step 10" in page.locator(".kiln-lightbox .kiln-caption").inner_text()
    page.screenshot(path=str(out / "live_view_lightbox.png"))
    page.keyboard.press("Escape")
    page.wait_for_selector(".kiln-lightbox", state="detached", timeout=5000)
    page.locator(".kiln-view button.kiln-toggle", has_text="log").first.click()  # back to linear for the next load

    # Nothing of the run is stored in the workflow: same widgets_values as the file, no history, no file names.
    saved = page.evaluate("() => window.app.graph.serialize()")
    train = next(n for n in saved["nodes"] if n["id"] == TRAIN)
    original = next(n for n in workflow["nodes"] if n["id"] == TRAIN)
    # The file's values, then the defaults of the widgets it has no value for (optional inputs added later: the
    # frontend fills them in), then null in the live view's slot (it never serialises) and the stock progress-text
    # widget's string; newer frontends (1.58) leave both slots out.
    info = comfy.get("/object_info")["KilnTrainSteps"]
    slots = widget_slots(info)
    filled = [(info["input"].get("optional", {}).get(name) or info["input"]["required"][name])[1]["default"]
              for name in slots[len(original["widgets_values"]):]]
    want = original["widgets_values"] + filled
    n = len(want)
    assert train["widgets_values"][:n] == want and train["widgets_values"][n:n + 1] in ([], [None])
    text = json.dumps(saved)
    assert "kiln_history" not in text and "kiln_previews" not in text and "lora_kiln/preview" not in text
    assert len(text) < len(json.dumps(before)) + 400, "the run made the saved workflow grow"

    run_errors = console.since(mark)

    # 4. Reload the page: the frontend restores the open workflow, the view gets its last run back.
    mark = console.mark()
    page.reload(wait_until="domcontentloaded")
    page.wait_for_function("(id) => window.app?.vueAppReady && window.app.graph?.getNodeById(id)?.kilnView",
                           arg=TRAIN, timeout=60_000)
    show_node(page, TRAIN)
    page.wait_for_function("(id) => window.app.graph.getNodeById(id).kilnView.state === 'restored'", arg=TRAIN,
                           timeout=15_000)
    after_reload = page.evaluate(VIEW_STATE, TRAIN)
    assert after_reload["steps"] == done["steps"] and after_reload["previewSteps"] == done["previewSteps"]
    page.wait_for_function("(id) => { const v = window.app.graph.getNodeById(id).kilnView;"
                           " return [...v.strip.querySelectorAll('img')].every((i) => i.complete && i.naturalWidth > 0) }",
                           arg=TRAIN, timeout=10_000)
    page.wait_for_timeout(200)
    assert page.evaluate(ORANGE_PIXELS, TRAIN) > 50
    page.screenshot(path=str(out / "live_view_after_reload.png"), clip=node_clip(page, TRAIN))

    # 5. Open the same workflow file again (a new workflow id): the same node with the same settings comes back too.
    page.evaluate("(wf) => window.app.loadGraphData(wf)", workflow)
    show_node(page, TRAIN)
    page.wait_for_function("(id) => window.app.graph.getNodeById(id).kilnView.state === 'restored'", arg=TRAIN,
                           timeout=15_000)
    reopened = page.evaluate(VIEW_STATE, TRAIN)
    assert reopened["steps"] == done["steps"] and reopened["previewSteps"] == done["previewSteps"]
    reload_errors = console.since(mark)

    # 6. Console: nothing from Kiln, and nothing the stock page does not log by itself.
    assert_no_new_console_errors(console, baseline, run_errors, reload_errors,
                                 str((out / "live_view_console.json").relative_to(ARTIFACTS)))
    page.close()
    print(f"browser live-view test ({comfy.frontend} frontend {comfy.frontend_version}) took "
          f"{time.monotonic() - started:.1f}s")


def test_live_view_of_a_train_steps_node_inside_a_subgraph(comfy, browser):
    """Events name the node by execution id ("<subgraph node>:<inner node>"); the inner node's view gets them."""
    workflow = tiny_ui_workflow(comfy.get("/object_info"))
    page = browser.new_page(viewport={"width": 1600, "height": 1400})  # Train Steps is a tall node
    console = Console(page)
    open_comfyui(page, comfy.url)
    page.evaluate("(wf) => window.app.loadGraphData(wf)", workflow)
    page.evaluate(
        """() => {
            const graph = window.app.graph, node = graph.getNodeById(4);
            for (const [name, value] of [["steps", 6], ["preview_every", 3], ["save_every", 0]])
                node.widgets.find((w) => w.name === name).value = value;
            const {node: outer, subgraph} = graph.convertToSubgraph(new Set([node]));
            window.__kiln = {outer, inner: subgraph.nodes.find((n) => n.type === "KilnTrainSteps"), events: []};
            window.comfyAPI.api.api.addEventListener("kiln.train.progress", (e) => window.__kiln.events.push(e.detail.node));
        }"""
    )
    inner_state = VIEW_STATE.replace("window.app.graph.getNodeById(id)", "window.__kiln.inner")
    assert page.evaluate(inner_state, 0)["state"] == "idle"
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        seen.append(page.evaluate(inner_state, 0))
        if seen[-1]["state"] == "done":
            break
        page.wait_for_timeout(100)
    else:
        pytest.fail(f"the subgraph run did not finish: {seen[-1]}\n{comfy.log()[-3000:]}")
    ids = set(page.evaluate("() => window.__kiln.events"))
    outer_id = page.evaluate("() => window.__kiln.outer.id")
    assert ids and all(i.startswith(f"{outer_id}:") for i in ids), ids
    assert any(s["state"] == "running" and s["points"] > 0 for s in seen), "no live update reached the inner node"
    done = seen[-1]
    assert done["steps"] == list(range(1, 7)) and done["previewSteps"] == [3, 6]

    # Open the subgraph: the inner node shows its chart and previews.
    page.evaluate("() => window.app.canvas.openSubgraph(window.__kiln.inner.graph)")
    page.evaluate(
        """() => { const c = window.app.canvas, n = window.__kiln.inner;
                   c.ds.scale = 1; c.ds.offset = [-n.pos[0] + 80, -n.pos[1] + 60]; c.setDirty(true, true); }"""
    )
    page.wait_for_function("() => window.__kiln.inner.kilnView.root.isConnected && "
                           "window.__kiln.inner.kilnView.chart.drawCount > 0", timeout=10_000)
    page.wait_for_timeout(300)
    assert page.evaluate(ORANGE_PIXELS.replace("window.app.graph.getNodeById(id)", "window.__kiln.inner"), 0) > 20
    page.screenshot(path=str(ARTIFACTS / "live_view_subgraph.png"))

    # Removing the node drops its view: later events for it reach nothing, and nothing throws.
    page.evaluate("() => { const n = window.__kiln.inner; n.graph.remove(n); }")
    assert page.evaluate("() => window.__kiln.inner.kilnView") is None
    assert not [e for e in console.entries if is_ours(e)], console.entries
    page.close()
