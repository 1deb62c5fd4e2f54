// LoRA Kiln: show Auto Caption's captions on the node, so they can be reviewed before training.
//
// The node's ui output is {"text": ["summary\n\n[new] img_01.png: caption\n..."]}. The stock frontend only
// displays text for its own preview nodes, so this adds a read-only text box, filled when the node runs or when a
// cached result is re-sent on re-queue. The box is neither saved in the workflow nor sent in the prompt (as an
// input it would change the node's cache key: every re-queue would caption and train again). It grows the node to
// show up to MAX_ROWS rows, then scrolls. After a page reload, or when the same workflow is opened again with the
// node's settings unchanged, the last run's captions come back from ComfyUI's history (like the Train Steps view).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";
import {
  attachNodeView,
  lastOutputOf,
  locatorIdOf,
  recentHistory,
  rootGraph,
  showNodeOutputs,
} from "./common/kiln_graph.js";

const NODE_TYPES = new Set(["KilnAutoCaption"]);
const WIDGET = "kiln_captions";
const MIN_ROWS = 2; // rows of text the box shows at least (the placeholder's)
const MAX_ROWS = 16; // rows shown without scrolling (wrapped lines count)

let measureContext = null;

function measure(font, text) {
  measureContext ??= document.createElement("canvas").getContext("2d");
  measureContext.font = font;
  return measureContext.measureText(text);
}

/** Rows a line takes in a box ``width`` px wide, wrapped at spaces like a textarea (a longer word breaks). */
function wrappedRows(line, font, width) {
  if (!line || measure(font, line).width <= width) return 1;
  const space = measure(font, " ").width;
  let rows = 1;
  let x = 0;
  for (const word of line.split(" ")) {
    const w = measure(font, word).width;
    if (x > 0 && x + space + w > width) {
      rows += 1;
      x = 0;
    }
    x += (x > 0 ? space : 0) + w;
    for (; x > width; x -= width) rows += 1;
  }
  return rows;
}

function textOf(output) {
  const text = output?.text;
  if (text == null || (Array.isArray(text) && !text.length)) return null;
  return Array.isArray(text) ? text.join("\n") : String(text);
}

class CaptionView {
  constructor(node) {
    this.node = node;
    this.state = "idle"; // idle | done | restored
    this.sized = { text: null, outer: 0, height: 50 };
    this.widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    this.widget.serialize = false; // not in the workflow's widgets_values
    this.widget.options.serialize = false; // not in the prompt
    this.widget.options.getMinHeight = () => this.wantedHeight();
    this.element = this.widget.element ?? this.widget.inputEl ?? null;
    if (this.element) {
      this.element.readOnly = true;
      this.element.placeholder = "Captions appear here after a run; review them before training.";
      this.element.dataset.kilnView = "captions";
    }
    this.sync();
  }

  /**
   * The widget's height for the text's rows (lines wrapped at the box's width, as the textarea wraps them), at
   * least MIN_ROWS and at most MAX_ROWS rows (then the box scrolls), plus the textarea's padding and the DOM
   * widget's margins. Asked on every redraw: cached for the same text and width.
   */
  wantedHeight() {
    const e = this.element;
    if (!e) return 50;
    const text = this.widget.value || e.placeholder || "";
    const margin = this.widget.margin ?? 10;
    const outer = e.clientWidth || this.node.size[0] - 2 * margin;
    if (this.sized.text === text && this.sized.outer === outer) return this.sized.height;
    const style = getComputedStyle(e);
    const padX = (parseFloat(style.paddingLeft) || 0) + (parseFloat(style.paddingRight) || 0);
    const padY = (parseFloat(style.paddingTop) || 0) + (parseFloat(style.paddingBottom) || 0);
    const width = Math.max(40, outer - padX - 2);
    const font = style.font || "10px monospace";
    let lineHeight = parseFloat(style.lineHeight); // NaN for "normal": the font's own line height
    if (!lineHeight) {
      const m = measure(font, "Xg");
      lineHeight = m.fontBoundingBoxAscent + m.fontBoundingBoxDescent || (parseFloat(style.fontSize) || 10) * 1.2;
    }
    let rows = 0;
    for (const line of text.split("\n")) {
      rows += wrappedRows(line, font, width);
      if (rows >= MAX_ROWS) break;
    }
    rows = Math.min(MAX_ROWS, Math.max(MIN_ROWS, rows));
    const height = Math.ceil(rows * lineHeight + padY + 2 + 2 * margin);
    this.sized = { text, outer, height };
    return height;
  }

  /** Debug/test hook: the state as a data-* attribute of the text box. */
  sync() {
    if (this.element) this.element.dataset.state = this.state;
    this.node.setDirtyCanvas?.(true, true);
  }

  /** Shows a ui output; "restored" never replaces captions of a run shown on this page. Returns true if shown. */
  show(output, state, note = "") {
    const text = textOf(output);
    if (text == null || this.disposed) return false;
    if (state === "restored" && this.state === "done") return false;
    this.state = state;
    this.widget.value = note ? `${note}\n${text}` : text;
    if (this.element) this.element.scrollTop = 0;
    this.sync();
    return true;
  }

  dispose() {
    this.disposed = true;
  }
}

/** Fills the empty views of the open workflow with their last run: the frontend's outputs, else /history. */
async function restoreViews() {
  const views = [];
  const collect = (graph, depth) => {
    for (const node of graph?.nodes ?? []) {
      if (node.kilnCaptionView?.state === "idle") views.push(node.kilnCaptionView);
      if (node.isSubgraphNode?.() && node.subgraph && depth < 16) collect(node.subgraph, depth + 1);
    }
  };
  collect(rootGraph(), 0);
  const missing = views.filter((v) => !v.show(app.nodeOutputs?.[locatorIdOf(v.node)], "restored"));
  if (!missing.length) return;
  const history = await recentHistory();
  for (const view of missing) {
    if (view.state !== "idle" || view.disposed) continue;
    const found = lastOutputOf(view.node, history, "text");
    if (found) view.show(found.output, "restored", "(last run, from ComfyUI's history)");
  }
}

const showCaptions = (view, output, state) => view.show(output, state);

app.registerExtension({
  name: "LoRAKiln.CaptionView",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData?.name)) return;
    attachNodeView(nodeType, "kilnCaptionView", (node) => new CaptionView(node), showCaptions);
  },

  async afterConfigureGraph() {
    await restoreViews();
  },

  onNodeOutputsUpdated(nodeOutputs) {
    showNodeOutputs(nodeOutputs, "kilnCaptionView", showCaptions);
  },
});
