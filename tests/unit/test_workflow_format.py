"""UI -> API workflow conversion (``headless/workflow_format.py``), on small hand-written graphs.

Each case is what ComfyUI's frontend (``graphToPrompt``, ``ExecutableNodeDTO.resolveInput/resolveOutput``) does
with it; ``tests/browser/test_frontend_export.py`` checks the same conversion against the real frontend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load():
    from comfy_harness import load_workflow_format  # the module has no ComfyUI import; loaded by path

    return load_workflow_format()


wf = _load()


def spec(kind: Any, **opts: Any) -> list[Any]:
    return [kind, opts]


OBJECT_INFO: dict[str, Any] = {
    "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": spec(["a.safetensors", "b.safetensors"])}},
                               "output": ["MODEL", "CLIP", "VAE"]},
    "LoraLoader": {"input": {"required": {
        "model": spec("MODEL"), "clip": spec("CLIP"), "lora_name": spec(["x.safetensors"]),
        "strength_model": spec("FLOAT", default=1.0), "strength_clip": spec("FLOAT", default=1.0)}},
        "output": ["MODEL", "CLIP"]},
    "ClipFirst": {"input": {"required": {"clip": spec("CLIP"), "model": spec("MODEL")}}, "output": ["MODEL"]},
    "ModelSamplingDiscrete": {"input": {"required": {"model": spec("MODEL"), "sampling": spec(["eps", "v_prediction"]),
                                                     "zsnr": spec("BOOLEAN", default=False)}}, "output": ["MODEL"]},
    "CLIPTextEncode": {"input": {"required": {"text": spec("STRING", multiline=True), "clip": spec("CLIP")}},
                       "output": ["CONDITIONING"]},
    "KSampler": {"input": {"required": {
        "model": spec("MODEL"), "seed": spec("INT", default=0), "steps": spec("INT", default=20),
        "cfg": spec("FLOAT", default=8.0), "positive": spec("CONDITIONING")}},
        "input_order": {"required": ["model", "seed", "steps", "cfg", "positive"]}, "output": ["LATENT"]},
    "Train": {"input": {"required": {"model": spec("MODEL"), "steps": spec("INT", default=100),
                                     "rate": spec("FLOAT", default=1e-4), "seed": spec("INT", control_after_generate=False),
                                     "sched": spec("COMBO", options=["constant", "cosine"], control_after_generate=True),
                                     "label": spec("STRING", default="run")},
                        "optional": {"sizes": spec("STRING", forceInput=True), "note": spec("STRING", default="hi")}},
              "output": ["MODEL"]},
    "IntSource": {"input": {"required": {}}, "output": ["INT"]},
    "Lists": {"input": {"required": {"model": spec("MODEL"), "ids": spec("STRING")}}, "output": ["MODEL"]},
}


class UI:
    """A litegraph UI workflow built by hand: nodes with typed slots and links between them."""

    def __init__(self) -> None:
        self.nodes: dict[int, dict[str, Any]] = {}
        self.links: list[list[Any]] = []
        self.extra: dict[str, Any] = {}
        self.definitions: dict[str, Any] | None = None

    def add(self, node_id: int, type_: str, widgets: Any = None, inputs: tuple = (), outputs: tuple = (),
            mode: int = 0, **extra: Any) -> dict[str, Any]:
        node = {"id": node_id, "type": type_, "mode": mode, "pos": [0, 0], "size": [100, 100], "flags": {},
                "inputs": [{"name": i[0], "type": i[1], "link": None, **({"widget": {"name": i[2]}} if len(i) > 2 else {})}
                           for i in inputs],
                "outputs": [{"name": o[0], "type": o[1], "links": []} for o in outputs],
                "properties": {}, "widgets_values": [] if widgets is None else widgets, **extra}
        self.nodes[node_id] = node
        return node

    def link(self, src: int, src_slot: int, dst: int, dst_slot: int, **extra: Any) -> int:
        link_id = len(self.links) + 1
        kind = self.nodes[src]["outputs"][src_slot]["type"]
        self.links.append([link_id, src, src_slot, dst, dst_slot, kind])
        self.nodes[src]["outputs"][src_slot]["links"].append(link_id)
        self.nodes[dst]["inputs"][dst_slot]["link"] = link_id
        if extra.get("parent_id") is not None:  # a native litegraph reroute on the link (links as objects keep it)
            self.extra.setdefault("reroutes", []).append({"id": extra["parent_id"], "pos": [0, 0], "linkIds": [link_id]})
        return link_id

    def data(self) -> dict[str, Any]:
        out = {"last_node_id": max(self.nodes, default=0), "last_link_id": len(self.links),
               "nodes": list(self.nodes.values()), "links": self.links, "groups": [], "config": {},
               "extra": self.extra, "version": 0.4}
        if self.definitions:
            out["definitions"] = self.definitions
        return out


def base_graph(lora_mode: int = 0, sampling_mode: int = 0) -> UI:
    """Checkpoint -> LoraLoader -> ModelSamplingDiscrete -> KSampler; the LoRA's CLIP -> CLIPTextEncode -> positive."""
    ui = UI()
    ui.add(1, "CheckpointLoaderSimple", ["b.safetensors"], outputs=(("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")))
    ui.add(2, "LoraLoader", ["x.safetensors", 0.5, 0.25], inputs=(("model", "MODEL"), ("clip", "CLIP")),
           outputs=(("MODEL", "MODEL"), ("CLIP", "CLIP")), mode=lora_mode)
    ui.add(3, "ModelSamplingDiscrete", ["v_prediction", True], inputs=(("model", "MODEL"),), outputs=(("MODEL", "MODEL"),),
           mode=sampling_mode)
    ui.add(4, "CLIPTextEncode", ["a cat"], inputs=(("clip", "CLIP"),), outputs=(("CONDITIONING", "CONDITIONING"),))
    ui.add(5, "KSampler", [7, "randomize", 12, 6.5],
           inputs=(("model", "MODEL"), ("positive", "CONDITIONING"), ("seed", "INT", "seed")),
           outputs=(("LATENT", "LATENT"),))
    ui.link(1, 0, 2, 0)
    ui.link(1, 1, 2, 1)
    ui.link(2, 0, 3, 0)
    ui.link(3, 0, 5, 0)
    ui.link(2, 1, 4, 0)
    ui.link(4, 0, 5, 1)
    return ui


def convert(ui: UI | dict[str, Any]) -> dict[str, Any]:
    return wf.ui_to_api(ui.data() if isinstance(ui, UI) else ui, OBJECT_INFO)


def test_a_plain_graph_gives_widgets_by_position_and_links_with_the_seed_control_skipped():
    api = convert(base_graph())
    assert set(api) == {"1", "2", "3", "4", "5"}
    assert api["5"] == {"class_type": "KSampler", "inputs": {
        "seed": 7, "steps": 12, "cfg": 6.5, "model": ["3", 0], "positive": ["4", 0]}}
    assert api["2"]["inputs"] == {"lora_name": "x.safetensors", "strength_model": 0.5, "strength_clip": 0.25,
                                  "model": ["1", 0], "clip": ["1", 1]}
    assert api["3"]["inputs"] == {"sampling": "v_prediction", "zsnr": True, "model": ["2", 0]}


def test_bypassed_nodes_pass_the_input_of_the_same_type_through_a_chain():
    api = convert(base_graph(lora_mode=4, sampling_mode=4))
    assert set(api) == {"1", "4", "5"}
    assert api["5"]["inputs"]["model"] == ["1", 0]  # through ModelSamplingDiscrete and the LoRA's MODEL input
    assert api["4"]["inputs"]["clip"] == ["1", 1]  # the LoRA's CLIP output -> its CLIP input


def test_bypass_matches_by_type_not_by_position():
    ui = base_graph()
    lora = ui.nodes[2]  # the same links, but a node whose MODEL output sits opposite a CLIP input
    lora.update(type="ClipFirst", mode=4, widgets_values=[], inputs=[{"name": "clip", "type": "CLIP", "link": 2},
                                                                  {"name": "model", "type": "MODEL", "link": 1}])
    ui.links[0][4], ui.links[1][4] = 1, 0
    api = convert(ui)
    assert api["3"]["inputs"]["model"] == ["1", 0]  # output 0 (MODEL) is opposite a CLIP input: the MODEL one
    assert api["4"]["inputs"]["clip"] == ["1", 1]  # output 1 (CLIP): the first CLIP input


def test_a_bypassed_node_without_a_matching_input_leaves_the_consumer_unconnected():
    ui = base_graph(sampling_mode=4)
    ui.nodes[3]["inputs"][0]["type"] = "LATENT"  # no MODEL input to pass through
    api = convert(ui)
    assert "model" not in api["5"]["inputs"] and api["5"]["inputs"]["seed"] == 7


def test_muted_nodes_are_dropped_with_the_links_out_of_them():
    ui = base_graph(sampling_mode=2)
    ui.add(6, "KSampler", [1, "fixed", 2, 3.0], inputs=(("model", "MODEL"), ("positive", "CONDITIONING"),
                                                        ("steps", "INT", "steps")), outputs=(("LATENT", "LATENT"),))
    ui.link(3, 0, 6, 0)
    ui.link(3, 0, 6, 2)  # a widget converted to a socket, fed by the muted node: it keeps its own value
    api = convert(ui)
    assert "3" not in api
    assert "model" not in api["5"]["inputs"] and api["5"]["inputs"]["positive"] == ["4", 0]
    assert api["6"]["inputs"] == {"seed": 1, "steps": 2, "cfg": 3.0}


def test_reroute_nodes_and_native_reroutes_are_followed_to_the_source():
    ui = base_graph(sampling_mode=4)
    ui.add(10, "Reroute", inputs=(("", "*"),), outputs=(("", "MODEL"),))
    ui.add(11, "Reroute", inputs=(("", "*"),), outputs=(("", "MODEL"),), mode=4)
    ui.nodes[3]["inputs"][0]["link"] = None
    ui.nodes[2]["outputs"][0]["links"] = []
    ui.link(2, 0, 10, 0)
    ui.link(10, 0, 11, 0)
    ui.link(11, 0, 3, 0)  # LoRA -> Reroute -> (bypassed) Reroute -> bypassed ModelSampling -> KSampler
    ui.nodes[4]["inputs"][0]["link"] = None
    ui.link(2, 1, 4, 0, parent_id=1)  # a native reroute on the CLIP link
    api = convert(ui)
    assert "10" not in api and "11" not in api
    assert api["5"]["inputs"]["model"] == ["2", 0]
    assert api["4"]["inputs"]["clip"] == ["2", 1]


def test_notes_are_skipped_and_need_no_object_info():
    ui = base_graph()
    ui.add(20, "Note", ["remember the trigger word"])
    ui.add(21, "MarkdownNote", ["# hi"])
    assert set(convert(ui)) == {"1", "2", "3", "4", "5"}


def test_a_primitive_sets_the_widgets_it_is_wired_to():
    ui = base_graph()
    ui.add(30, "PrimitiveNode", [42, "fixed"], outputs=(("INT", "INT"),))
    ui.add(6, "KSampler", [1, "fixed", 2, 3.0], inputs=(("model", "MODEL"), ("positive", "CONDITIONING"),
                                                        ("seed", "INT", "seed")), outputs=(("LATENT", "LATENT"),))
    ui.link(30, 0, 5, 2)
    ui.link(30, 0, 6, 2)
    api = convert(ui)
    assert "30" not in api
    assert api["5"]["inputs"]["seed"] == 42 and api["6"]["inputs"]["seed"] == 42
    assert api["5"]["inputs"]["steps"] == 12  # nothing else changes


def test_a_widget_converted_to_a_socket_takes_its_link_and_companion_slots_are_skipped():
    ui = UI()
    ui.add(1, "CheckpointLoaderSimple", ["a.safetensors"], outputs=(("MODEL", "MODEL"),))
    ui.add(2, "IntSource", [], outputs=(("INT", "INT"),))
    ui.add(8, "Train", [5, 1e-3, 9, "cosine", "fixed", "", "lbl"], inputs=(("model", "MODEL"), ("steps", "INT", "steps")),
           outputs=(("MODEL", "MODEL"),))
    ui.add(9, "SomethingUninstalled", outputs=(("INT", "INT"),), mode=2)  # muted: needs no object_info
    ui.link(1, 0, 8, 0)
    ui.link(2, 0, 8, 1)
    api = convert(ui)
    assert set(api) == {"1", "2", "8"}
    assert api["8"]["inputs"] == {"model": ["1", 0], "steps": ["2", 0], "rate": 1e-3, "seed": 9, "sched": "cosine",
                                  "label": "lbl", "note": "hi"}  # COMBO control: 2 companions; note: its default


def test_widget_values_as_a_dict_and_missing_values_take_the_defaults():
    ui = UI()
    ui.add(1, "CheckpointLoaderSimple", {"ckpt_name": "a.safetensors"}, outputs=(("MODEL", "MODEL"),))
    ui.add(2, "Train", {"steps": 3, "control_after_generate": "fixed", "sched": "constant"},
           inputs=(("model", "MODEL"),), outputs=(("MODEL", "MODEL"),))
    ui.add(3, "Train", [4], inputs=(("model", "MODEL"),), outputs=(("MODEL", "MODEL"),))
    ui.link(1, 0, 2, 0)
    ui.link(2, 0, 3, 0)
    api = convert(ui)
    assert api["1"]["inputs"] == {"ckpt_name": "a.safetensors"}
    assert api["2"]["inputs"] == {"model": ["1", 0], "steps": 3, "rate": 1e-4, "seed": 0, "sched": "constant",
                                  "label": "run", "note": "hi"}
    assert api["3"]["inputs"]["steps"] == 4 and api["3"]["inputs"]["sched"] == "constant"


def test_widgets_values_named_wins_over_the_positional_list():
    ui = UI()
    ui.add(1, "CheckpointLoaderSimple", ["a.safetensors"], outputs=(("MODEL", "MODEL"),))
    ui.add(2, "KSampler", [0, "fixed", 0, 0.0], inputs=(("model", "MODEL"),), outputs=(("LATENT", "LATENT"),),
           widgets_values_named={"seed": 11, "control_after_generate": "fixed", "steps": 12, "cfg": 1.5})
    ui.link(1, 0, 2, 0)
    assert convert(ui)["2"]["inputs"] == {"model": ["1", 0], "seed": 11, "steps": 12, "cfg": 1.5}


def test_list_values_are_wrapped_so_they_do_not_read_as_links():
    ui = UI()
    ui.add(1, "CheckpointLoaderSimple", ["a.safetensors"], outputs=(("MODEL", "MODEL"),))
    ui.add(2, "Lists", [["3", 0]], inputs=(("model", "MODEL"),), outputs=(("MODEL", "MODEL"),))
    ui.link(1, 0, 2, 0)
    assert convert(ui)["2"]["inputs"]["ids"] == {"__value__": ["3", 0]}


def subgraph_ui(promoted: int | None = 9) -> UI:
    """Checkpoint -> [subgraph 8: LoraLoader 4 -> ModelSamplingDiscrete 5] -> KSampler 6; the subgraph's second
    input feeds the LoRA's strength_model widget and is left unconnected outside (a promoted widget)."""
    ui = UI()
    ui.add(1, "CheckpointLoaderSimple", ["a.safetensors"], outputs=(("MODEL", "MODEL"), ("CLIP", "CLIP")))
    sub_id = "0f1e2d3c-0000-4000-8000-000000000001"
    ui.add(8, sub_id, [] if promoted is None else [promoted],
           inputs=(("model", "MODEL"), ("clip", "CLIP"), ("strength", "FLOAT", "strength")),
           outputs=(("MODEL", "MODEL"),))
    ui.add(6, "KSampler", [1, "fixed", 2, 3.0], inputs=(("model", "MODEL"),), outputs=(("LATENT", "LATENT"),))
    ui.link(1, 0, 8, 0)
    ui.link(1, 1, 8, 1)
    ui.link(8, 0, 6, 0)
    inner = [
        {"id": 4, "type": "LoraLoader", "mode": 0, "widgets_values": ["x.safetensors", 1.0, 0.75],
         "inputs": [{"name": "model", "type": "MODEL", "link": 1}, {"name": "clip", "type": "CLIP", "link": 2},
                    {"name": "strength_model", "type": "FLOAT", "widget": {"name": "strength_model"}, "link": 3}],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [4]}, {"name": "CLIP", "type": "CLIP", "links": []}]},
        {"id": 5, "type": "ModelSamplingDiscrete", "mode": 0, "widgets_values": ["eps", False],
         "inputs": [{"name": "model", "type": "MODEL", "link": 4}],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [5]}]},
    ]
    links = [
        {"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 4, "target_slot": 0, "type": "MODEL"},
        {"id": 2, "origin_id": -10, "origin_slot": 1, "target_id": 4, "target_slot": 1, "type": "CLIP"},
        {"id": 3, "origin_id": -10, "origin_slot": 2, "target_id": 4, "target_slot": 2, "type": "FLOAT"},
        {"id": 4, "origin_id": 4, "origin_slot": 0, "target_id": 5, "target_slot": 0, "type": "MODEL", "parentId": 1},
        {"id": 5, "origin_id": 5, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "MODEL"},
    ]
    ui.definitions = {"subgraphs": [{
        "id": sub_id, "name": "LoRA + sampling", "nodes": inner, "links": links,
        "inputs": [{"name": "model", "type": "MODEL", "linkIds": [1]}, {"name": "clip", "type": "CLIP", "linkIds": [2]},
                   {"name": "strength", "type": "FLOAT", "linkIds": [3]}],
        "outputs": [{"name": "MODEL", "type": "MODEL", "linkIds": [5]}],
        "inputNode": {"id": -10}, "outputNode": {"id": -20}, "widgets": []}]}
    return ui


def test_subgraphs_are_flattened_with_outer_colon_inner_ids_and_promoted_widgets():
    api = convert(subgraph_ui())
    assert set(api) == {"1", "8:4", "8:5", "6"}
    assert api["8:4"]["inputs"] == {"lora_name": "x.safetensors", "strength_model": 9, "strength_clip": 0.75,
                                    "model": ["1", 0], "clip": ["1", 1]}
    assert api["8:5"]["inputs"]["model"] == ["8:4", 0]
    assert api["6"]["inputs"]["model"] == ["8:5", 0]


def test_a_subgraph_input_without_a_promoted_value_keeps_the_inner_widget():
    assert convert(subgraph_ui(promoted=None))["8:4"]["inputs"]["strength_model"] == 1.0


def test_a_bypassed_node_inside_a_subgraph_and_a_bypassed_subgraph_node():
    ui = subgraph_ui()
    ui.definitions["subgraphs"][0]["nodes"][1]["mode"] = 4
    api = convert(ui)
    assert "8:5" not in api and api["6"]["inputs"]["model"] == ["8:4", 0]
    ui.nodes[8]["mode"] = 4
    api = convert(ui)
    assert set(api) == {"1", "6"} and api["6"]["inputs"]["model"] == ["1", 0]
    ui.nodes[8]["mode"] = 2  # muted: nothing inside runs, and its consumer gets nothing
    api = convert(ui)
    assert set(api) == {"1", "6"} and "model" not in api["6"]["inputs"]


def test_group_nodes_are_refused_with_what_to_do():
    ui = base_graph()
    ui.add(40, "workflow>my group", [1, 2], outputs=(("MODEL", "MODEL"),))
    ui.extra["groupNodes"] = {"my group": {"nodes": [], "links": []}}
    with pytest.raises(wf.WorkflowError) as err:
        convert(ui)
    message = str(err.value)
    assert "node 40" in message and "workflow>my group" in message
    assert "convert/unpack the group node" in message and "Workflow -> Export (API)" in message


def test_unknown_node_types_name_the_node_and_the_missing_pack():
    ui = base_graph()
    ui.add(41, "SuperUpscaler", [2], title="Upscale it")
    with pytest.raises(wf.WorkflowError) as err:
        convert(ui)
    message = str(err.value)
    assert "node 41" in message and "'SuperUpscaler'" in message and "Upscale it" in message
    assert "custom node pack" in message
    ui.nodes[41]["mode"] = 4  # bypassed: it never runs, so it needs no node pack
    assert "41" not in convert(ui)


def test_a_link_id_missing_from_the_links_is_an_error_naming_the_node():
    ui = base_graph()
    ui.nodes[5]["inputs"][1]["link"] = 999
    with pytest.raises(wf.WorkflowError, match=r"node 5 \(KSampler\).*'positive'.*link 999"):
        convert(ui)


def test_not_a_ui_workflow():
    with pytest.raises(wf.WorkflowError, match="no 'nodes' list"):
        wf.ui_to_api({"1": {"class_type": "X", "inputs": {}}}, OBJECT_INFO)


def test_api_to_ui_round_trips_with_the_frontend_companions():
    api = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
           "2": {"class_type": "Train", "inputs": {"model": ["1", 0], "steps": 3, "rate": 0.5, "seed": 2,
                                                   "sched": "cosine", "label": "x", "note": "n"}},
           "3": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 5, "steps": 6, "cfg": 7.0,
                                                      "positive": ["1", 0]}}}
    info = {**OBJECT_INFO, "CheckpointLoaderSimple": {**OBJECT_INFO["CheckpointLoaderSimple"],
                                                      "output_name": ["MODEL", "CLIP", "VAE"]}}
    for name in ("Train", "KSampler"):
        info[name] = {**info[name], "output_name": info[name]["output"]}
    ui = wf.api_to_ui(api, info)
    assert next(n for n in ui["nodes"] if n["id"] == 3)["widgets_values"] == [5, "fixed", 6, 7.0]
    assert wf.ui_to_api(ui, info) == api
