(function () {
  "use strict";
  // xaudit's report browsers: the slice browser and the example browser. Everything they show comes from the
  // JSON block #xaudit-data and is put on the page as text (textContent, attribute values), never parsed as
  // HTML; images are data: URLs only. No request of any kind is made.
  var dataEl = document.getElementById("xaudit-data");
  var root = document.getElementById("browse");
  if (!dataEl || !root) { return; }
  var D = JSON.parse(dataEl.textContent);
  var SVG = "http://www.w3.org/2000/svg";
  var RANK = { FAIL: 2, WARN: 1, PASS: 0 };

  function el(tag, attrs, kids) {
    var node = document.createElement(tag);
    setAll(node, attrs);
    (kids || []).forEach(function (k) { if (k !== null && k !== undefined) { node.appendChild(typeof k === "string" ? document.createTextNode(k) : k); } });
    return node;
  }
  function sv(tag, attrs, text) {
    var node = document.createElementNS(SVG, tag);
    setAll(node, attrs);
    if (text !== undefined) { node.textContent = text; }
    return node;
  }
  function setAll(node, attrs) {
    Object.keys(attrs || {}).forEach(function (k) {
      var v = attrs[k];
      if (k === "text") { node.textContent = v; }
      else if (k === "on") { Object.keys(v).forEach(function (e) { node.addEventListener(e, v[e]); }); }
      else if (k === "src") { node.setAttribute("src", image(v)); }
      else if (v !== null && v !== undefined && v !== false) { node.setAttribute(k, v === true ? "" : String(v)); }
    });
  }
  function image(uri) {   // only the report's own inline images; anything else becomes an empty image
    return typeof uri === "string" && /^data:image\/(png|jpeg);base64,[A-Za-z0-9+\/=]+$/.test(uri) ? uri : "data:image/png;base64,";
  }
  function num(v, d) { return v === null || v === undefined || !isFinite(v) ? "–" : Number(v).toFixed(d === undefined ? 3 : d); }
  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } return node; }
  function worst(checks) {
    return checks.reduce(function (w, c) { return RANK[c.status] > RANK[w] ? c.status : w; }, "PASS");
  }
  function failing(checks) {
    return checks.reduce(function (s, c) { return s + (c.status === "FAIL" ? 2 : c.status === "WARN" ? 1 : 0); }, 0);
  }
  function nOf(s) { return s.n === null || s.n === undefined ? "–" : String(s.n); }
  function option(value, label, selected) { return el("option", { value: value, selected: selected, text: label }); }
  function field(label, control) { return el("label", { "class": "control" }, [label + " ", control]); }

  root.hidden = false;
  clear(root);
  root.appendChild(el("h2", { text: D.kind === "review" ? "Explore the review" : "Explore the results" }));
  root.appendChild(el("p", { "class": "note", text: "Interactive: choose a metric, sort and filter the slices, open a slice for all its metrics and checks; browse the examples below. The rest of the report is unchanged and reads the same without JavaScript." }));

  // --- slice browser ------------------------------------------------------------------------------------
  var S = { metric: D.default_metric, sort: "value", desc: false, key: "", minN: 0, open: null };
  var keys = [];
  D.slices.forEach(function (s) { if (keys.indexOf(s.key) < 0) { keys.push(s.key); } });
  var metricSel = el("select", { id: "sb-metric", on: { change: function () { S.metric = this.value; drawSlices(); } } },
    D.metrics.map(function (m) { return option(m, m, m === S.metric); }));
  var sortSel = el("select", { id: "sb-sort", on: { change: function () { S.sort = this.value; drawSlices(); } } },
    [["value", "value"], ["width", "interval width"], ["n", "n"], ["checks", "failing checks"]].map(function (o) { return option(o[0], o[1], o[0] === S.sort); }));
  var orderSel = el("select", { id: "sb-order", on: { change: function () { S.desc = this.value === "desc"; drawSlices(); } } },
    [option("asc", "ascending", true), option("desc", "descending", false)]);
  var keySel = el("select", { id: "sb-key", on: { change: function () { S.key = this.value; drawSlices(); } } },
    [option("", "all slices", true)].concat(keys.map(function (k) { return option(k, k, false); })));
  var minN = el("input", { id: "sb-minn", type: "number", min: 0, step: 1, value: 0,
    on: { input: function () { S.minN = Math.max(0, parseInt(this.value, 10) || 0); drawSlices(); } } });
  var sliceCount = el("p", { id: "sb-count", "class": "note" });
  var chartBox = el("div", { id: "sb-chart" });
  var sliceTable = el("table", { id: "sb-table", "class": "compact" });
  var detail = el("div", { id: "sb-detail", "class": "detail", hidden: true });
  root.appendChild(el("h3", { text: "Slices" }));
  root.appendChild(el("div", { "class": "controls" }, [field("metric", metricSel), field("sort by", sortSel), field("order", orderSel),
    field("slice column", keySel), field("minimum n", minN)]));
  root.appendChild(sliceCount);
  root.appendChild(chartBox);
  root.appendChild(sliceTable);
  root.appendChild(detail);

  function shownSlices() {
    var rows = D.slices.filter(function (s) { return (!S.key || s.key === S.key) && (s.n || 0) >= S.minN; });
    function v(s) {
      var m = s.m[S.metric];
      if (S.sort === "n") { return s.n === null ? null : s.n; }
      if (S.sort === "checks") { return failing(s.checks); }
      if (!m || s.suppressed || m[0] === null) { return null; }
      if (S.sort === "width") { return m[1] === null || m[2] === null ? null : m[2] - m[1]; }
      return m[0];
    }
    rows = rows.map(function (s, i) { return { s: s, v: v(s), i: i }; });
    rows.sort(function (a, b) {
      if (a.v === null || b.v === null) { return a.v === null ? (b.v === null ? a.i - b.i : 1) : -1; }
      return (a.v === b.v ? a.i - b.i : (S.desc ? b.v - a.v : a.v - b.v));
    });
    return rows.map(function (r) { return r.s; });
  }

  function drawChart(rows) {
    clear(chartBox);
    var bars = rows.filter(function (s) { var m = s.m[S.metric]; return m && !s.suppressed && m[0] !== null; });
    var lines = (D.thresholds[S.metric] || []);
    if (!bars.length) { chartBox.appendChild(el("p", { "class": "note", text: "No slice has a value of " + S.metric + " here." })); return; }
    var lo = Infinity, hi = -Infinity;
    bars.forEach(function (s) { var m = s.m[S.metric]; [m[0], m[1], m[2]].forEach(function (x) { if (x !== null) { lo = Math.min(lo, x); hi = Math.max(hi, x); } }); });
    lines.forEach(function (t) { [t.lower, t.upper].forEach(function (x) { if (x !== null && x !== undefined) { lo = Math.min(lo, x); hi = Math.max(hi, x); } }); });
    if (lo > 0 && lo <= 1 && hi <= 1) { lo = Math.max(0, Math.floor((lo - 0.05) * 10) / 10); } else if (lo > 0) { lo = 0; }
    if (hi <= lo) { hi = lo + 1; }
    // room on the left for the longest label and its n (about 5.8 px a character at this size; past 48
    // characters a name is shortened, its full text in the bar's tooltip)
    var longest = bars.reduce(function (w, s) { return Math.max(w, Math.min(s.label.length, 48) + (" (n=" + nOf(s) + ")").length); }, 8);
    var left = Math.min(330, Math.max(90, 16 + 5.8 * longest)), width = 640, rowH = 20, top = 18;
    var height = top + bars.length * rowH + 24;
    function x(v) { return left + (v - lo) / (hi - lo) * (width - left - 60); }
    var svg = sv("svg", { width: width, height: height, viewBox: "0 0 " + width + " " + height, role: "img",
      "aria-label": S.metric + " per slice", id: "sb-svg" });
    svg.appendChild(sv("text", { x: left, y: 11, "class": "axis" }, S.metric + (D.kind === "review" ? " (candidate − baseline where a delta)" : "")));
    bars.forEach(function (s, i) {
      var m = s.m[S.metric], y = top + i * rowH, status = worst(s.checks.filter(function (c) { return c.metric === S.metric; }));
      var g = sv("g", { "class": "bar " + status + (S.open === s ? " open" : ""), "data-slice": s.label, tabindex: 0,
        on: { click: function () { openSlice(s); }, keydown: function (e) { if (e.key === "Enter") { openSlice(s); } } } });
      var name = s.label.length > 48 ? s.label.slice(0, 47) + "…" : s.label;
      g.appendChild(sv("title", {}, s.label + " (n=" + nOf(s) + "): " + num(m[0]) + " [" + num(m[1]) + ", " + num(m[2]) + "]"));
      g.appendChild(sv("text", { x: left - 6, y: y + 13, "text-anchor": "end" }, name + " (n=" + nOf(s) + ")"));
      var x0 = x(Math.max(lo, Math.min(0, hi))), x1 = x(m[0]);
      g.appendChild(sv("rect", { x: Math.min(x0, x1), y: y + 3, width: Math.max(1, Math.abs(x1 - x0)), height: rowH - 7, "class": "fill" }));
      if (m[1] !== null && m[2] !== null) {
        g.appendChild(sv("line", { x1: x(m[1]), x2: x(m[2]), y1: y + rowH / 2, y2: y + rowH / 2, "class": "whisker" }));
        g.appendChild(sv("line", { x1: x(m[1]), x2: x(m[1]), y1: y + 5, y2: y + rowH - 5, "class": "whisker" }));
        g.appendChild(sv("line", { x1: x(m[2]), x2: x(m[2]), y1: y + 5, y2: y + rowH - 5, "class": "whisker" }));
      }
      g.appendChild(sv("text", { x: Math.max(x0, x1, m[2] === null ? x1 : x(m[2])) + 4, y: y + 13, "class": "value" }, num(m[0])));
      svg.appendChild(g);
    });
    lines.forEach(function (t) {
      [["lower", "≥ "], ["upper", "≤ "]].forEach(function (b) {
        var v = t[b[0]];
        if (v === null || v === undefined) { return; }
        svg.appendChild(sv("line", { x1: x(v), x2: x(v), y1: top - 4, y2: height - 20, "class": "threshold " + t.severity }));
        svg.appendChild(sv("text", { x: x(v), y: height - 8, "text-anchor": "middle", "class": "threshold-label " + t.severity }, b[1] + num(v, 3) + " (" + t.severity + ")"));
      });
    });
    chartBox.appendChild(svg);
  }

  function drawSlices() {
    var rows = shownSlices();
    sliceCount.textContent = rows.length + " of " + D.slices.length + " slices shown · sorted by " +
      { value: "value", width: "interval width", n: "n", checks: "failing checks" }[S.sort] + (S.desc ? ", descending" : ", ascending");
    drawChart(rows);
    clear(sliceTable);
    var extra = D.kind === "review";
    sliceTable.appendChild(el("thead", {}, [el("tr", {}, ["slice", "n", S.metric, "interval"].concat(extra ? ["baseline", "candidate"] : []).concat(["checks"]).map(function (h, i) {
      return el("th", { "class": i && h !== "slice" && h !== "checks" ? "num" : null, text: h }); }))]));
    var body = el("tbody");
    rows.forEach(function (s) {
      var m = s.m[S.metric], st = worst(s.checks);
      var bad = s.checks.filter(function (c) { return c.status !== "PASS"; }).length;
      var cells = [el("td", {}, [el("button", { type: "button", "class": "link", text: s.label, on: { click: function () { openSlice(s); } } })]),
        el("td", { "class": "num", text: s.n === null ? "–" : String(s.n) }),
        el("td", { "class": "num", text: s.suppressed ? "suppressed" : m ? num(m[0]) : "–" }),
        el("td", { "class": "num", text: m && !s.suppressed ? num(m[1]) + "–" + num(m[2]) : "" })];
      if (extra) { cells.push(el("td", { "class": "num", text: m ? num(m[3]) : "–" }), el("td", { "class": "num", text: m ? num(m[4]) : "–" })); }
      cells.push(el("td", { "class": "status " + st, text: s.checks.length ? (bad ? bad + " not passed (" + st + ")" : "all " + s.checks.length + " passed") : "none" }));
      body.appendChild(el("tr", { "class": { FAIL: "flagged", WARN: "warned" }[st] || null, "data-slice": s.label }, cells));
    });
    sliceTable.appendChild(body);
  }

  function openSlice(s) {
    S.open = s;
    clear(detail);
    detail.hidden = false;
    var st = worst(s.checks);
    detail.appendChild(el("h4", {}, [s.label + " · n=" + nOf(s) + " · ", el("span", { "class": "status " + st, text: st })]));
    detail.appendChild(el("button", { type: "button", "class": "close", text: "close", on: { click: function () { detail.hidden = true; S.open = null; drawSlices(); } } }));
    var own = "slice:" + s.key;
    if (s.key === "overall" || fieldSel[own]) {
      detail.appendChild(el("p", {}, [el("button", { type: "button", id: "sb-show-examples", text: "show this slice's embedded examples",
        on: { click: function () { showSliceExamples(s); } } })]));
    }
    var extra = D.kind === "review";
    var t = el("table", { "class": "compact", id: "sb-detail-metrics" }, [el("thead", {}, [el("tr", {}, ["metric", "value", "interval"].concat(extra ? ["baseline", "candidate"] : []).map(function (h) { return el("th", { text: h }); }))])]);
    var b = el("tbody");
    Object.keys(s.m).sort().forEach(function (k) {
      var m = s.m[k];
      var cells = [el("td", { text: k }), el("td", { "class": "num", text: s.suppressed ? "suppressed" : num(m[0]) }), el("td", { "class": "num", text: s.suppressed ? "" : num(m[1]) + "–" + num(m[2]) })];
      if (extra) { cells.push(el("td", { "class": "num", text: num(m[3]) }), el("td", { "class": "num", text: num(m[4]) })); }
      b.appendChild(el("tr", {}, cells));
    });
    t.appendChild(b);
    detail.appendChild(t);
    if (s.checks.length) {
      var c = el("table", { "class": "compact", id: "sb-detail-checks" }, [el("thead", {}, [el("tr", {}, ["status", "metric", "check", "reason"].map(function (h) { return el("th", { text: h }); }))])]);
      var cb = el("tbody");
      s.checks.forEach(function (k) {
        cb.appendChild(el("tr", {}, [el("td", { "class": "status " + k.status, text: k.status }), el("td", { text: k.metric + (k.sub_key ? " [" + k.sub_key + "]" : "") }),
          el("td", { text: (k.kind || "") + (k.gate_on ? " on " + k.gate_on : "") }), el("td", { text: k.message })]));
      });
      c.appendChild(cb);
      detail.appendChild(c);
    } else {
      detail.appendChild(el("p", { "class": "note", text: "No check is made on this slice." }));
    }
    drawSlices();
    detail.scrollIntoView({ block: "nearest" });
  }

  // --- example browser ----------------------------------------------------------------------------------
  var X = D.examples;
  var E = { filters: {}, page: 0, perPage: 8, opacity: 0.6 };
  root.appendChild(el("h3", { text: "Examples" }));
  root.appendChild(el("p", { "class": "note", id: "eb-embedded", text: X.note }));
  var filterBox = el("div", { "class": "controls" });
  var fieldSel = {};
  X.fields.forEach(function (f) {
    var sel = fieldSel[f.id] = el("select", { id: "eb-" + f.id, "data-field": f.id, on: { change: function () {
      if (this.value === "") { delete E.filters[f.id]; } else { E.filters[f.id] = this.value; }
      E.page = 0; drawExamples(); } } },
      [option("", "any", true)].concat(f.values.map(function (v) { return option(v, v, false); })));
    filterBox.appendChild(field(f.label, sel));
  });
  var slider = el("input", { id: "eb-opacity", type: "range", min: 0, max: 100, step: 5, value: 60,
    on: { input: function () { E.opacity = this.value / 100; applyOpacity(); } } });
  var opacityText = el("span", { id: "eb-opacity-value", text: "60%" });
  filterBox.appendChild(field("map opacity", el("span", {}, [slider, " ", opacityText])));
  root.appendChild(filterBox);
  root.appendChild(el("div", { "class": "scale" }, [el("span", { text: "low" }), el("span", { "class": "ramp" }), el("span", { text: "high attribution (each map scaled to its own maximum)" })]));
  var pager = el("div", { "class": "pager" });
  var prev = el("button", { type: "button", id: "eb-prev", text: "◀ previous", on: { click: function () { E.page -= 1; drawExamples(); } } });
  var next = el("button", { type: "button", id: "eb-next", text: "next ▶", on: { click: function () { E.page += 1; drawExamples(); } } });
  var pageText = el("span", { id: "eb-page" });
  pager.appendChild(prev); pager.appendChild(pageText); pager.appendChild(next);
  root.appendChild(pager);
  var grid = el("div", { id: "eb-grid", "class": "eb-grid" });
  root.appendChild(grid);
  var box = el("div", { id: "eb-lightbox", "class": "lightbox", hidden: true, role: "dialog", "aria-modal": "true",
    on: { click: function (e) { if (e.target === box) { box.hidden = true; } } } });
  root.appendChild(box);
  document.addEventListener("keydown", function (e) { if (e.key === "Escape") { box.hidden = true; } });

  function showSliceExamples(s) {   // the example browser, filtered to this slice alone
    E.filters = {};
    Object.keys(fieldSel).forEach(function (k) { fieldSel[k].value = ""; });
    if (s.key !== "overall") { E.filters["slice:" + s.key] = s.value; fieldSel["slice:" + s.key].value = s.value; }
    E.page = 0;
    drawExamples();
    grid.scrollIntoView({ block: "start" });
  }
  function applyOpacity() {
    opacityText.textContent = Math.round(E.opacity * 100) + "%";
    Array.prototype.forEach.call(root.querySelectorAll("img.overlay"), function (img) { img.style.opacity = String(E.opacity); });
  }
  function matching() {
    return X.rows.filter(function (r) {
      return Object.keys(E.filters).every(function (k) { return r.f[k] === E.filters[k]; });
    });
  }
  // the maps arrive as greyscale PNGs (0-255, a quarter of the bytes); they are coloured here once each with
  // the report's ramp, opacity growing with the value (the square root, as the static report's overlays)
  var LUT = (function () {
    var a = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], out = new Uint8ClampedArray(1024);
    for (var v = 0; v < 256; v++) {
      var x = v / 255 * 4, i = Math.min(Math.floor(x), 3), f = x - i;
      for (var c = 0; c < 3; c++) { out[v * 4 + c] = Math.round(a[i][c] * (1 - f) + a[i + 1][c] * f); }
      out[v * 4 + 3] = Math.round(255 * Math.sqrt(v / 255));
    }
    return out;
  }());
  var coloured = {};
  function colourise(uri, img) {
    function show(url) { img.src = url; img.style.visibility = "visible"; }
    if (coloured[uri]) { show(coloured[uri]); return; }
    var src = new Image();
    src.onload = function () {
      var c = document.createElement("canvas");
      c.width = src.naturalWidth; c.height = src.naturalHeight;
      var g = c.getContext("2d");
      g.drawImage(src, 0, 0);
      var d = g.getImageData(0, 0, c.width, c.height), px = d.data;
      for (var k = 0; k < px.length; k += 4) {
        var v = px[k] * 4;
        px[k] = LUT[v]; px[k + 1] = LUT[v + 1]; px[k + 2] = LUT[v + 2]; px[k + 3] = LUT[v + 3];
      }
      g.putImageData(d, 0, 0);
      coloured[uri] = c.toDataURL("image/png");
      show(coloured[uri]);
    };
    src.src = image(uri);
  }
  function stack(base, overlay, label, large) {
    var kids = [el("img", { src: base, alt: "input", "class": "base" })];
    if (overlay) {
      var o = el("img", { alt: label, "class": "overlay" });
      o.style.opacity = String(E.opacity);
      o.style.visibility = "hidden";
      colourise(overlay, o);
      kids.push(o);
    }
    return el("div", { "class": "stack" + (large ? " large" : "") }, kids);
  }
  function enlarge(r, title, overlay) {
    clear(box);
    box.appendChild(el("div", { "class": "panel" }, [
      el("button", { type: "button", "class": "close", id: "eb-close", text: "close", on: { click: function () { box.hidden = true; } } }),
      el("h4", { text: r.id + " · " + title }), stack(r.image, overlay, title, true),
      el("p", { "class": "note", text: r.caption })]));
    box.hidden = false;
  }
  function figure(r, title, overlay, sub) {
    return el("figure", { tabindex: 0, title: "enlarge", on: { click: function () { enlarge(r, title, overlay); }, keydown: function (e) { if (e.key === "Enter") { enlarge(r, title, overlay); } } } },
      [stack(r.image, overlay, title, false), el("figcaption", { text: title + (sub ? " · " + sub : "") })]);
  }
  function drawExamples() {
    var rows = matching(), pages = Math.max(1, Math.ceil(rows.length / E.perPage));
    E.page = Math.max(0, Math.min(E.page, pages - 1));
    var first = E.page * E.perPage, shown = rows.slice(first, first + E.perPage);
    pageText.textContent = rows.length ? " page " + (E.page + 1) + " of " + pages + " · examples " + (first + 1) + "–" + (first + shown.length) + " of " + rows.length + " matching " : " no embedded example matches ";
    prev.disabled = E.page === 0; next.disabled = E.page >= pages - 1;
    clear(grid);
    shown.forEach(function (r) {
      var figs = [figure(r, "input", null, "")];
      X.methods.forEach(function (m) {
        (r.maps[m] || []).forEach(function (uri, j) {
          var role = X.roles[j];
          var empty = !role && r.empty && r.empty.indexOf(m) >= 0;
          figs.push(figure(r, m + (role ? " · " + role : ""), uri, role && r.role_caption ? r.role_caption[j] : (empty ? "empty map" : (r.stat && r.stat[m] !== undefined && r.stat[m] !== null ? X.stat + " " + num(r.stat[m], 2) : ""))));
        });
      });
      grid.appendChild(el("div", { "class": "eb-card" + (r.wrong ? " wrong" : ""), "data-example": r.id }, [
        el("div", { "class": "eb-head" }, [el("span", { "class": "mono", text: r.id }), " · " + r.caption + (r.why ? " · shown in the report: " + r.why : "")]),
        el("div", { "class": "eb-figs" }, figs)]));
    });
  }
  metricSel.value = S.metric;
  drawSlices();
  drawExamples();
}());
