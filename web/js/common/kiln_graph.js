// LoRA Kiln frontend helpers: find the node the server means, and route Kiln's websocket events to it.
//
// The server names a node by its *execution id*: "4" for node 4 of the workflow, "12:5" for node 5 inside the
// subgraph that node 12 instantiates (one more ":" per level of nesting). app.nodeOutputs is keyed by
// *locator id* instead: "4" at the root, "<subgraph uuid>:5" inside a subgraph. Both are resolved here.
//
// This module has no side effects when imported (ComfyUI imports every .js file under web/js).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

export function rootGraph() {
  return app.graph?.rootGraph ?? app.graph;
}

/** The node an execution id ("4", "12:5", "12:7:5") names in the open workflow, or null. */
export function nodeByExecutionId(executionId) {
  let graph = rootGraph();
  const parts = String(executionId).split(":");
  for (let i = 0; graph && i < parts.length; i++) {
    const node = graph.getNodeById(parts[i]);
    if (!node) return null;
    if (i === parts.length - 1) return node;
    if (!node.isSubgraphNode?.() || !node.subgraph) return null;
    graph = node.subgraph;
  }
  return null;
}

/** The key of app.nodeOutputs for a node. */
export function locatorIdOf(node) {
  const graph = node.graph;
  if (!graph || graph.isRootGraph !== false) return String(node.id);
  return `${graph.id}:${node.id}`;
}

/** The node a locator id names, or null. */
export function nodeByLocatorId(locatorId) {
  const root = rootGraph();
  if (!root) return null;
  const id = String(locatorId);
  const cut = id.lastIndexOf(":");
  if (cut < 0) return root.getNodeById(id) ?? null;
  return root.subgraphs?.get(id.slice(0, cut))?.getNodeById(id.slice(cut + 1)) ?? null;
}

/** Every execution id under which a node runs (a node in a subgraph runs once per instance of the subgraph). */
export function executionIdsOf(node) {
  const root = rootGraph();
  if (!node.graph || node.graph === root || node.graph.isRootGraph !== false) return [String(node.id)];
  const found = [];
  const walk = (graph, path, depth) => {
    if (depth > 16) return;
    for (const n of graph?.nodes ?? []) {
      if (!n.isSubgraphNode?.() || !n.subgraph) continue;
      const here = [...path, n.id];
      if (n.subgraph === node.graph) found.push([...here, node.id].join(":"));
      walk(n.subgraph, here, depth + 1);
    }
  };
  walk(root, [], 0);
  return found;
}

// ---- the views alive on this page ---------------------------------------------------------------------

const views = new Set();

export function registerView(view) {
  views.add(view);
}

export function unregisterView(view) {
  views.delete(view);
}

/** Every registered view (a view has ``node`` and ``dispose()``). */
export function allViews() {
  return [...views];
}

/**
 * Dispose the views of nodes that left the graph without ``onRemoved`` (loading another workflow clears the
 * subgraph definitions without telling their nodes).
 */
export function disposeOrphanViews() {
  for (const view of views) {
    if (nodeByLocatorId(locatorIdOf(view.node)) !== view.node) {
      view.dispose();
      if (view.node.kilnView === view) view.node.kilnView = null;
    }
  }
}

// ---- one global listener per event type, routed by node id ------------------------------------------

const routes = new Map(); // event type -> view method name

/**
 * Deliver websocket event ``eventType`` (whose ``detail.node`` is an execution id) to
 * ``node.kilnView[method](detail)`` of the node it names. One api listener per event type for the whole page:
 * a node's view stops receiving events as soon as the node drops its ``kilnView`` (in ``onRemoved``).
 */
export function routeToViews(eventType, method) {
  if (routes.has(eventType)) return;
  routes.set(eventType, method);
  api.addEventListener(eventType, ({ detail }) => {
    if (detail?.node == null) return;
    const view = nodeByExecutionId(detail.node)?.kilnView;
    if (view && typeof view[method] === "function") {
      try {
        view[method](detail);
      } catch (error) {
        console.warn(`[lora-kiln] ${eventType} for node ${detail.node}:`, error);
      }
    }
  });
}

/** A /view URL for a file reference from a node's ui output ({filename, subfolder, type}). */
export function viewUrl(ref) {
  const params = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type ?? "temp" });
  return api.apiURL(`/view?${params}`);
}

// ---- the last run of a node, from the server's history (survives page reloads, not server restarts) -----

let historyRequest = null;

/** The server's recent history, newest first; one request shared by every caller within a second. */
export function recentHistory(maxItems = 64) {
  if (!historyRequest) {
    historyRequest = api
      .fetchApi(`/history?max_items=${maxItems}`)
      .then((r) => (r.ok ? r.json() : {}))
      .then((h) => Object.values(h ?? {}).sort((a, b) => (b.prompt?.[0] ?? 0) - (a.prompt?.[0] ?? 0)))
      .catch(() => []);
    setTimeout(() => (historyRequest = null), 1000);
  }
  return historyRequest;
}

/** Whether the node's widgets still hold the values a prompt ran it with (links are not compared). */
export function sameSettings(node, inputs) {
  for (const [name, value] of Object.entries(inputs ?? {})) {
    if (Array.isArray(value) || (value !== null && typeof value === "object")) continue; // a link
    const widget = node.widgets?.find((w) => w.name === name);
    if (!widget) continue;
    const mine = widget.value;
    if (typeof value === "number" && typeof mine === "number") {
      if (Math.abs(mine - value) > 1e-9 * Math.max(1, Math.abs(value))) return false;
    } else if (mine !== value) {
      return false;
    }
  }
  return true;
}

/**
 * The ui output (with ``key``) of the newest finished run of ``node`` in ``history``: same execution id and
 * node type, queued from this very workflow (same workflow id, e.g. after a page reload) or, for a workflow
 * opened again from a file, with the node's settings unchanged.
 */
export function lastOutputOf(node, history, key) {
  const ids = executionIdsOf(node);
  const workflowId = rootGraph()?.id;
  for (const item of history) {
    for (const id of ids) {
      const output = item.outputs?.[id];
      const api = item.prompt?.[2]?.[id];
      if (!output?.[key] || api?.class_type !== node.type) continue;
      if (item.prompt?.[3]?.extra_pnginfo?.workflow?.id === workflowId || sameSettings(node, api.inputs)) {
        return { output, item };
      }
    }
  }
  return null;
}

// Give every node of a type a view object under node[key]: made with the node, shown the node's ui output when it
// runs ("done"), disposed when the node is removed (so no event reaches it any more).
export function attachNodeView(nodeType, key, create, showOutput) {
  const proto = nodeType.prototype;
  const onNodeCreated = proto.onNodeCreated;
  proto.onNodeCreated = function () {
    const r = onNodeCreated?.apply(this, arguments);
    this[key] = create(this);
    return r;
  };
  const onExecuted = proto.onExecuted;
  proto.onExecuted = function (output) {
    const r = onExecuted?.apply(this, arguments);
    if (this[key]) showOutput(this[key], output, "done");
    return r;
  };
  const onRemoved = proto.onRemoved;
  proto.onRemoved = function () {
    this[key]?.dispose(); // a restore still waiting for /history leaves it alone
    this[key] = null;
    return onRemoved?.apply(this, arguments);
  };
}

// The queue panel's "load workflow" and switching workflow tabs put outputs back into app.nodeOutputs.
export function showNodeOutputs(nodeOutputs, key, showOutput) {
  for (const [locatorId, output] of Object.entries(nodeOutputs ?? {})) {
    const view = nodeByLocatorId(locatorId)?.[key];
    if (view) showOutput(view, output, "restored");
  }
}
