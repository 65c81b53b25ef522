// Interactive charts (uPlot): a run's curves on its page, appended to while it trains, several runs'
// curves overlaid on the compare page, and a worker's GPU use (memory and utilisation from its heartbeats) on
// its page and, small, on the workers list. Fed by JSON (the run's metrics.json, the compare page's, the
// worker's telemetry.json), never by inline script: the Content-Security-Policy forbids it. uPlot sizes and colours its own elements through
// the CSSOM (element.style.width = ...), which the policy's style-src 'self' allows; it writes no style
// attribute into markup. Hover shows every series' value at the cursor, dragging zooms (double-click resets),
// a legend entry toggles its series.
(function () {
  "use strict";
  var HEIGHT = 280;
  var MISSING = "—";
  // training.css's series classes, and the colour variable each draws with (the last class that has one wins).
  var CLASS_COLOURS = { series: "--accent", eval: "--warn", lr: "--ok", grad: "--bad", tput: "--run",
    chosen: "--ok", rejected: "--bad", c2: "--run", c3: "--warn", c4: "--muted" };
  var RUN_COLOURS = 10; // charts.css: --run-colour-1 ... --run-colour-10, one per compared run

  function cssVar(name, fallback) {
    var value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return value || fallback;
  }

  function classColour(css) {
    var name = "--accent";
    (css || "").split(/\s+/).forEach(function (c) { if (CLASS_COLOURS[c]) name = CLASS_COLOURS[c]; });
    return cssVar(name, "#3656d6");
  }

  function runColour(index) { return cssVar("--run-colour-" + ((index % RUN_COLOURS) + 1), "#3656d6"); }

  // ---- numbers, as workers/formatting.py writes them -------------------------------------------------------

  function trimmed(text) { return text.replace(/\.?0+e/, "e").replace("e+", "e"); }

  // A figure: 3 significant digits; whole with separators from 1,000; scientific below 0.001 and from 1e6.
  function figure(v) {
    if (v == null || !isFinite(v)) return MISSING;
    var a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e6 || a < 1e-3) return trimmed(v.toExponential(2));
    if (a >= 1000) return Math.round(v).toLocaleString("en-US");
    return String(Number(v.toPrecision(3)));
  }

  function compact(v) {
    if (v == null || !isFinite(v)) return MISSING;
    var units = [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "K"]];
    for (var i = 0; i < units.length; i++) {
      if (Math.abs(v) >= units[i][0]) return String(Number((v / units[i][0]).toPrecision(3))) + units[i][1];
    }
    return String(Math.round(v));
  }

  function duration(s) {
    if (s == null || !isFinite(s)) return MISSING;
    if (Math.abs(s) < 60) return String(Number(s.toPrecision(3))) + " s";
    if (Math.abs(s) < 3600) return String(Number((s / 60).toPrecision(3))) + " min";
    return String(Number((s / 3600).toPrecision(3))) + " h";
  }

  function count(v) { return v == null || !isFinite(v) ? MISSING : Math.round(v).toLocaleString("en-US"); }

  // A time of day (epoch seconds, the browser's time zone), 24-hour: seconds shown unless ticks are minutes apart.
  function clock(s, incr) {
    if (s == null || !isFinite(s)) return MISSING;
    var parts = { hour: "2-digit", minute: "2-digit", hourCycle: "h23" };
    if (!(incr >= 60)) parts.second = "2-digit";
    return new Date(s * 1000).toLocaleTimeString("en-GB", parts);
  }

  // An axis tick: as many digits as the spacing of the ticks needs, so neighbours never read the same.
  function tick(v, incr) {
    if (v == null) return ""; // a log scale leaves some of its ticks unlabelled
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a >= 1e6 || a < 1e-3) {
      var digits = Math.max(0, Math.floor(Math.log10(a)) - Math.floor(Math.log10(incr || a)));
      return trimmed(v.toExponential(Math.min(digits, 4)));
    }
    if (a >= 1000 && incr >= 1) return Math.round(v).toLocaleString("en-US");
    var decimals = incr > 0 ? Math.max(0, Math.ceil(-Math.log10(incr) - 1e-9)) : 3;
    return v.toFixed(Math.min(decimals, 6));
  }

  // ---- what the x-axis is ----------------------------------------------------------------------------------

  var AXES = {
    step: { label: "step", of: function (p) { return p.step; }, format: count },
    tokens: { label: "tokens seen", of: function (p) { return p.num_tokens; }, format: compact },
    time: { label: "time", of: function (p, t0) { return p.time == null || t0 == null ? null : p.time - t0; }, format: duration },
    clock: { label: "time of day", of: function (p) { return p.time; }, format: clock, time: true }
  };

  function firstTime(points) {
    for (var i = 0; i < points.length; i++) if (typeof points[i].time === "number") return points[i].time;
    return null;
  }

  // One series as [xs, ys]: ascending x, one value per x (the latest), smoothed (an exponential moving average,
  // debiased as TensorBoard's), and without values a log scale cannot draw.
  function table(points, key, view) {
    var axis = AXES[view.x] || AXES.step;
    var t0 = firstTime(points);
    var byX = new Map();
    points.forEach(function (p) {
      var x = axis.of(p, t0), y = p[key];
      if (typeof x === "number" && isFinite(x) && typeof y === "number" && isFinite(y)) byX.set(x, y);
    });
    var xs = Array.from(byX.keys()).sort(function (a, b) { return a - b; });
    var ys = xs.map(function (x) { return byX.get(x); });
    if (view.smoothing > 0) {
      var w = Math.min(view.smoothing, 0.99), last = 0;
      ys = ys.map(function (y, i) { last = last * w + (1 - w) * y; return last / (1 - Math.pow(w, i + 1)); });
    }
    if (view.log) ys = ys.map(function (y) { return y > 0 ? y : null; });
    return [xs, ys];
  }

  // ---- one chart -------------------------------------------------------------------------------------------

  // The value a series has at the cursor; where it has no point at that x (runs logged at other steps), its
  // nearest point within its own range; with no cursor, its latest value.
  function seriesValue(u, v, si, idx) {
    var ys = u.data[si];
    if (v != null) return figure(v);
    if (!ys || !ys.length) return MISSING;
    var first = -1, last = -1;
    for (var i = 0; i < ys.length; i++) if (ys[i] != null) { if (first < 0) first = i; last = i; }
    if (first < 0) return MISSING;
    if (idx == null) return figure(ys[last]);
    if (idx < first || idx > last) return MISSING;
    for (var d = 1; d < ys.length; d++) {
      if (idx - d >= 0 && ys[idx - d] != null) return figure(ys[idx - d]);
      if (idx + d < ys.length && ys[idx + d] != null) return figure(ys[idx + d]);
    }
    return MISSING;
  }

  function options(width, lines, view, hidden) {
    var axis = AXES[view.x] || AXES.step;
    var ink = cssVar("--muted", "#5d6677"), grid = cssVar("--line", "#dde1e8");
    return {
      width: width, height: HEIGHT,
      cursor: { drag: { x: true, y: false }, points: { size: 7 } },
      scales: { x: { time: !!axis.time }, y: view.range ? { range: view.range } : { distr: view.log ? 3 : 1 } },
      legend: { live: true },
      axes: [
        { stroke: ink, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 }, label: axis.label,
          labelSize: 18, values: function (u, splits, ai, space, incr) {
            return splits.map(function (v) { return axis.format(v, incr); });
          } },
        { stroke: ink, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 }, size: 64,
          values: function (u, splits, ai, space, incr) { return splits.map(function (v) { return tick(v, incr); }); } }
      ],
      // Without a cursor the legend shows each series' latest value.
      series: [{ label: axis.label, value: function (u, v) { return v == null ? "latest" : axis.format(v); } }].concat(
        lines.map(function (line) {
          return { label: line.label, stroke: line.colour, width: 1.6, dash: line.dashed ? [6, 4] : undefined,
            spanGaps: true, show: !hidden[line.label], points: { show: false }, value: seriesValue };
        })),
      hooks: {
        setSeries: [function (u, si, opts) {
          if (si != null && opts && opts.show != null) hidden[u.series[si].label] = !opts.show;
        }],
        // The x range shown, on the element (zoomed in by a drag, back to all by a double-click).
        setScale: [function (u, key) {
          if (key === "x") u.root.parentNode.dataset.xRange = axis.format(u.scales.x.min) + " – " + axis.format(u.scales.x.max);
        }]
      }
    };
  }

  function figureFor(container, spec) {
    var found = null;
    container.querySelectorAll("figure.chart").forEach(function (f) { if (f.dataset.title === spec.title) found = f; });
    if (found) return found;
    var fig = document.createElement("figure");
    fig.className = "chart";
    fig.dataset.title = spec.title;
    var caption = document.createElement("figcaption");
    var strong = document.createElement("strong");
    strong.textContent = spec.title; // titles and names come from metric keys a worker reported: text, never markup
    caption.appendChild(strong);
    if (spec.unit) {
      var unit = document.createElement("small");
      unit.className = "muted";
      unit.textContent = spec.unit;
      caption.appendChild(document.createTextNode(" "));
      caption.appendChild(unit);
    }
    fig.appendChild(caption);
    container.appendChild(fig);
    return fig;
  }

  function plotOf(fig) {
    var plot = fig.querySelector(".chart-plot");
    if (!plot) {
      plot = document.createElement("div");
      plot.className = "chart-plot";
      fig.appendChild(plot);
    }
    return plot;
  }

  function showEmpty(fig, empty) {
    var note = fig.querySelector(".chart-empty");
    if (empty && !note) {
      note = document.createElement("p");
      note.className = "muted chart-empty";
      note.textContent = "No points yet.";
      fig.appendChild(note);
    }
    if (note) note.hidden = !empty;
  }

  function isZoomed(u) {
    var xs = u.data[0];
    if (!xs || !xs.length) return false;
    return u.scales.x.min > xs[0] || u.scales.x.max < xs[xs.length - 1];
  }

  // The lines of `spec` for these runs ([{label, colour?, points}]), and each line's [xs, ys]; a line with no
  // point is left out.
  function linesOf(spec, runs, view) {
    var lines = [], tables = [];
    runs.forEach(function (run, ri) {
      spec.series.forEach(function (s) {
        var t = table(run.points, s.key, view);
        if (!t[0].length) return;
        lines.push({ label: runs.length > 1 ? run.label + " " + s.name : s.name,
          colour: runs.length > 1 ? runColour(ri) : classColour(s.css), dashed: s.dashed });
        tables.push(t);
      });
    });
    return { lines: lines, tables: tables, data: tables.length > 1 ? uPlot.join(tables) : tables[0] };
  }

  // Draw `spec` for these runs into its figure: new chart, or new data for the old.
  function draw(container, spec, runs, view, state) {
    var fig = figureFor(container, spec);
    var built = linesOf(spec, runs, view), lines = built.lines, tables = built.tables;
    var old = state.charts[spec.title];
    var signature = lines.map(function (l) { return l.label; }).join("\n") + "|" + view.x + view.log;
    fig.classList.add("drawn");
    showEmpty(fig, !tables.length);
    if (!tables.length) {
      if (old) { old.u.destroy(); delete state.charts[spec.title]; }
      return;
    }
    var data = built.data;
    var plot = plotOf(fig);
    plot.dataset.points = String(data[0].length);
    if (old && old.signature === signature) {
      old.u.setData(data, !isZoomed(old.u));
      return;
    }
    if (old) old.u.destroy();
    var u = new uPlot(options(plot.clientWidth || container.clientWidth || 320, lines, view, state.hidden), data, plot);
    state.charts[spec.title] = { u: u, signature: signature, plot: plot };
  }

  function drawAll(container, specs, runs, view, state) {
    specs.forEach(function (spec) { draw(container, spec, runs, view, state); });
  }

  // Charts follow their figure's width: a phone's, or the window's as it resizes.
  function followWidth(container, state) {
    if (!window.ResizeObserver) return;
    new ResizeObserver(function () {
      Object.keys(state.charts).forEach(function (title) {
        var c = state.charts[title];
        var width = c.plot.clientWidth;
        if (width && width !== c.u.width) c.u.setSize({ width: width, height: HEIGHT });
      });
    }).observe(container);
  }

  // ---- controls: x-axis, smoothing, log scale ----------------------------------------------------------------

  function readView(form) {
    if (!form) return { x: "step", smoothing: 0, log: false };
    var x = form.querySelector("[name=x]"), smoothing = form.querySelector("[name=smoothing]"), log = form.querySelector("[name=log]");
    var view = { x: x ? x.value : "step", smoothing: smoothing ? Number(smoothing.value) : 0, log: !!(log && log.checked) };
    var shown = form.querySelector("output");
    if (shown) shown.textContent = view.smoothing ? view.smoothing.toFixed(2) : "off";
    return view;
  }

  function onControls(form, redraw) {
    if (!form) return;
    form.addEventListener("input", redraw);
    form.addEventListener("change", redraw);
    form.addEventListener("submit", function (evt) { evt.preventDefault(); });
  }

  function getJSON(url) {
    return fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" }).then(function (r) {
      if (!r.ok) throw new Error(url + ": HTTP " + r.status);
      return r.json();
    });
  }

  // ---- the run page: its charts, fetched, then appended to while it trains ---------------------------------

  function runPage(root) {
    var container = root.querySelector(".charts");
    var form = root.querySelector("form.chart-controls");
    var url = root.dataset.metricsUrl;
    var state = { charts: {}, hidden: {} };
    var byStep = new Map(), specs = [], attempt = null, final = root.dataset.final === "true", busy = false;

    function points() { return Array.from(byStep.keys()).sort(function (a, b) { return a - b; }).map(function (s) { return byStep.get(s); }); }
    function redraw() { drawAll(container, specs, [{ label: "", points: points() }], readView(form), state); }

    function refresh() {
      if (busy) return;
      busy = true;
      var last = byStep.size ? Math.max.apply(null, Array.from(byStep.keys())) : null;
      // The last step again: an eval point may since have joined it.
      getJSON(url + (last != null ? "?after=" + (last - 1) : "")).then(function (body) {
        if (attempt !== null && body.attempt !== attempt && last != null) {
          byStep.clear(); // a new attempt may have replaced the curve past its checkpoint: read it all again
          attempt = body.attempt; busy = false; refresh(); return;
        }
        attempt = body.attempt;
        body.points.forEach(function (p) { byStep.set(p.step, p); });
        specs = body.charts;
        final = body.final;
        redraw();
        busy = false;
      }).catch(function () { busy = false; });
    }

    onControls(form, redraw);
    followWidth(container, state);
    refresh();
    // New points: the run's stream sends its status when metrics arrive; a slow poll covers a lost stream.
    var pending = null;
    document.addEventListener("htmx:sseMessage", function (evt) {
      if (final || !evt.detail || evt.detail.type !== "status" || pending) return;
      pending = setTimeout(function () { pending = null; refresh(); }, 300);
    });
    var poll = setInterval(function () { if (final) clearInterval(poll); else refresh(); }, 10000);
  }

  // ---- the compare page: every run's curves overlaid -------------------------------------------------------

  function comparePage(root) {
    var container = root.querySelector(".charts");
    var form = root.querySelector("form.chart-controls");
    var state = { charts: {}, hidden: {} };
    var body = null;

    function redraw() { if (body) drawAll(container, body.charts, body.runs, readView(form), state); }
    function load() {
      getJSON(root.dataset.metricsUrl).then(function (b) {
        body = b;
        redraw();
        root.dataset.loaded = "true";
        if (b.runs.some(function (r) { return !r.final; })) setTimeout(load, 10000);
      });
    }
    onControls(form, redraw);
    followWidth(container, state);
    load();
  }

  // ---- a worker's GPUs: memory in use and utilisation from its heartbeats (telemetry.json) -----------------

  // Each GPU of the JSON ({index, title, memory_total_gib, points}) is a chart of these two lines, 0-100%.
  var GPU_SERIES = [{ key: "memory_percent", name: "memory %", short: "memory", css: "series" },
    { key: "utilization", name: "busy %", short: "busy", css: "lr" }];
  var GPU_VIEW = { x: "clock", smoothing: 0, log: false, range: [0, 100] };
  var PREVIEW_WIDTH = 150, PREVIEW_HEIGHT = 34;

  function gpuSpec(gpu) {
    return { title: gpu.title, series: GPU_SERIES,
      unit: gpu.memory_total_gib ? "% · " + figure(gpu.memory_total_gib) + " GiB of memory" : "%" };
  }

  function gpuLines(gpu) { return linesOf(gpuSpec(gpu), [{ label: "", points: gpu.points }], GPU_VIEW); }

  // Call `load` (which returns a promise) now and every `ms` while the page shows; none while the tab is hidden,
  // one at once when it shows again. Never two at a time.
  function whileVisible(load, ms) {
    var busy = false;
    function tick() {
      if (busy || document.hidden) return;
      busy = true;
      load().catch(function () { /* keep what is drawn; the next tick tries again */ }).then(function () { busy = false; });
    }
    tick();
    setInterval(tick, ms);
    document.addEventListener("visibilitychange", function () { if (!document.hidden) tick(); });
  }

  // The worker's page: a large chart per GPU (hover values and time, drag-zoom, legend toggles), kept current.
  function gpuPage(root) {
    var container = root.querySelector(".charts"), empty = root.querySelector(".gpu-empty");
    var state = { charts: {}, hidden: {} };

    function refresh() {
      return getJSON(root.dataset.telemetryUrl).then(function (body) {
        var sampled = body.gpus.filter(function (gpu) { return gpu.points.length; });
        sampled.forEach(function (gpu) { draw(container, gpuSpec(gpu), [{ label: "", points: gpu.points }], GPU_VIEW, state); });
        if (empty) empty.hidden = sampled.length > 0;
        root.dataset.loaded = "true";
      });
    }
    followWidth(container, state);
    whileVisible(refresh, 1000 * (Number(root.dataset.pollSeconds) || 5));
  }

  // What a preview says: each line's value at the cursor and its time, else the latest values.
  function previewText(u) {
    var idx = u.cursor.idx;
    var values = GPU_SERIES.map(function (s) {
      var si = u.series.findIndex(function (line) { return line.label === s.name; });
      if (si < 1) return null;
      return s.short + " " + seriesValue(u, idx == null ? null : u.data[si][idx], si, idx) + "%";
    }).filter(Boolean);
    return (idx == null ? "now" : clock(u.data[0][idx])) + ": " + values.join(", ");
  }

  function previewOptions(lines, readout) {
    return {
      width: PREVIEW_WIDTH, height: PREVIEW_HEIGHT, legend: { show: false },
      cursor: { drag: { x: false, y: false, setScale: false }, y: false, points: { size: 5 } },
      select: { show: false },
      scales: { x: { time: true }, y: { range: GPU_VIEW.range } },
      axes: [{ show: false }, { show: false }],
      series: [{}].concat(lines.map(function (line) {
        return { label: line.label, stroke: line.colour, width: 1.4, spanGaps: true, points: { show: false } };
      })),
      hooks: { setCursor: [function (u) { readout.textContent = previewText(u); }] }
    };
  }

  // One GPU's preview in its slot of the workers list: a small chart (no axes) and a line of text under it.
  function drawPreview(slot, gpu, previews, key) {
    var built = gpuLines(gpu), old = previews[key];
    if (!built.tables.length) { slot.hidden = true; return; }
    if (old && old.labels === built.lines.map(function (l) { return l.label; }).join("\n")) {
      if (old.box.parentNode !== slot) slot.appendChild(old.box);
      old.u.setData(built.data);
      old.readout.textContent = previewText(old.u);
    } else {
      if (old) { old.u.destroy(); old.box.remove(); }
      var box = document.createElement("span"), plot = document.createElement("span"), readout = document.createElement("small");
      box.className = "gpu-preview-chart";
      readout.className = "gpu-preview-value";
      box.appendChild(plot);
      box.appendChild(readout);
      slot.appendChild(box);
      var u = new uPlot(previewOptions(built.lines, readout), built.data, plot);
      readout.textContent = previewText(u);
      previews[key] = { u: u, box: box, readout: readout, labels: built.lines.map(function (l) { return l.label; }).join("\n") };
    }
    slot.hidden = false;
    slot.dataset.points = String(built.data[0].length);
  }

  // The workers list: each GPU's preview. The list's rows are replaced every few seconds (htmx): a preview moves
  // into its new row at once (no flicker), then takes the worker's new samples.
  function gpuPreviews(list, previews) {
    var url = list.dataset.telemetryUrl;
    list.querySelectorAll(".gpu-preview[data-gpu]").forEach(function (slot) {
      var old = previews[url + "#" + slot.dataset.gpu];
      if (old && old.box.parentNode !== slot) { slot.appendChild(old.box); slot.hidden = false; }
    });
    getJSON(url).then(function (body) {
      body.gpus.forEach(function (gpu) {
        var slot = list.querySelector('.gpu-preview[data-gpu="' + gpu.index + '"]');
        if (slot) drawPreview(slot, gpu, previews, url + "#" + gpu.index);
      });
    }).catch(function () { /* the row's figures stay; the next refresh tries again */ });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (typeof uPlot === "undefined") return; // the captions' latest values stay: the page reads without charts
    document.querySelectorAll("[data-run-charts]").forEach(runPage);
    document.querySelectorAll("[data-compare-charts]").forEach(comparePage);
    document.querySelectorAll("[data-gpu-charts]").forEach(gpuPage);
    var previews = {};
    document.querySelectorAll("[data-gpu-previews]").forEach(function (list) { gpuPreviews(list, previews); });
    document.body.addEventListener("htmx:afterSwap", function (evt) {
      evt.detail.target.querySelectorAll("[data-gpu-previews]").forEach(function (list) { gpuPreviews(list, previews); });
      Object.keys(previews).forEach(function (key) { // a worker deleted, or its GPU gone: its chart goes too
        if (!previews[key].box.isConnected) { previews[key].u.destroy(); delete previews[key]; }
      });
    });
  });

  window.TunedeckCharts = { figure: figure, tick: tick, compact: compact, duration: duration, clock: clock };
})();
