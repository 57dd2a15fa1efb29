"""The site's page, script and style (kept as strings so the installed package needs no data files).

Rules the script keeps: every string from data goes into the page through ``textContent`` (never
``innerHTML``), so a class named ``<script>alert(1)</script>`` renders as text; data arrive as ``data/*.js``
shards that call ``NHA.put(name, value)``, added as ``<script>`` tags on demand, because browsers refuse
``fetch()`` of local JSON from ``file://``."""

__all__ = ["PAGE", "SCRIPT", "STYLE"]

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="style.css"></head>
<body><header><h1>{title}</h1><nav><a href="#/">Leaderboard</a> <a href="#/atlas">Atlas</a>
<input id="search" type="search" placeholder="which units say ...?"> <button id="search-go">Search</button></nav></header>
<main id="main">loading ...</main>
<script src="app.js"></script></body></html>
"""

STYLE = """body{font-family:system-ui,sans-serif;margin:0 1.5em;color:#222}header{border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:2px 6px;font-size:13px}
th{cursor:pointer;background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ci{color:#777;font-size:11px}.better{background:#e3f6e3}.worse{background:#fbe4e4}
.stack{position:relative;width:112px;height:112px;display:inline-block}.stack img,.stack canvas{position:absolute;
left:0;top:0;width:112px;height:112px}figure{display:inline-block;margin:4px;font-size:12px}
.thumbs a{margin:2px}.note{color:#555;font-size:12px;max-width:70em}
"""

SCRIPT = r"""
"use strict";
const NHA = {data: {}, waiting: {},
  put(name, value) { this.data[name] = value; (this.waiting[name] || []).forEach(f => f(value)); delete this.waiting[name]; },
  load(name) {
    if (name in this.data) return Promise.resolve(this.data[name]);
    return new Promise(resolve => {
      if (!this.waiting[name]) {
        this.waiting[name] = [];
        const s = document.createElement("script"); s.src = "data/" + name + ".js"; document.body.appendChild(s);
      }
      this.waiting[name].push(resolve);
    });
  }};
function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}
function fmt(v) { return v === null || v === undefined ? "–" : Math.abs(v) >= 1e-3 || v === 0 ? v.toFixed(3) : v.toExponential(1); }
function link(text, hash) { return el("a", text, {href: hash}); }
function table(id, head, rows) {
  const t = el("table", null, {id: id}), tr = el("tr");
  head.forEach(h => tr.appendChild(typeof h === "string" ? el("th", h) : h)); t.appendChild(tr);
  rows.forEach(r => t.appendChild(r)); return t;
}
function main() { const m = document.getElementById("main"); m.textContent = ""; return m; }

function leaderboard(sortKey, desc) {
  NHA.load("leaderboard").then(lb => {
    const m = main();
    if (!lb.methods.length) { m.appendChild(el("p", "No benchmark run in this report.")); return; }
    m.appendChild(el("h2", "Leaderboard: " + [lb.config.model, lb.config.dataset, (lb.config.n || "") + " images"].join(", ")));
    let methods = lb.methods.slice();
    if (sortKey) {
      const v = mm => { const c = lb.cells[mm][sortKey]; return c && c.mean !== null ? c.mean : null; };
      methods.sort((a, b) => (v(a) === null) - (v(b) === null) || (desc ? v(b) - v(a) : v(a) - v(b)));
    }
    const head = [el("th", "method")].concat(lb.metrics.map(c => {
      const th = el("th", c.label + (c.higher_is_better ? " ↑" : " ↓"), {"data-key": c.key, title: c.description});
      th.addEventListener("click", () => leaderboard(c.key, sortKey === c.key ? !desc : c.higher_is_better));
      return th;
    }));
    const rows = methods.map(name => {
      const tr = el("tr", null, {"data-method": name}); tr.appendChild(el("td", name, {"class": "method"}));
      lb.metrics.forEach(c => {
        const cell = lb.cells[name][c.key], td = el("td", null, {"class": "num", "data-key": c.key});
        if (cell) {
          td.setAttribute("data-mean", cell.mean === null ? "" : String(cell.mean));
          td.appendChild(el("span", fmt(cell.mean), {"class": "mean"}));
          td.appendChild(el("div", "[" + fmt(cell.ci95[0]) + ", " + fmt(cell.ci95[1]) + "]", {"class": "ci"}));
          if (cell.paired) { td.classList.add(cell.paired.verdict === "better" ? "better" : cell.paired.verdict === "worse" ? "worse" : "same");
            td.title = "vs " + lb.reference + ": " + cell.paired.verdict + ", difference " + fmt(cell.paired.difference) +
              " [" + fmt(cell.paired.ci95[0]) + ", " + fmt(cell.paired.ci95[1]) + "]"; td.setAttribute("data-verdict", cell.paired.verdict); }
        } else td.textContent = "–";
        tr.appendChild(td);
      });
      return tr;
    });
    m.appendChild(table("leaderboard", head, rows));
    m.appendChild(el("p", "Cells: mean over images and its 95% interval (" + lb.interval_test + "). Colour: paired test against " +
      lb.reference + " (" + lb.paired_test + "); green better, red worse. Click a column to sort.", {"class": "note", id: "tests"}));
    const thumbs = el("div", null, {"class": "thumbs", id: "images"});
    lb.images.forEach(im => { const a = link("", "#/image/" + im.index); a.appendChild(el("img", null, {src: im.image, alt: im.label, width: 64}));
      thumbs.appendChild(a); });
    m.appendChild(el("h3", "Images")); m.appendChild(thumbs);
  });
}

function imageView(index) {
  NHA.load("leaderboard").then(lb => {
    const im = lb.images.find(x => String(x.index) === String(index)), m = main();
    if (!im) { m.appendChild(el("p", "No such image.")); return; }
    const h = el("h2", null, {id: "image-view"});
    h.appendChild(el("span", im.label, {id: "image-class"})); h.appendChild(document.createTextNode(" p = "));
    h.appendChild(el("span", im.probability.toFixed(3), {id: "image-prob"})); m.appendChild(h);
    Object.entries(im.maps).forEach(([meth, src]) => {
      const f = el("figure", null, {"data-method": meth}), s = el("div", null, {"class": "stack"});
      [im.image, src, im.outline].forEach(p => s.appendChild(el("img", null, {src: p, alt: ""})));
      f.appendChild(s); f.appendChild(el("figcaption", meth)); m.appendChild(f);
    });
    const rows = Object.entries(im.metrics).map(([meth, vals]) => {
      const tr = el("tr", null, {"data-method": meth}); tr.appendChild(el("td", meth));
      lb.metrics.forEach(c => tr.appendChild(el("td", fmt(vals[c.key === "map" ? "map" : c.key]), {"class": "num", "data-key": c.key})));
      return tr;
    });
    m.appendChild(table("image-metrics", ["method"].concat(lb.metrics.map(c => c.key === "map" ? "AP" : c.label)), rows));
  });
}

function unitRow(u) {
  const tr = el("tr", null, {"data-unit": u.id}); tr.appendChild(el("td")).appendChild(link(u.id, "#/unit/" + u.id));
  tr.appendChild(el("td", fmt(u.importance), {"class": "num"})); tr.appendChild(el("td", (100 * u.share).toFixed(2) + "%", {"class": "num"}));
  tr.appendChild(el("td", u.k90 === undefined ? "" : u.k90, {"class": "num"}));
  tr.appendChild(el("td", (u.words || u.w || []).slice(0, 3).map(w => w[0]).join(", "))); return tr;
}
const UNIT_HEAD = ["unit", "importance", "share", "pairs for 90%", "words"];
function atlasView() {
  NHA.load("atlas").then(at => {
    const m = main();
    m.appendChild(el("h2", "Atlas: " + at.n_heads + " heads, " + at.n_neurons + " neurons, " + at.n_heads * at.n_neurons + " pairs"));
    m.appendChild(el("h3", "Heads")); m.appendChild(table("atlas-heads", UNIT_HEAD, at.heads.map(unitRow)));
    m.appendChild(el("h3", "Top neurons (" + at.neurons.length + " of " + at.n_neurons + "; every neuron opens from search or #/unit/neuron:N)"));
    m.appendChild(table("atlas-neurons", UNIT_HEAD, at.neurons.map(unitRow)));
    m.appendChild(el("h3", "Top pairs")); m.appendChild(table("atlas-pairs", UNIT_HEAD, at.pairs.map(unitRow)));
  });
}

function drawMap(canvas, img, grid) {
  const ctx = canvas.getContext("2d"), h = grid.length, w = grid[0].length, flat = grid.flat();
  const lo = Math.min(...flat), hi = Math.max(...flat), W = canvas.width, H = canvas.height;
  ctx.drawImage(img, 0, 0, W, H);
  grid.forEach((row, i) => row.forEach((v, j) => { const t = hi > lo ? (v - lo) / (hi - lo) : 0;
    ctx.fillStyle = "rgba(" + Math.round(255 * t) + ",40," + Math.round(255 * (1 - t)) + ",0.5)";
    ctx.fillRect(j * W / w, i * H / h, W / w + 1, H / h + 1); }));
}
function unitData(id) {
  return NHA.load("atlas").then(at => {
    if (id.startsWith("head:")) return [at, at.heads.find(u => u.id === id)];
    const n = id.startsWith("neuron:") ? +id.slice(7) : +id.split("N")[1];
    return NHA.load("neurons-" + Math.floor(n / at.block)).then(sh => [at, sh.units[id], sh]);
  });
}
function unitView(id) {
  unitData(id).then(([at, u, sh]) => {
    const m = main();
    if (!u) { m.appendChild(el("p", "No unit " + id + ".")); return; }
    m.appendChild(el("h2", u.id, {id: "unit-view"}));
    m.appendChild(el("p", "importance " + fmt(u.importance) + ", share " + (100 * u.share).toFixed(2) + "%" +
      (u.k90 !== undefined ? ", " + u.k90 + " pairs hold 90% of its pair importance" : "") + ", OMP relative residual " + fmt(u.residual), {id: "unit-stats"}));
    m.appendChild(table("unit-words", ["word", "OMP coefficient"], u.words.map(w => { const tr = el("tr");
      tr.appendChild(el("td", w[0])); tr.appendChild(el("td", fmt(w[1]), {"class": "num"})); return tr; })));
    const tops = el("div", null, {id: "unit-top"});
    u.top.forEach(([b, act, grid]) => { const f = el("figure"), c = el("canvas", null, {width: 112, height: 112}), img = new Image();
      img.onload = () => drawMap(c, img, grid); img.src = at.images[b]; f.appendChild(c); f.appendChild(el("figcaption", "image " + b + ": " + fmt(act))); tops.appendChild(f); });
    if (u.top.length) { m.appendChild(el("h3", "Top-activating images (the unit's map over the tokens)")); m.appendChild(tops); }
    if (u.kind === "neuron" && sh) {
      const pairs = Object.values(sh.units).filter(p => p.kind === "pair" && p.neuron === u.neuron).sort((a, b) => b.importance - a.importance);
      m.appendChild(el("h3", "Its pairs as sub-concepts"));
      m.appendChild(table("unit-pairs", UNIT_HEAD, pairs.map(unitRow)));
    }
  });
}

function searchView(word) {
  const q = word.trim().toLowerCase(), key = /^[a-z]/.test(q) ? q[0] : "other";
  document.getElementById("search").value = q;
  NHA.load("search-" + key).then(idx => {
    const m = main(), hits = [];
    idx.forEach(([w, units]) => { if (w.startsWith(q)) units.forEach(([id, c]) => hits.push([id, w, c])); });
    hits.sort((a, b) => Math.abs(b[2]) - Math.abs(a[2]));
    m.appendChild(el("h2", hits.length + " units say \u201c" + q + "\u201d", {id: "search-title"}));
    m.appendChild(table("search-results", ["unit", "word", "OMP coefficient"], hits.slice(0, 500).map(([id, w, c]) => {
      const tr = el("tr", null, {"data-unit": id}); tr.appendChild(el("td")).appendChild(link(id, "#/unit/" + id));
      tr.appendChild(el("td", w)); tr.appendChild(el("td", fmt(c), {"class": "num"})); return tr; })));
  });
}

function route() {
  const h = decodeURIComponent(location.hash.replace(/^#\/?/, "")), [view, ...rest] = h.split("/"), arg = rest.join("/");
  if (view === "image") imageView(arg); else if (view === "atlas") atlasView(); else if (view === "unit") unitView(arg);
  else if (view === "search") searchView(arg); else leaderboard(null, false);
}
window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  const go = () => { location.hash = "#/search/" + encodeURIComponent(document.getElementById("search").value); };
  document.getElementById("search-go").addEventListener("click", go);
  document.getElementById("search").addEventListener("keydown", e => { if (e.key === "Enter") go(); });
});
NHA.load("meta").then(route);
"""
