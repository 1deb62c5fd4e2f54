// LoRA Kiln: a small canvas chart of the training loss (raw + smoothed, linear or log) and the learning rate.
// Plain Canvas 2D, no dependencies. No side effects when imported.

/** Bias-corrected exponential moving average (as the engine's Smoother and TensorBoard); nulls are skipped. */
export function smoothed(values, beta = 0.9) {
  const out = new Array(values.length);
  let avg = 0;
  let n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v != null && Number.isFinite(v)) {
      n += 1;
      avg = beta * avg + (1 - beta) * v;
    }
    out[i] = n ? avg / (1 - beta ** n) : null;
  }
  return out;
}

/** A learning rate: always short scientific notation ("1.0e-4"). */
export function formatLr(x) {
  if (x == null || !Number.isFinite(x)) return "–";
  return x === 0 ? "0" : x.toExponential(1);
}

export function formatNumber(x, digits = 4) {
  if (x == null || !Number.isFinite(x)) return "–";
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
  return x.toFixed(a >= 100 ? 1 : digits);
}

/** [min, max] of finite numbers (no spread: runs can have many thousand points). */
function extent(values, lo, hi) {
  if (!values.length) return [lo, hi];
  let a = Infinity;
  let b = -Infinity;
  for (const v of values) {
    if (v < a) a = v;
    if (v > b) b = v;
  }
  return [a, b];
}

function themeColor(name, fallback) {
  const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return v || fallback;
}

const COLORS = { raw: "rgba(110, 160, 255, 0.45)", smooth: "#ff9f43", lr: "#4cd07d", cross: "rgba(255,255,255,0.35)" };
const PAD = { left: 46, right: 46, top: 8, bottom: 18 };

/**
 * ``new LossChart(canvas)``; ``chart.setPoints([[step, loss, lr], ...])`` and the chart redraws on the next
 * animation frame. ``logScale`` / ``showLr`` toggle the y scale and the lr curve. Hovering shows the step,
 * loss, smoothed loss and lr under the pointer. ``dispose()`` removes every listener it added.
 */
export class LossChart {
  constructor(canvas, { logScale = false, showLr = true } = {}) {
    this.canvas = canvas;
    this.points = [];
    this.smooth = [];
    this.logScale = logScale;
    this.showLr = showLr;
    this.hoverX = null;
    this.drawCount = 0;
    this._frame = 0;
    this._onMove = (e) => {
      const rect = canvas.getBoundingClientRect();
      // The canvas may be CSS-scaled with the graph's zoom: map client pixels to the canvas' own CSS pixels.
      this.hoverX = ((e.clientX - rect.left) * canvas.clientWidth) / Math.max(rect.width, 1);
      this.requestDraw();
    };
    this._onLeave = () => {
      this.hoverX = null;
      this.requestDraw();
    };
    canvas.addEventListener("pointermove", this._onMove);
    canvas.addEventListener("pointerleave", this._onLeave);
    this._resize = typeof ResizeObserver === "function" ? new ResizeObserver(() => this.requestDraw()) : null;
    this._resize?.observe(canvas);
  }

  setPoints(points) {
    this.points = points;
    this.smooth = smoothed(points.map((p) => p[1]));
    this.requestDraw();
  }

  /** Append points (steps after the last one only); returns how many were added. */
  addPoints(points) {
    const last = this.points.length ? this.points[this.points.length - 1][0] : -Infinity;
    const fresh = points.filter((p) => p[0] > last).sort((a, b) => a[0] - b[0]);
    if (!fresh.length) return 0;
    this.setPoints(this.points.concat(fresh));
    return fresh.length;
  }

  setLogScale(on) {
    this.logScale = !!on;
    this.requestDraw();
  }

  setShowLr(on) {
    this.showLr = !!on;
    this.requestDraw();
  }

  requestDraw() {
    if (this._frame) return;
    this._frame = requestAnimationFrame(() => {
      this._frame = 0;
      this.draw();
    });
  }

  dispose() {
    if (this._frame) cancelAnimationFrame(this._frame);
    this._frame = 0;
    this.canvas.removeEventListener("pointermove", this._onMove);
    this.canvas.removeEventListener("pointerleave", this._onLeave);
    this._resize?.disconnect();
    this._resize = null;
  }

  /** The point nearest to x (CSS pixels), by step; null without points. */
  pointAt(x, sx) {
    const pts = this.points;
    if (!pts.length) return null;
    const step = sx.invert(x);
    let lo = 0;
    let hi = pts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (pts[mid][0] < step) lo = mid + 1;
      else hi = mid;
    }
    if (lo > 0 && Math.abs(pts[lo - 1][0] - step) <= Math.abs(pts[lo][0] - step)) lo -= 1;
    return lo;
  }

  draw() {
    const canvas = this.canvas;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h || !canvas.isConnected) return; // not on screen (graph zoomed out, other subgraph): later
    const dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    this.drawCount += 1;

    const fg = themeColor("--descrip-text", "#999");
    const grid = themeColor("--border-color", "#444");
    ctx.font = "10px sans-serif";
    ctx.fillStyle = themeColor("--comfy-input-bg", "#222");
    ctx.fillRect(0, 0, w, h);

    const pts = this.points;
    const x0 = PAD.left;
    const x1 = w - (this.showLr ? PAD.right : 8);
    const y0 = PAD.top;
    const y1 = h - PAD.bottom;
    if (!pts.length) {
      ctx.fillStyle = fg;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText("loss chart: waiting for the first training step", w / 2, h / 2);
      return;
    }

    // ---- scales ----
    const first = pts[0][0];
    const last = pts[pts.length - 1][0];
    const sx = {
      map: (s) => x0 + ((s - first) / Math.max(last - first, 1)) * (x1 - x0),
      invert: (x) => first + ((x - x0) / Math.max(x1 - x0, 1)) * Math.max(last - first, 1),
    };
    const losses = pts.map((p) => p[1]).filter((v) => v != null && Number.isFinite(v) && (!this.logScale || v > 0));
    const [minLoss, maxLoss] = extent(losses, 0, 1);
    let lo = minLoss;
    let hi = maxLoss;
    const f = this.logScale ? (v) => Math.log10(Math.max(v, 1e-12)) : (v) => v;
    lo = f(lo);
    hi = f(hi);
    if (hi - lo < 1e-9) {
      lo -= this.logScale ? 0.5 : Math.abs(lo) * 0.1 + 1e-3;
      hi += this.logScale ? 0.5 : Math.abs(hi) * 0.1 + 1e-3;
    }
    const margin = (hi - lo) * 0.05;
    lo -= margin;
    hi += margin;
    if (!this.logScale && lo < 0 && minLoss >= 0) lo = 0;
    const sy = (v) => y1 - ((f(v) - lo) / (hi - lo)) * (y1 - y0);
    const lrs = pts.map((p) => p[2]).filter((v) => v != null && Number.isFinite(v));
    const lrMax = extent(lrs, 0, 0)[1];
    const sl = (v) => y1 - (lrMax > 0 ? v / lrMax : 0) * (y1 - y0) * 0.95;

    // ---- grid and axes ----
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    ctx.fillStyle = fg;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const t = lo + ((hi - lo) * i) / 4;
      const y = y1 - ((t - lo) / (hi - lo)) * (y1 - y0);
      ctx.globalAlpha = 0.5;
      ctx.beginPath();
      ctx.moveTo(x0, Math.round(y) + 0.5);
      ctx.lineTo(x1, Math.round(y) + 0.5);
      ctx.stroke();
      ctx.globalAlpha = 1;
      ctx.fillText(formatNumber(this.logScale ? 10 ** t : t, 3), x0 - 4, y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let i = 0; i <= 4; i++) {
      const s = Math.round(first + ((last - first) * i) / 4);
      if (i > 0 && last - first < i) continue;
      ctx.fillText(String(s), sx.map(s), y1 + 4);
    }
    if (this.showLr && lrMax > 0) {
      ctx.fillStyle = COLORS.lr;
      ctx.textAlign = "left";
      ctx.textBaseline = "middle";
      ctx.fillText(formatLr(lrMax), x1 + 4, sl(lrMax));
      ctx.fillText("lr", x1 + 4, y1 - 6);
    }
    ctx.fillStyle = fg;
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillText(this.logScale ? "loss (log)" : "loss", x0 + 4, y0 + 2);

    // ---- curves (thinned to about two points per pixel) ----
    const stride = Math.max(1, Math.floor(pts.length / Math.max(2 * (x1 - x0), 1)));
    const thinned = [];
    for (let i = 0; i < pts.length; i += stride) thinned.push(i);
    if (thinned[thinned.length - 1] !== pts.length - 1) thinned.push(pts.length - 1);
    const line = (values, scale, color, width, dash) => {
      ctx.save();
      ctx.beginPath();
      ctx.rect(x0, y0, x1 - x0, y1 - y0);
      ctx.clip();
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.setLineDash(dash);
      ctx.beginPath();
      let pen = false;
      for (const i of thinned) {
        const v = values(i);
        if (v == null || !Number.isFinite(v) || (this.logScale && scale === sy && v <= 0)) {
          pen = false;
          continue;
        }
        const x = sx.map(pts[i][0]);
        const y = scale(v);
        if (pen) ctx.lineTo(x, y);
        else ctx.moveTo(x, y);
        pen = true;
      }
      ctx.stroke();
      ctx.restore();
    };
    if (this.showLr && lrMax > 0) line((i) => pts[i][2], sl, COLORS.lr, 1, [4, 3]);
    line((i) => pts[i][1], sy, COLORS.raw, 1, []);
    line((i) => this.smooth[i], sy, COLORS.smooth, 2, []);

    // ---- hover ----
    if (this.hoverX != null && this.hoverX >= x0 - 4 && this.hoverX <= x1 + 4) {
      const i = this.pointAt(this.hoverX, sx);
      const [step, loss, lr] = pts[i];
      const x = sx.map(step);
      ctx.strokeStyle = COLORS.cross;
      ctx.setLineDash([]);
      ctx.beginPath();
      ctx.moveTo(Math.round(x) + 0.5, y0);
      ctx.lineTo(Math.round(x) + 0.5, y1);
      ctx.stroke();
      for (const [v, scale, color] of [[loss, sy, COLORS.raw], [this.smooth[i], sy, COLORS.smooth], [lr, sl, COLORS.lr]]) {
        if (v == null || !Number.isFinite(v) || (scale === sl && !this.showLr)) continue;
        ctx.fillStyle = color;
        ctx.beginPath();
        ctx.arc(x, scale(v), 3, 0, Math.PI * 2);
        ctx.fill();
      }
      const lines = [`step ${step}`, `loss ${formatNumber(loss)}`, `avg ${formatNumber(this.smooth[i])}`, `lr ${formatLr(lr)}`];
      const tw = Math.max(...lines.map((t) => ctx.measureText(t).width)) + 10;
      const th = lines.length * 13 + 6;
      const bx = x + 8 + tw > w ? x - 8 - tw : x + 8;
      ctx.fillStyle = "rgba(0,0,0,0.78)";
      ctx.fillRect(bx, y0 + 4, tw, th);
      ctx.fillStyle = "#eee";
      ctx.textAlign = "left";
      ctx.textBaseline = "top";
      lines.forEach((t, k) => ctx.fillText(t, bx + 5, y0 + 7 + k * 13));
      this.hover = { step, loss, smoothed: this.smooth[i], lr };
    } else {
      this.hover = null;
    }
  }
}
