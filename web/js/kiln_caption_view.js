// LoRA Kiln: show Auto Caption's captions on the node, so they can be reviewed before training.
//
// The node's ui output is {"text": ["summary\n\n[new] img_01.png: caption\n..."]}. The stock frontend only
// displays text for its own preview nodes, so this adds a read-only text box (not saved in the workflow) and
// fills it when the node runs, or when a cached result is re-sent on re-queue.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODE_TYPES = new Set(["KilnAutoCaption"]);
const WIDGET = "kiln_captions";

function captionBox(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // never written into the workflow or the prompt
    if (widget.element) {
      widget.element.readOnly = true;
      widget.element.placeholder = "Captions appear here after a run; review them before training.";
    }
  }
  return widget;
}

app.registerExtension({
  name: "LoRAKiln.CaptionView",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      captionBox(this);
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (!text || !text.length) return;
      captionBox(this).value = Array.isArray(text) ? text.join("\n") : String(text);
      this.setDirtyCanvas?.(true, true);
    };
  },
});
