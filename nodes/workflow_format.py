"""Convert between ComfyUI's UI (litegraph) workflow format and its API (prompt) format.

``ui_to_api`` does what the frontend does when you press Run, given ``/object_info``; the tests use it to
check that each shipped UI workflow and its API twin describe the same graph. ``api_to_ui`` lays out a UI
file from an API graph (a maintainer's tool: ``python nodes/workflow_format.py http://127.0.0.1:8188``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _inputs(info: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, type, options) in the frontend's order: required then optional."""
    out = []
    for group in ("required", "optional"):
        spec = info["input"].get(group, {})
        order = info.get("input_order", {}).get(group, list(spec))
        for name in order:
            entry = spec[name]
            kind = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            out.append((name, kind, opts))
    return out


def _is_widget(kind: Any, opts: dict[str, Any]) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def _widget_slots(info: dict[str, Any]) -> list[str | None]:
    """Names per widgets_values slot; None marks the frontend's 'control after generate' companion."""
    slots: list[str | None] = []
    for name, kind, opts in _inputs(info):
        if _is_widget(kind, opts):
            slots.append(name)
            if opts.get("control_after_generate"):
                slots.append(None)
    return slots


def ui_to_api(ui: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    links = {link[0]: link for link in ui["links"]}
    api: dict[str, Any] = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        inputs: dict[str, Any] = {}
        for name, value in zip(_widget_slots(info), node.get("widgets_values", [])):
            if name is not None:
                inputs[name] = value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def api_to_ui(api: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    ids = sorted(api, key=int)
    depth: dict[str, int] = {}

    def level(nid: str) -> int:
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)]
            depth[nid] = 1 + max((level(u) for u in ups), default=-1)
        return depth[nid]

    rows: dict[int, int] = {}
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid in ids:
        for name, value in api[nid]["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                link_id = len(links) + 1
                src, slot = value
                kind = object_info[api[src]["class_type"]]["output"][slot]
                links.append([link_id, int(src), slot, int(nid), name, kind])
                out_links.setdefault((src, slot), []).append(link_id)
    for order, nid in enumerate(ids):
        node = api[nid]
        info = object_info[node["class_type"]]
        col = level(nid)
        row = rows.get(col, 0)
        rows[col] = row + 1
        inputs, widgets = [], []
        for name, kind, opts in _inputs(info):
            value = node["inputs"].get(name)
            linked = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            if _is_widget(kind, opts):
                widgets.append(value if value is not None else opts.get("default"))
                if opts.get("control_after_generate"):
                    widgets.append("fixed")
            elif name in node["inputs"] or not linked:
                link_id = next((lk[0] for lk in links if lk[3] == int(nid) and lk[4] == name), None)
                inputs.append({"name": name, "type": kind if isinstance(kind, str) else "COMBO", "link": link_id})
        outputs = [
            {"name": oname, "type": otype, "links": out_links.get((nid, i), []), "slot_index": i}
            for i, (oname, otype) in enumerate(zip(info["output_name"], info["output"]))
        ]
        nodes.append({
            "id": int(nid), "type": node["class_type"], "pos": [40 + 380 * col, 40 + 330 * row], "size": [340, 280],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        })
    for link in links:  # litegraph wants the target slot index, not the input name
        target = next(n for n in nodes if n["id"] == link[3])
        link[4] = next(i for i, s in enumerate(target["inputs"]) if s["name"] == link[4])
    return {"last_node_id": max(int(i) for i in ids), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def main() -> int:
    """Regenerate example_workflows/*.json from example_workflows/api/*.json using a running server's /object_info."""
    import urllib.request

    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8188"
    object_info = json.loads(urllib.request.urlopen(url + "/object_info").read())
    root = Path(__file__).resolve().parents[1] / "example_workflows"
    for api_file in sorted((root / "api").glob("*.json")):
        ui = api_to_ui(json.loads(api_file.read_text()), object_info)
        (root / api_file.name).write_text(json.dumps(ui, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
