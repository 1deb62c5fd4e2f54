"""The template browser's view of this package: ComfyUI lists and serves the UI workflows in ``example_workflows/``.

ComfyUI serves a pack's templates from the first of example_workflows/, example/, examples/, workflow/, workflows/
that exists (``app/custom_node_manager.py``), under the pack's folder name in ``custom_nodes`` (``lora-kiln``, as
the harness links it). The listing globs ``*.json`` of all five folders, so a stray JSON in ``examples/`` would be
listed but 404 (the first existing folder shadows the others).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from comfy_harness import REPO

PACK = "lora-kiln"  # the folder name ComfyServer links this checkout under in custom_nodes/


def ui_workflows() -> dict[str, dict]:
    out = {}
    for path in sorted((REPO / "example_workflows").glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(data.get("nodes"), list) and "links" in data, f"{path.name} is not a UI-format workflow"
        out[path.stem] = data
    return out


def test_every_example_workflow_is_a_listed_and_served_template(server):
    files = ui_workflows()
    assert files, "no UI workflow in example_workflows/"
    listing = server.get("/workflow_templates")
    assert PACK in listing, f"{PACK} not in the template listing: {sorted(listing)}"
    assert sorted(listing[PACK]) == sorted(files), listing[PACK]

    for name, data in files.items():
        url = f"{server.url}/api/workflow_templates/{PACK}/{name}.json"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                status, body = r.status, r.read()
        except urllib.error.HTTPError as e:
            pytest.fail(f"{url} answered {e.code}: the template browser cannot open {name}")
        assert status == 200
        assert json.loads(body) == data, f"{name}.json served differs from example_workflows/{name}.json"
