// LoRA Kiln: small DOM pieces shared by the node views (styles, preview strip, lightbox, formatting).
// No side effects when imported; the stylesheet is added on first use.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

export function formatEta(seconds) {
  if (seconds == null || !Number.isFinite(seconds)) return "?";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}

const CSS = `
.kiln-view { display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; overflow: hidden;
  font: 11px/1.35 var(--font-inter, sans-serif); color: var(--input-text, #ddd); }
.kiln-view .kiln-head { display: flex; align-items: flex-start; gap: 6px; min-height: 18px; }
.kiln-view .kiln-stats { flex: 1; overflow: hidden; max-height: 2.7em; font-variant-numeric: tabular-nums; }
.kiln-view .kiln-state { opacity: .7; white-space: nowrap; }
.kiln-view button.kiln-toggle { font: inherit; padding: 0 6px; height: 18px; border-radius: 4px; cursor: pointer;
  color: inherit; background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #555); opacity: .6; }
.kiln-view button.kiln-toggle[aria-pressed="true"] { opacity: 1; border-color: #ff9f43; }
.kiln-view canvas.kiln-chart { flex: 1 1 auto; min-height: 90px; width: 100%; border-radius: 4px; display: block; }
.kiln-view .kiln-strip { flex: 0 0 auto; display: flex; gap: 4px; overflow-x: auto; overflow-y: hidden;
  min-height: 0; scrollbar-width: thin; }
.kiln-view .kiln-strip:empty { display: none; }
.kiln-view .kiln-strip figure { margin: 0; flex: 0 0 auto; cursor: zoom-in; text-align: center; }
.kiln-view .kiln-strip img { height: 56px; width: 56px; object-fit: cover; border-radius: 3px; display: block;
  background: #000; }
.kiln-view .kiln-strip figcaption { font-size: 9px; opacity: .75; }
.kiln-lightbox { position: fixed; inset: 0; z-index: 10000; background: rgba(0,0,0,.82); display: flex;
  flex-direction: column; align-items: center; justify-content: center; gap: 8px; cursor: zoom-out; }
.kiln-lightbox img { width: min(82vh, 90vw); height: min(82vh, 90vw); object-fit: contain; box-shadow: 0 0 24px #000; }
.kiln-lightbox img.kiln-small { image-rendering: pixelated; }
.kiln-lightbox .kiln-caption { color: #eee; font: 13px sans-serif; }
`;

export function ensureStyles() {
  if (document.getElementById("lora-kiln-styles")) return;
  const style = el("style", { id: "lora-kiln-styles" });
  style.textContent = CSS;
  document.head.append(style);
}

/**
 * Opens a full-window view of ``items[index]`` ({url, step}); ←/→ browse, Esc or a click closes.
 * Returns a function that closes it (also removes its key listener).
 */
export function openLightbox(items, index) {
  let i = index;
  const img = el("img", { alt: "" });
  img.onload = () => img.classList.toggle("kiln-small", img.naturalWidth < 256);
  const caption = el("div", { class: "kiln-caption" });
  const box = el("div", { class: "kiln-lightbox", role: "dialog", "aria-label": "LoRA Kiln preview" }, img, caption);
  const show = () => {
    img.src = items[i].url;
    caption.textContent = `step ${items[i].step}  (${i + 1}/${items.length})  ← → to browse, Esc to close`;
  };
  const close = () => {
    document.removeEventListener("keydown", onKey, true);
    box.remove();
  };
  const onKey = (e) => {
    if (e.key === "Escape") close();
    else if (e.key === "ArrowLeft") i = Math.max(0, i - 1);
    else if (e.key === "ArrowRight") i = Math.min(items.length - 1, i + 1);
    else return;
    e.preventDefault();
    e.stopPropagation();
    if (box.isConnected) show();
  };
  box.addEventListener("click", close);
  document.addEventListener("keydown", onKey, true);
  show();
  document.body.append(box);
  return close;
}

/** A row of thumbnails with their step numbers; click one to enlarge. */
export class PreviewStrip {
  constructor(container) {
    this.container = container;
    this.items = []; // {url, step}
    this.closeLightbox = null;
    this._onClick = (e) => {
      const fig = e.target.closest?.("figure[data-index]");
      if (!fig) return;
      e.stopPropagation();
      this.closeLightbox?.();
      this.closeLightbox = openLightbox(this.items, Number(fig.dataset.index));
    };
    container.addEventListener("click", this._onClick);
  }

  set(items) {
    this.items = [];
    this.container.replaceChildren();
    for (const item of items) this.add(item);
  }

  add(item) {
    if (this.items.some((x) => x.url === item.url)) return;
    const index = this.items.length;
    this.items.push(item);
    const img = el("img", { src: item.url, alt: `preview at step ${item.step}`, loading: "lazy", draggable: "false" });
    const fig = el("figure", { "data-index": String(index), title: `step ${item.step}: click to enlarge` }, img,
      el("figcaption", { text: String(item.step) }));
    this.container.append(fig);
    this.container.scrollLeft = this.container.scrollWidth;
  }

  dispose() {
    this.container.removeEventListener("click", this._onClick);
    this.closeLightbox?.();
    this.closeLightbox = null;
  }
}
