// Interactive charts (uPlot): a run's curves on its page, appended to while it trains, and several runs'
// curves overlaid on the compare page. Fed by JSON (the run's metrics.json, the compare page's), never by
// inline script: the Content-Security-Policy forbids it. uPlot sizes and colours its own elements through
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
    time: { label: "time", of: function (p, t0) { return p.time == null || t0 == null ? null : p.time - t0; }, format: duration }
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
      scales: { x: { time: false }, y: { distr: view.log ? 3 : 1 } },
      legend: { live: true },
      axes: [
        { stroke: ink, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 }, label: axis.label,
          labelSize: 18, values: function (u, splits) { return splits.map(axis.format); } },
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

  // Draw `spec` for these runs ([{label, colour?, points}]) into its figure: new chart, or new data for the old.
  function draw(container, spec, runs, view, state) {
    var fig = figureFor(container, spec);
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
    var old = state.charts[spec.title];
    var signature = lines.map(function (l) { return l.label; }).join("\n") + "|" + view.x + view.log;
    fig.classList.add("drawn");
    showEmpty(fig, !tables.length);
    if (!tables.length) {
      if (old) { old.u.destroy(); delete state.charts[spec.title]; }
      return;
    }
    var data = tables.length === 1 ? tables[0] : uPlot.join(tables);
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

  document.addEventListener("DOMContentLoaded", function () {
    if (typeof uPlot === "undefined") return; // the captions' latest values stay: the page reads without charts
    document.querySelectorAll("[data-run-charts]").forEach(runPage);
    document.querySelectorAll("[data-compare-charts]").forEach(comparePage);
  });

  window.TunedeckCharts = { figure: figure, tick: tick, compact: compact, duration: duration };
})();
