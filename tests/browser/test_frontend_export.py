"""kiln.py runs what the real frontend exports: ComfyUI's frontend in headless Chromium edits the shipped workflow
(a Reroute, a Note, a bypassed ModelSamplingDiscrete in the MODEL path, a Primitive driving Train Steps' steps, a
muted Preview Image), then ``headless/workflow_format.ui_to_api`` must give exactly the prompt the frontend's own
``graphToPrompt()`` queues, and ``kiln.py run`` trains from the saved file. A second graph turns Train Steps into a
subgraph with a promoted widget and compares the two conversions again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from safetensors import safe_open

from comfy_harness import REPO, load_workflow_format

pytestmark = pytest.mark.newest_frontend
ui_to_api = load_workflow_format().ui_to_api

STEPS = 2
# Widget values set in the page, by node type and widget name: a tiny, fast run on the server's test data.
PATCH = {
    "CheckpointLoaderSimple": {"ckpt_name": "tiny_sd15.safetensors"},
    "KilnLoadDataset": {"folder": "shapes", "resolution": 64},
    "KilnInjectLoRA": {"name": "frontend_export", "rank": 4, "alpha": 4},
    "KilnTrainSteps": {"learning_rate": 1e-3, "save_every": 0, "preview_every": 0, "preview_size": 64},
    "KilnSaveLoRA": {"filename": "frontend_export", "save_checkpoint": False},
}

LOAD = """async ([wf, patch]) => {
    await window.app.loadGraphData(wf);
    const g = window.app.graph;
    for (const node of g.nodes)
        for (const [name, value] of Object.entries(patch[node.type] ?? {}))
            node.widgets.find((w) => w.name === name).value = value;
}"""

EDIT = """async (steps) => {
    const g = window.app.graph, byType = (t) => g.nodes.find((n) => n.type === t);
    const slot = (node, name) => node.inputs.findIndex((i) => i.name === name);
    const ckpt = byType("CheckpointLoaderSimple"), data = byType("KilnLoadDataset");
    const inject = byType("KilnInjectLoRA"), train = byType("KilnTrainSteps");
    const add = (type) => { const n = LiteGraph.createNode(type); g.add(n); return n; };

    const sampling = add("ModelSamplingDiscrete");  // MODEL path: checkpoint -> (bypassed) sampling -> Inject LoRA
    ckpt.connect(0, sampling, 0);
    sampling.connect(0, inject, slot(inject, "model"));
    sampling.mode = LiteGraph.BYPASS ?? 4;

    const reroute = add("Reroute");  // VAE: checkpoint -> Reroute -> Load Dataset
    ckpt.connect(2, reroute, 0);
    reroute.connect(0, data, slot(data, "vae"));

    const note = add("Note");
    note.widgets[0].value = "exported by the frontend test";

    const primitive = add("PrimitiveNode");  // its value becomes Train Steps' steps
    primitive.connect(0, train, slot(train, "steps"));
    primitive.widgets[0].value = steps;

    const preview = add("PreviewImage");  // muted: dropped, with its link
    train.connect(train.outputs.findIndex((o) => o.name === "loss_graph"), preview, 0);
    preview.mode = LiteGraph.NEVER ?? 2;

    const p = await window.app.graphToPrompt();
    const added = [sampling, reroute, note, primitive, preview].map((n) => String(n.id));
    return {saved: window.app.graph.serialize(), exported: p.workflow, prompt: p.output, added};
}"""

SUBGRAPH = """async (steps) => {
    const g = window.app.graph, train = g.nodes.find((n) => n.type === "KilnTrainSteps");
    const primitive = LiteGraph.createNode("PrimitiveNode");  // wire steps from outside, so the subgraph gets
    g.add(primitive);                                          // a 'steps' input with a promoted widget
    primitive.connect(0, train, train.inputs.findIndex((i) => i.name === "steps"));
    g.convertToSubgraph(new Set([train]));
    g.remove(primitive);
    const sub = g.nodes.find((n) => n.isSubgraphNode?.());
    const widget = sub.widgets.find((w) => w.name === "steps");
    if (widget) widget.value = steps;
    const p = await window.app.graphToPrompt();
    return {saved: window.app.graph.serialize(), prompt: p.output, promoted: !!widget};
}"""


def without_meta(prompt: dict[str, Any]) -> dict[str, Any]:
    """The frontend's prompt minus ``_meta`` (titles, ignored by the backend and not produced by ui_to_api)."""
    return {nid: {"class_type": node["class_type"], "inputs": node["inputs"]} for nid, node in prompt.items()}


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_function(
        "() => window.app?.vueAppReady && window.app.graph && window.LiteGraph?.registered_node_types?.KilnTrainSteps",
        timeout=60_000)
    return page


def test_ui_to_api_matches_the_frontend_and_kiln_runs_the_exported_file(comfy, browser, tmp_path):
    object_info = comfy.get("/object_info")
    workflow = json.loads((REPO / "example_workflows" / "train_sd15_lora.json").read_text())
    page = open_page(browser, comfy.url)
    try:
        page.evaluate(LOAD, [workflow, PATCH])
        got = page.evaluate(EDIT, STEPS)
        page.evaluate(LOAD, [workflow, PATCH])
        sub = page.evaluate(SUBGRAPH, 3)
    finally:
        page.close()

    prompt = without_meta(got["prompt"])
    assert not set(got["added"]) & set(prompt), prompt  # the frontend sends none of the added nodes
    inject = next(n for n in prompt.values() if n["class_type"] == "KilnInjectLoRA")
    train = next(n for n in prompt.values() if n["class_type"] == "KilnTrainSteps")
    ckpt_id = next(i for i, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple")
    assert inject["inputs"]["model"] == [ckpt_id, 0] and train["inputs"]["steps"] == STEPS

    # (a) the saved UI file (Workflow -> Save) and the exported one convert to exactly the frontend's prompt
    saved = tmp_path / "edited_workflow.json"
    saved.write_text(json.dumps(got["saved"], indent=1))
    assert ui_to_api(json.loads(saved.read_text()), object_info) == prompt
    assert ui_to_api(got["exported"], object_info) == prompt
    assert sub["promoted"], "the frontend did not promote the steps widget onto the subgraph node"
    sub_prompt = without_meta(sub["prompt"])
    assert any(":" in nid for nid in sub_prompt), sub_prompt  # Train Steps now runs as <subgraph>:<inner id>
    assert ui_to_api(sub["saved"], object_info) == sub_prompt

    # (b) kiln.py trains from the saved file, with ComfyUI's own flags for its folders
    result = subprocess.run(
        [sys.executable, str(REPO / "kiln.py"), "run", str(saved), "--set", "KilnSaveLoRA.filename=frontend_export",
         "--", "--base-directory", str(comfy.base)],
        cwd=tmp_path, capture_output=True, text=True, timeout=420, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "workflow edited_workflow.json: success" in result.stdout
    lora = sorted((comfy.base / "models" / "loras").glob("frontend_export*.safetensors"),
                  key=lambda p: p.stat().st_mtime)[-1]
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_steps"] == str(STEPS)  # the Primitive's value, not the workflow's 500


def test_the_example_workflow_converts_like_the_frontend(comfy, browser):
    """No edits: the shipped file as the frontend loads and queues it (defaults for widgets the file lacks)."""
    object_info = comfy.get("/object_info")
    workflow = json.loads((REPO / "example_workflows" / "train_sd15_lora.json").read_text())
    page = open_page(browser, comfy.url)
    try:
        page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    finally:
        page.close()
    assert ui_to_api(workflow, object_info) == without_meta(prompt)
