// LoRA Kiln: live training view on the Train Steps node.
//
// A loss chart (raw + smoothed loss, log-scale toggle, lr curve, hover for step/loss), a stats line
// (step/total, loss, lr, samples/s, ETA) and a strip of the preview images with their step numbers.
// Live data comes from the websocket events the node sends ("kiln.train.progress", "kiln.train.preview");
// when the node finishes, its ui output ("kiln_history", "kiln_previews") replaces the live data. After a
// page reload or when the workflow is opened again, the last run comes back from that same ui output (the
// frontend's in-memory outputs, else the server's /history). Nothing is written into the workflow.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { LossChart, formatLr, formatNumber } from "./common/kiln_chart.js";
import { PreviewStrip, el, ensureStyles, formatEta } from "./common/kiln_dom.js";
import {
  allViews,
  attachNodeView,
  disposeOrphanViews,
  lastOutputOf,
  locatorIdOf,
  recentHistory,
  registerView,
  routeToViews,
  showNodeOutputs,
  unregisterView,
  viewUrl,
} from "./common/kiln_graph.js";

const NODE_TYPES = new Set(["KilnTrainSteps"]);
const MAX_POINTS = 50000;
const LOG_KEY = "lora-kiln.chart.log";
const LR_KEY = "lora-kiln.chart.lr";

function stored(key, fallback) {
  try {
    const v = localStorage.getItem(key);
    return v == null ? fallback : v === "1";
  } catch {
    return fallback;
  }
}

function store(key, on) {
  try {
    localStorage.setItem(key, on ? "1" : "0");
  } catch {
    /* private mode: the toggle just does not persist */
  }
}

function toggle(label, title, on, onChange) {
  const b = el("button", { class: "kiln-toggle", type: "button", title, "aria-pressed": String(on), text: label });
  const handler = (e) => {
    e.stopPropagation();
    const next = b.getAttribute("aria-pressed") !== "true";
    b.setAttribute("aria-pressed", String(next));
    onChange(next);
  };
  b.addEventListener("click", handler);
  return { button: b, dispose: () => b.removeEventListener("click", handler) };
}

/** Points [step, loss, lr] from a ui "kiln_history" (lists may be concatenated by ComfyUI: sort, dedupe). */
function historyPoints(history) {
  const byStep = new Map();
  for (const h of history ?? []) if (Array.isArray(h) && h.length >= 2) byStep.set(h[0], [h[0], h[1], h[2] ?? null]);
  return [...byStep.values()].sort((a, b) => a[0] - b[0]);
}

function previewRefs(previews) {
  return (previews ?? []).filter((p) => p && typeof p === "object" && p.filename);
}

class TrainView {
  constructor(node) {
    ensureStyles();
    this.node = node;
    this.state = "idle"; // idle | running | done | restored | stopped
    this.runStep = 0;
    this.runSteps = 0;
    this.previews = [];
    this.last = null;

    this.stats = el("div", { class: "kiln-stats", text: "not run yet" });
    this.stateLabel = el("span", { class: "kiln-state" });
    this.canvas = el("canvas", { class: "kiln-chart" });
    this.strip = el("div", { class: "kiln-strip" });
    this.chart = new LossChart(this.canvas, { logScale: stored(LOG_KEY, false), showLr: stored(LR_KEY, true) });
    this.toggles = [
      toggle("log", "Loss on a log scale", this.chart.logScale, (on) => {
        this.chart.setLogScale(on);
        store(LOG_KEY, on);
      }),
      toggle("lr", "Show the learning-rate curve (dashed, right axis)", this.chart.showLr, (on) => {
        this.chart.setShowLr(on);
        store(LR_KEY, on);
      }),
    ];
    this.root = el(
      "div",
      { class: "kiln-view", "data-kiln-view": "train" },
      el("div", { class: "kiln-head" }, this.stats, this.stateLabel, ...this.toggles.map((t) => t.button)),
      this.canvas,
      this.strip,
    );
    this.previewStrip = new PreviewStrip(this.strip);

    this.widget = node.addDOMWidget("kiln_live_view", "kiln_live_view", this.root, {
      serialize: false, // never in widgets_values or the prompt: the run's data stays out of the workflow file
      hideOnZoom: true,
      margin: 6,
      getValue: () => "",
      setValue: () => {},
      getMinHeight: () => 230,
    });
    this.widget.serialize = false;
    registerView(this);
    this.sync();
  }

  get points() {
    return this.chart.points;
  }

  /** Debug/test hook mirrored as data-* attributes on the view's root element. */
  sync() {
    const d = this.root.dataset;
    d.state = this.state;
    d.points = String(this.chart.points.length);
    d.previews = String(this.previews.length);
    this.stateLabel.textContent = {
      idle: "", running: "● live", done: "finished", restored: "last run", stopped: "stopped",
    }[this.state];
    this.node.setDirtyCanvas?.(true, false);
  }

  startRun(detail) {
    this.state = "running";
    this.runSteps = detail.run_steps ?? 0;
    this.runStep = 0;
    this.previews = [];
    this.previewStrip.set([]);
    this.chart.setPoints([]);
  }

  /** A "kiln.train.progress" event for this node. */
  onProgress(d) {
    if (this.state !== "running" || d.run_step < this.runStep || d.run_steps !== this.runSteps) this.startRun(d);
    this.runStep = d.run_step;
    const pts = Array.isArray(d.points) && d.points.length ? d.points : [[d.step, d.loss, d.lr]];
    this.chart.addPoints(pts.map((p) => [p[0], p[1], p[2] ?? null]));
    if (this.chart.points.length > MAX_POINTS) this.chart.setPoints(this.chart.points.filter((_, i) => i % 2 === 0));
    this.last = d;
    this.stats.textContent = [
      `step ${d.step} (${d.run_step}/${d.run_steps})`,
      `loss ${formatNumber(d.loss)} (avg ${formatNumber(d.smoothed_loss)})`,
      `lr ${formatLr(d.lr)}`,
      `${formatNumber(d.samples_per_sec, 2)} samples/s`,
      `ETA ${formatEta(d.eta_seconds)}`,
    ].join(" · ");
    this.sync();
  }

  /** The prompt was cancelled or failed while this view was live: keep what it shows, say it stopped. */
  onStopped() {
    if (this.state !== "running") return;
    this.state = "stopped";
    this.sync();
  }

  /** A "kiln.train.preview" event for this node: {filename, subfolder, type, step}. */
  onPreview(d) {
    if (this.state !== "running") this.startRun({ run_steps: this.runSteps });
    this.addPreviews([d]);
    this.sync();
  }

  addPreviews(refs) {
    for (const ref of previewRefs(refs)) {
      const item = { url: viewUrl(ref), step: ref.step };
      this.previews.push(item);
      this.previewStrip.add(item);
    }
  }

  /** The node's ui output (live "executed", or restored); returns true when it carried a run. */
  showOutput(output, state, note = "") {
    if (!output?.kiln_history) return false;
    if (state === "restored" && this.state === "running") return false; // a live run wins
    if (state === "restored" && this.state === "done") return false; // the run just shown is newer
    const points = historyPoints(output.kiln_history);
    this.state = state;
    this.chart.setPoints(points);
    this.previews = [];
    this.previewStrip.set([]);
    this.addPreviews(output.kiln_previews);
    const last = points[points.length - 1];
    const first = points[0];
    this.stats.textContent = last
      ? `step ${last[0]} · loss ${formatNumber(last[1])} · lr ${formatLr(last[2])} · ${points.length} steps` +
        (first && first[0] > 1 ? ` (from ${first[0]})` : "") + note
      : "no steps";
    this.sync();
    return true;
  }

  dispose() {
    unregisterView(this);
    this.chart.dispose();
    this.previewStrip.dispose();
    this.toggles.forEach((t) => t.dispose());
  }
}

// ---- restoring the last run after a reload / when a workflow is opened ---------------------------------

async function restoreViews() {
  const root = app.graph?.rootGraph ?? app.graph;
  if (!root) return;
  const views = [];
  const collect = (graph, depth) => {
    for (const node of graph?.nodes ?? []) {
      if (node.kilnView && node.kilnView.state === "idle") views.push(node.kilnView);
      if (node.isSubgraphNode?.() && node.subgraph && depth < 16) collect(node.subgraph, depth + 1);
    }
  };
  collect(root, 0);
  const missing = views.filter((v) => !v.showOutput(app.nodeOutputs?.[locatorIdOf(v.node)], "restored"));
  if (!missing.length) return;
  const history = await recentHistory();
  for (const view of missing) {
    if (view.state !== "idle") continue;
    const found = lastOutputOf(view.node, history, "kiln_history");
    if (found) view.showOutput(found.output, "restored", " · from the server's history");
  }
}

const showRun = (view, output, state) => view.showOutput(output, state);

app.registerExtension({
  name: "LoRAKiln.TrainView",

  async setup() {
    routeToViews("kiln.train.progress", "onProgress");
    routeToViews("kiln.train.preview", "onPreview");
    for (const event of ["execution_interrupted", "execution_error"]) {
      api.addEventListener(event, () => allViews().forEach((v) => v.onStopped?.()));
    }
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData?.name)) return;
    attachNodeView(nodeType, "kilnView", (node) => new TrainView(node), showRun);
  },

  async afterConfigureGraph() {
    disposeOrphanViews();
    await restoreViews();
  },

  onNodeOutputsUpdated(nodeOutputs) {
    showNodeOutputs(nodeOutputs, "kilnView", showRun);
  },
});
