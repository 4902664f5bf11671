/* The Reports page (reporting/reports_pages.py): the browser's time zone as the default, and
   the charts, drawn with the vendored Chart.js from the figures the server put in
   #tm-report-charts (the same report bodies as the tables). */
(function () {
  "use strict";

  // Tableau 10: distinguishable, and readable on the light and the dark admin theme.
  var PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                 "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

  function adoptBrowserZone() {
    // A first visit names no zone: report in the browser's, once (replace: no extra history).
    var form = document.getElementById("tm-report-form");
    if (!form || form.dataset.tzFromBrowser !== "1") return false;
    var zone;
    try {
      zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    } catch (e) {
      return false;
    }
    var select = form.elements.namedItem("tz");
    var known = Array.prototype.some.call(select.options, function (o) { return o.value === zone; });
    if (!zone || !known || zone === select.value) return false;
    var params = new URLSearchParams(window.location.search);
    params.set("tz", zone);
    window.location.replace(window.location.pathname + "?" + params.toString());
    return true;
  }

  function cssVar(name, fallback) {
    var value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return value || fallback;
  }

  function usd(value) {
    return "$" + Number(value).toLocaleString(undefined, { maximumFractionDigits: 6 });
  }

  function numbers(values) {
    return values.map(Number); // exact decimals from the server; floats only for drawing
  }

  function seriesChart(canvas, series) {
    return new Chart(canvas, {
      type: "bar",
      data: {
        labels: series.labels,
        datasets: series.datasets.map(function (d, i) {
          return { label: d.label, data: numbers(d.data), backgroundColor: PALETTE[i % PALETTE.length] };
        }),
      },
      options: {
        interaction: { mode: "index", intersect: false },
        scales: {
          x: { stacked: true, ticks: { autoSkip: true, maxRotation: 0 } },
          y: { stacked: true, beginAtZero: true, ticks: { callback: usd } },
        },
        plugins: {
          legend: { position: "bottom", labels: { boxWidth: 12, generateLabels: clippedBarLegend } },
          tooltip: {
            filter: function (item) { return item.parsed.y !== 0; },
            callbacks: {
              label: function (item) { return item.dataset.label + ": " + usd(item.parsed.y); },
              footer: function (items) {
                var sum = items.reduce(function (s, item) { return s + item.parsed.y; }, 0);
                return "Total: " + usd(sum);
              },
            },
          },
        },
      },
    });
  }

  function topChart(canvas, top) {
    return new Chart(canvas, {
      type: "bar",
      data: {
        labels: top.labels,
        datasets: [{ label: "Cost (USD)", data: numbers(top.cost), backgroundColor: PALETTE[0] }],
      },
      options: {
        indexAxis: "y",
        scales: {
          x: { beginAtZero: true, ticks: { callback: usd } },
          y: { ticks: { callback: function (v) { return clip(this.getLabelForValue(v)); } } },
        },
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: { label: function (item) { return usd(item.parsed.x); } } },
        },
      },
    });
  }

  function mixChart(canvas, mix) {
    return new Chart(canvas, {
      type: "doughnut",
      data: {
        labels: mix.labels,
        datasets: [{
          data: numbers(mix.values),
          backgroundColor: mix.labels.map(function (_l, i) { return PALETTE[i % PALETTE.length]; }),
          borderColor: cssVar("--body-bg", "#fff"),
        }],
      },
      options: {
        plugins: {
          legend: {
            position: "right",
            labels: { boxWidth: 12, generateLabels: clippedLegend },
          },
          tooltip: {
            callbacks: {
              label: function (item) {
                var value = mix.measure === "cost" ? usd(item.parsed) : item.parsed + " requests";
                return item.label + ": " + value;
              },
            },
          },
        },
      },
    });
  }

  // Ids and model names run to 128 characters: axis and legend show the start of them.
  function clip(text) {
    text = String(text);
    return text.length > 28 ? text.slice(0, 27) + "…" : text;
  }

  function clippedBarLegend(chart) {
    var items = Chart.defaults.plugins.legend.labels.generateLabels(chart);
    items.forEach(function (item) { item.text = clip(item.text); });
    return items;
  }

  function clippedLegend(chart) {
    var items = Chart.overrides.doughnut.plugins.legend.labels.generateLabels(chart);
    items.forEach(function (item) { item.text = clip(item.text); });
    return items;
  }

  function draw() {
    var blob = document.getElementById("tm-report-charts");
    if (!blob || typeof Chart === "undefined") return;
    var data = JSON.parse(blob.textContent);
    Chart.defaults.color = cssVar("--body-fg", "#333");
    Chart.defaults.borderColor = cssVar("--hairline-color", "#e8e8e8");
    Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
    Chart.defaults.animation = false;
    Chart.defaults.maintainAspectRatio = false;
    var drawn = 0;
    var canvas = document.getElementById("tm-chart-series");
    if (canvas && data.series) { seriesChart(canvas, data.series); drawn += 1; }
    canvas = document.getElementById("tm-chart-top");
    if (canvas) { topChart(canvas, data.top); drawn += 1; }
    canvas = document.getElementById("tm-chart-mix");
    if (canvas) { mixChart(canvas, data.mix); drawn += 1; }
    document.body.dataset.reportCharts = String(drawn);
  }

  if (!adoptBrowserZone()) draw();
})();
