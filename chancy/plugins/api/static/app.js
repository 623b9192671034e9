// Chancy dashboard behaviour. No inline scripts: the Content-Security-Policy forbids them.
(function () {
  "use strict";

  // Forms with data-confirm ask first.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  }, true);

  var COLORS = {
    succeeded: "#2f9e44", failed: "#e03131", cancelled: "#868e96",
    "jobs.succeeded": "#2f9e44", "jobs.failed": "#e03131", "jobs.retried": "#f08c00",
    "jobs.cancelled": "#868e96", "mean (s)": "#1c7ed6", "max (s)": "#ae3ec9",
    "queue.depth": "#1c7ed6", "queue.running": "#2f9e44"
  };
  var PALETTE = ["#1c7ed6", "#2f9e44", "#e03131", "#f08c00", "#ae3ec9", "#868e96"];

  function pick(body, key) {
    return key.split(".").reduce(function (value, part) {
      return value == null ? value : value[part];
    }, body);
  }

  function drawChart(el) {
    var src = el.getAttribute("data-src");
    if (!src) { return; }
    var key = el.getAttribute("data-key") || "throughput";
    fetch(src, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (body) {
        var data = pick(body, key);
        if (!data) { throw new Error(body.plugin_error || "no data"); }
        var names = Object.keys(data).filter(function (n) { return n !== "t" && n !== "since"; });
        var series = [{}];
        var columns = [data.t];
        names.forEach(function (name, i) {
          var color = COLORS[name] || PALETTE[i % PALETTE.length];
          var sparse = data[name].some(function (v) { return v == null; });
          series.push({ label: name, stroke: color, width: 2, fill: color + "22",
                        points: { show: sparse, size: 6 }, spanGaps: false });
          columns.push(data[name]);
        });
        var width = Math.max(320, el.clientWidth - 16 || 800);
        if (typeof window.uPlot === "function") {
          if (el._plot) {
            el._plot.setData(columns);
          } else {
            el.textContent = "";
            el._plot = new window.uPlot(
              { width: width, height: 220, series: series, scales: { x: { time: true } },
                axes: [{}, { label: el.getAttribute("data-label") || "" }] },
              columns, el);
          }
        } else {
          drawFallback(el, columns, names, width);
        }
        el.setAttribute("data-points", String(data.t.length));
        el.title = data.since ? "Only the newest jobs were counted: complete since " +
          new Date(data.since * 1000).toLocaleString() : "";
      })
      .catch(function (error) {
        el.textContent = "Chart unavailable (" + error.message + ").";
      });
  }

  // A plain SVG line chart in case uPlot did not load.
  function drawFallback(el, columns, names, width) {
    var ns = "http://www.w3.org/2000/svg";
    var height = 220;
    var max = 1;
    columns.slice(1).forEach(function (col) {
      col.forEach(function (v) { if (v != null && v > max) { max = v; } });
    });
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    columns.slice(1).forEach(function (col, i) {
      var points = col.map(function (v, j) {
        var x = (j / Math.max(1, col.length - 1)) * (width - 10) + 5;
        var y = height - 5 - ((v || 0) / max) * (height - 10);
        return x.toFixed(1) + "," + y.toFixed(1);
      });
      var line = document.createElementNS(ns, "polyline");
      line.setAttribute("points", points.join(" "));
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", COLORS[names[i]] || PALETTE[i % PALETTE.length]);
      svg.appendChild(line);
    });
    el.textContent = "";
    el.appendChild(svg);
  }

  function drawAll() {
    document.querySelectorAll(".chart[data-src]").forEach(drawChart);
  }

  document.addEventListener("DOMContentLoaded", function () {
    drawAll();
    window.setInterval(drawAll, 10000);
  });
})();
