"""The shipped workflows: UI files and API twins agree, every node exists, and the graphs run."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from comfy_harness import REPO, load_workflow_format

ui_to_api = load_workflow_format().ui_to_api
WORKFLOWS = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))


def test_the_two_documented_workflows_are_shipped():
    assert {"train_sd15_lora", "train_preview_train"} <= set(WORKFLOWS)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_and_api_twin_agree_and_every_node_exists(server, name):
    object_info = server.get("/object_info")
    ui = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    api = json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text())
    missing = {n["type"] for n in ui["nodes"]} - set(object_info)
    assert not missing, f"unknown node types in {name}.json: {missing}"
    assert ui_to_api(ui, object_info) == api


def test_train_preview_train_runs_with_a_stock_ksampler_between(server):
    api = json.loads((REPO / "example_workflows" / "api" / "train_preview_train.json").read_text())
    api["1"]["inputs"]["ckpt_name"] = "tiny_sd15.safetensors"
    api["2"]["inputs"].update(folder="shapes", resolution=64)
    api["3"]["inputs"]["name"] = "tpt"
    for node in ("4", "7"):
        api[node]["inputs"].update(steps=3, schedule_steps=6, scheduler="cosine")
    api["10"]["inputs"].update(width=64, height=64)
    api["11"]["inputs"]["steps"] = 2
    result = server.run(api)
    assert result.status == "success", result.error
    assert "13" in result.history["outputs"]  # the KSampler preview between the two Train Steps
    lrs = [h[2] for h in result.history["outputs"]["7"]["kiln_history"]]
    assert len(lrs) == 6 and all(a > b for a, b in zip(lrs, lrs[1:]))  # one cosine curve over both nodes
    with safe_open(str(server.base / "models" / "loras" / "tpt.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "6"
