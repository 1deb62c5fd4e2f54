"""Convert between ComfyUI's UI (litegraph) workflow format and its API (prompt) format.

``ui_to_api`` does what the frontend does when you press Run, given ``/object_info``; the tests use it to
check that each shipped UI workflow and its API twin describe the same graph. ``api_to_ui`` lays out a UI
file from an API graph (a maintainer's tool: ``python headless/workflow_format.py http://127.0.0.1:8188``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

# Input types the stock frontend draws as widgets (its ``ComfyWidgets`` registry): each fills a widgets_values slot.
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "MARKDOWN", "IMAGEUPLOAD", "FILEUPLOAD", "COLOR",
                "IMAGECOMPARE", "TREESELECT", "MULTISELECT", "CHART", "GALLERIA", "SELECTBUTTON", "TEXTAREA"}
# Node types that live in the frontend only and never reach the server.
VIRTUAL_TYPES = {"Reroute", "Note", "MarkdownNote", "PrimitiveNode"}
NEVER, BYPASS = 2, 4  # litegraph node modes: muted, bypassed
SUBGRAPH_INPUT_ID, SUBGRAPH_OUTPUT_ID = -10, -20  # the IO nodes inside a subgraph definition
EXPORT_HINT = "export the workflow from ComfyUI with Workflow -> Export (API) and run that file"
_MISSING = object()


class WorkflowError(ValueError):
    """A UI workflow that cannot be converted; the message names the node and says what to do."""


def _inputs(info: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, type, options) in the frontend's order: required then optional."""
    out = []
    for group in ("required", "optional"):
        spec = info.get("input", {}).get(group) or {}
        order = info.get("input_order", {}).get(group, list(spec))
        for name in [*order, *(n for n in spec if n not in order)]:
            if name not in spec:
                continue
            entry = spec[name]
            kind = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            out.append((name, kind, opts))
    return out


def _is_combo(kind: Any) -> bool:
    return isinstance(kind, list) or kind == "COMBO"


def _is_widget(kind: Any, opts: dict[str, Any]) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def _companions(name: str, kind: Any, opts: dict[str, Any]) -> list[Any]:
    """Default values of the frontend-only widgets the frontend adds right after this input's widget.

    A remote combo's refresh button; 'control after generate' for an INT input that asks for it (or is named
    seed/noise_seed and does not say no); for a COMBO that asks for it, the control and its filter list.
    """
    extra: list[Any] = []
    remote = opts.get("remote")
    if isinstance(remote, dict) and remote.get("refresh_button"):
        extra.append("refresh")
    if kind == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
        extra.append("fixed")
    elif _is_combo(kind) and opts.get("control_after_generate"):
        extra += ["fixed", ""]
    return extra


def _widget_slots(info: dict[str, Any]) -> list[str | None]:
    """Names per widgets_values slot; None marks a frontend-only companion (e.g. 'control after generate')."""
    slots: list[str | None] = []
    for name, kind, opts in _inputs(info):
        if _is_widget(kind, opts):
            slots.append(name)
            slots += [None] * len(_companions(name, kind, opts))
    return slots


def _widget_default(kind: Any, opts: dict[str, Any]) -> Any:
    """The value a freshly created widget has (what the frontend sends for a value the file does not carry)."""
    if _is_combo(kind):
        options = kind if isinstance(kind, list) else opts.get("options") or []
        return opts.get("default") or (options[0] if options else _MISSING)
    if opts.get("default") is not None:
        return opts["default"]
    return {"INT": 0, "FLOAT": 0, "BOOLEAN": False, "STRING": ""}.get(kind, _MISSING)


def _named_values(node: dict[str, Any]) -> dict[str, Any] | None:
    """Widget values by name: newer frontends write ``widgets_values_named``; some write ``widgets_values`` as a dict."""
    for key in ("widgets_values_named", "widgets_values"):
        if isinstance(node.get(key), dict):
            return node[key]
    return None


def _widget_values(node: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """{input name: value} of a node's widgets: by name when the file has names, else widgets_values by position."""
    raw = _named_values(node)
    if raw is None:
        raw = node.get("widgets_values")
    specs = {name: (kind, opts) for name, kind, opts in _inputs(info) if _is_widget(kind, opts)}
    values: dict[str, Any] = {}
    if isinstance(raw, dict):
        values = {name: raw[name] for name in specs if name in raw}
    else:
        for name, value in zip(_widget_slots(info), raw or []):
            if name is not None:
                values[name] = value
    for name, (kind, opts) in specs.items():
        if name not in values and (default := _widget_default(kind, opts)) is not _MISSING:
            values[name] = default
    return values


def _valid_connection(a: Any, b: Any) -> bool:
    """litegraph's ``isValidConnection``: ``*``/empty match anything, case-insensitive, comma lists."""
    a = None if a in ("", "*", 0) else a
    b = None if b in ("", "*", 0) else b
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(_valid_connection(x, y) for x in a.split(",") for y in b.split(","))


class _Link(NamedTuple):
    origin_id: Any
    origin_slot: int
    target_id: Any
    target_slot: int
    type: Any


class _Graph(NamedTuple):
    nodes: dict[str, dict[str, Any]]
    links: dict[Any, _Link]


def _graph(data: dict[str, Any]) -> _Graph:
    links: dict[Any, _Link] = {}
    for entry in data.get("links") or []:
        if isinstance(entry, dict):  # subgraph definitions store links as objects
            links[entry["id"]] = _Link(entry["origin_id"], entry["origin_slot"], entry["target_id"],
                                       entry["target_slot"], entry.get("type"))
        elif entry:  # [id, origin_id, origin_slot, target_id, target_slot, type]
            links[entry[0]] = _Link(entry[1], entry[2], entry[3], entry[4], entry[5] if len(entry) > 5 else None)
    # native litegraph reroutes (``parentId`` on links, ``extra.reroutes``) are only waypoints: links stay direct
    return _Graph({str(n["id"]): n for n in data.get("nodes") or []}, links)


class _Node:
    """One node of the flattened graph; ``eid`` is its execution id (``"5"``, or ``"7:5"`` inside subgraph node 7)."""

    def __init__(self, eid: str, node: dict[str, Any], graph: _Graph, path: tuple[str, ...], parent: _Node | None,
                 kind: str) -> None:
        self.eid, self.node, self.graph, self.path = eid, node, graph, path
        self.parent = parent  # the subgraph node whose definition holds this node
        self.kind = kind  # "node", "virtual" or "subgraph"
        self.widgets: dict[str, Any] = {}  # input name -> widget value (a subgraph node: its promoted widgets)
        self.inner: _Graph | None = None  # a subgraph node's definition, as a graph

    @property
    def mode(self) -> int:
        return self.node.get("mode") or 0

    @property
    def type(self) -> str:
        return self.node.get("type", "")

    @property
    def label(self) -> str:
        title = self.node.get("title")
        return f"node {self.eid} ({self.type}{f', titled {title!r}' if title else ''})"

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.node.get("inputs") or []


class _Converter:
    def __init__(self, ui: dict[str, Any], object_info: dict[str, Any]) -> None:
        self.object_info = object_info
        self.subgraphs: dict[str, dict[str, Any]] = {}
        self._collect_subgraphs(ui)
        self.flat: dict[str, _Node] = {}
        self._flatten(_graph(ui), (), None, ())

    def _collect_subgraphs(self, data: dict[str, Any]) -> None:
        for definition in (data.get("definitions") or {}).get("subgraphs") or []:
            if definition.get("id") not in self.subgraphs:
                self.subgraphs[definition["id"]] = definition
                self._collect_subgraphs(definition)

    def _flatten(self, graph: _Graph, path: tuple[str, ...], parent: _Node | None, stack: tuple[str, ...]) -> None:
        for node in graph.nodes.values():
            kind_of = node.get("type", "")
            eid = ":".join([*path, str(node["id"])])
            if kind_of in self.subgraphs:
                if kind_of in stack:
                    raise WorkflowError(f"node {eid}: subgraph {kind_of} contains itself; fix the workflow in ComfyUI")
                definition = self.subgraphs[kind_of]
                dto = _Node(eid, node, graph, path, parent, "subgraph")
                dto.widgets = self._promoted_widgets(node)
                dto.inner = _graph(definition)
                self.flat[eid] = dto
                if dto.mode not in (NEVER, BYPASS):  # a muted or bypassed subgraph runs none of its nodes
                    self._flatten(dto.inner, (*path, str(node["id"])), dto, (*stack, kind_of))
                continue
            kind = "virtual" if kind_of in VIRTUAL_TYPES and kind_of not in self.object_info else "node"
            dto = _Node(eid, node, graph, path, parent, kind)
            self._check_type(dto)
            if kind == "node" and kind_of in self.object_info:
                dto.widgets = _widget_values(node, self.object_info[kind_of])
            self.flat[eid] = dto

    def _check_type(self, dto: _Node) -> None:
        if dto.kind != "node" or dto.type in self.object_info:
            return
        head, sep, name = dto.type.replace("/", ">", 1).partition(">")
        if sep and head == "workflow":  # a (legacy) group node: "workflow>Name", defined in extra.groupNodes
            raise WorkflowError(
                f"{dto.label} is a group node, which kiln.py cannot expand: open the workflow in ComfyUI and "
                f"convert/unpack the group node (right-click it -> Convert to nodes), or {EXPORT_HINT}")
        if dto.mode not in (NEVER, BYPASS):
            raise WorkflowError(
                f"{dto.label}: ComfyUI has no node type {dto.type!r}; install the custom node pack that provides "
                f"it (ComfyUI-Manager: Install Missing Custom Nodes) and run again. If it is a frontend-only node of "
                f"a node pack (a Set/Get node, say), {EXPORT_HINT}")

    @staticmethod
    def _promoted_widgets(node: dict[str, Any]) -> dict[str, Any]:
        """A subgraph node's widgets: one per input that carries a widget (promoted from inside), in input order."""
        names = [slot["widget"]["name"] for slot in node.get("inputs") or [] if (slot.get("widget") or {}).get("name")]
        named = _named_values(node)
        if named is not None:
            return {name: named[name] for name in names if name in named}
        return {name: value for name, value in zip(names, node.get("widgets_values") or []) if value is not None}

    def _at(self, path: tuple[str, ...], node_id: Any, link_id: Any, user: _Node) -> _Node:
        dto = self.flat.get(":".join([*path, str(node_id)]))
        if dto is None:
            raise WorkflowError(f"{user.label}: link {link_id} comes from node {node_id}, which is not in the "
                                f"workflow; open it in ComfyUI, reconnect the input and save it again")
        return dto

    # ---- link resolution, as the frontend's ExecutableNodeDTO.resolveInput / resolveOutput -------------------
    def resolve_input(self, dto: _Node, index: int, visited: set, want: Any = None) -> tuple | None:
        """Where input ``index`` really comes from: ("link", id, slot), ("value", v) or None (nothing)."""
        key = (dto.eid, "I", index)
        if key in visited:
            raise WorkflowError(f"{dto.label}: circular links through its input {index}; fix the workflow in ComfyUI")
        visited.add(key)
        if index >= len(dto.inputs):
            raise WorkflowError(f"{dto.label} has no input {index}; open the workflow in ComfyUI and save it again")
        slot = dto.inputs[index]
        link_id = slot.get("link")
        if link_id is None:
            return None
        link = dto.graph.links.get(link_id)
        if link is None:
            raise WorkflowError(f"{dto.label}: input {slot.get('name')!r} uses link {link_id}, which is not in the "
                                f"workflow; open it in ComfyUI, reconnect the input and save it again")
        if dto.parent is not None and link.origin_id == SUBGRAPH_INPUT_ID:  # from the subgraph's input
            outer = dto.parent
            if link.origin_slot >= len(outer.inputs):
                raise WorkflowError(f"{outer.label} has no input {link.origin_slot}; open the workflow in ComfyUI "
                                    f"and save it again")
            outer_slot = outer.inputs[link.origin_slot]
            if outer_slot.get("link") is None:  # unconnected outside: the subgraph node's (promoted) widget
                name = (outer_slot.get("widget") or {}).get("name")
                return ("value", outer.widgets[name]) if name in outer.widgets else None
            return self.resolve_input(outer, link.origin_slot, visited)
        origin = self._at(dto.path, link.origin_id, link_id, dto)
        return self.resolve_output(origin, link.origin_slot, slot.get("type") if want is None else want, visited)

    def resolve_output(self, dto: _Node, index: int, want: Any, visited: set) -> tuple | None:
        key = (dto.eid, "O", index)
        if key in visited:
            raise WorkflowError(f"{dto.label}: circular links through its output {index}; fix the workflow in ComfyUI")
        visited.add(key)
        if dto.mode == NEVER:  # a muted node gives nothing (a widget fed by it keeps its own value)
            return None
        if dto.mode == BYPASS:  # its inputs pass through: the one matching the consumer's type
            match = self._bypass_input(dto, index, want)
            return None if match is None else self.resolve_input(dto, match, visited)
        if dto.kind == "subgraph":
            outputs = self.subgraphs[dto.type].get("outputs") or []
            if index >= len(outputs):
                raise WorkflowError(f"{dto.label} has no output {index}; open the workflow in ComfyUI and save it again")
            link_ids = outputs[index].get("linkIds") or []
            link = dto.inner.links.get(link_ids[0]) if link_ids and dto.inner else None
            if link is None:
                return None
            if link.origin_id == SUBGRAPH_INPUT_ID:
                raise WorkflowError(f"{dto.label}: inside the subgraph, its output {index} is wired straight to "
                                    f"one of its inputs; connect a node in between in ComfyUI, or {EXPORT_HINT}")
            inner = self._at((*dto.path, str(dto.node["id"])), link.origin_id, link_ids[0], dto)
            return self.resolve_output(inner, link.origin_slot, want, visited)
        if dto.kind == "virtual":  # a Reroute forwards its input; a Primitive/Note has none
            return self.resolve_input(dto, index, visited, want) if index < len(dto.inputs) else None
        return ("link", dto.eid, index)

    @staticmethod
    def _bypass_input(dto: _Node, index: int, want: Any) -> int | None:
        """The frontend's rule: the input opposite the output if both types fit, else the first of the same type,
        else the first compatible one."""
        inputs, outputs = dto.inputs, dto.node.get("outputs") or []
        if index >= len(outputs):
            raise WorkflowError(f"{dto.label} has no output {index}; open the workflow in ComfyUI and save it again")
        if not inputs:
            return None
        if want in ("*", ""):
            return index if len(inputs) > index else 0
        out_type = outputs[index].get("type")
        if index < len(inputs):
            opposite = inputs[index].get("type")
            if _valid_connection(opposite, out_type) and _valid_connection(opposite, want):
                return index
        for i, slot in enumerate(inputs):
            if slot.get("type") == want:
                return i
        for i, slot in enumerate(inputs):
            if _valid_connection(slot.get("type"), out_type) and _valid_connection(slot.get("type"), want):
                return i
        return None

    # ---- PrimitiveNode.applyToGraph ---------------------------------------------------------------------------
    def apply_primitives(self) -> None:
        """A Primitive's value becomes the widget value of every input it is wired to (its direct links)."""
        for dto in self.flat.values():
            if dto.kind != "virtual" or dto.type != "PrimitiveNode":
                continue
            raw = dto.node.get("widgets_values")
            values = list(raw.values()) if isinstance(raw, dict) else list(raw or [])
            outputs = dto.node.get("outputs") or []
            if not values or not outputs:
                continue
            value = values[0]
            if (dto.node.get("properties") or {}).get("Run widget replace on values") and isinstance(value, str) \
                    and "%" in value:
                log.warning("%s: 'Run widget replace on values' is on; %r is sent as written", dto.label, value)
            for link_id in outputs[0].get("links") or []:
                link = dto.graph.links.get(link_id)
                if link is None:
                    continue
                target = self.flat.get(":".join([*dto.path, str(link.target_id)]))
                if target is None or link.target_slot >= len(target.inputs):
                    continue
                name = (target.inputs[link.target_slot].get("widget") or {}).get("name")
                if name is not None and name in target.widgets:
                    target.widgets[name] = value

    def prompt(self) -> dict[str, Any]:
        self.apply_primitives()
        api: dict[str, Any] = {}
        for dto in self.flat.values():
            if dto.kind != "node" or dto.mode in (NEVER, BYPASS):
                continue
            inputs = {name: _wrap(value) for name, value in dto.widgets.items()}
            for index, slot in enumerate(dto.inputs):
                resolved = self.resolve_input(dto, index, set())
                if resolved is None:
                    continue
                if resolved[0] == "value":
                    inputs[slot["name"]] = _wrap(resolved[1])
                else:
                    inputs[slot["name"]] = [resolved[1], resolved[2]]
            api[dto.eid] = {"class_type": dto.type, "inputs": inputs}
        for node in api.values():  # links to nodes that are not sent go, as the frontend drops them
            for name, value in list(node["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and value[0] not in api:
                    del node["inputs"][name]
        return api


def _wrap(value: Any) -> Any:
    """List values travel as ``{"__value__": [...]}`` (a two-item list would read as a link)."""
    return {"__value__": value} if isinstance(value, list) else value


def ui_to_api(ui: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """The API prompt the frontend would queue for this UI workflow (its ``graphToPrompt``), given ``/object_info``.

    Bypassed nodes (mode 4) pass each consumer the input of the same type; muted nodes (mode 2) and the links out
    of them are dropped; Reroutes (nodes and native link reroutes) are followed; Notes are skipped; a Primitive's
    value goes to the widgets it feeds; subgraphs are flattened (ids ``outer:inner``). Raises ``WorkflowError``
    naming the node for group nodes, unknown node types and broken links.
    """
    if not isinstance(ui, dict) or not isinstance(ui.get("nodes"), list):
        raise WorkflowError("not a ComfyUI UI workflow (no 'nodes' list); save it from ComfyUI with Workflow -> Save")
    return _Converter(ui, object_info).prompt()


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
                widgets += _companions(name, kind, opts)
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
