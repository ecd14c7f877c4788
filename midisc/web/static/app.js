// The feature browser's charts and live parts. Chart.js (vendored, static/vendor) draws every plot;
// the data comes with the page (<script id="charts">) or from /api.
"use strict";

const charts = JSON.parse(document.getElementById("charts")?.textContent || "{}");
const COLOURS = ["#c2410c", "#1d4ed8", "#047857", "#7c3aed", "#b91c1c", "#ca8a04"];
const drawn = {};  // canvas id -> Chart, so tests and live updates can reach them
window.midiscCharts = drawn;

function fmt(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function bars(id, data, label, colour) {
  const canvas = document.getElementById(id);
  if (!canvas || !data) return;
  drawn[id] = new Chart(canvas, {
    type: "bar",
    data: { labels: data.centres.map((c) => fmt(c, 3)), datasets: [{ label, data: data.heights, backgroundColor: colour }] },
    options: { animation: false, plugins: { legend: { display: false } }, scales: { x: { ticks: { maxTicksLimit: 8 } } } },
  });
}

function curves(data) {
  const canvas = document.getElementById("curves");
  if (!canvas || !data || !data.steps.length) return;
  const names = Object.keys(data.series);
  // FVU and loss share the left axis; L0 has its own (it is in features, not a fraction).
  const datasets = names.map((name, i) => ({
    label: name, data: data.series[name], borderColor: COLOURS[i % COLOURS.length], backgroundColor: COLOURS[i % COLOURS.length],
    yAxisID: name.startsWith("L0") ? "l0" : "y", spanGaps: true, pointRadius: 3,
  }));
  drawn.curves = new Chart(canvas, {
    type: "line", data: { labels: data.steps, datasets },
    options: { animation: false, interaction: { mode: "index", intersect: false },
      scales: { x: { title: { display: true, text: "step" } }, y: { type: "logarithmic", position: "left" },
                l0: { position: "right", grid: { drawOnChartArea: false }, title: { display: true, text: "L0" } } } },
  });
}

function histogram(data) {
  if (!data || !data.counts || !data.counts.length) return;
  const centres = data.counts.map((_, i) => (data.edges[i] + data.edges[i + 1]) / 2);
  bars("histogram", { centres, heights: data.counts }, "features", "#1d4ed8");
}

function frontier(points) {
  const canvas = document.getElementById("frontier");
  if (!canvas || !points || !points.length) return;
  drawn.frontier = new Chart(canvas, {
    type: "scatter",
    data: { datasets: [{ label: "jobs", data: points.map((p) => ({ x: p.l0, y: p.fvu, run: p.id, overrides: p.overrides, pareto: p.pareto })),
      pointRadius: 6, pointHoverRadius: 9, backgroundColor: points.map((p) => (p.pareto ? "#c2410c" : "#9ca3af")),
      borderColor: points.map((p) => (p.pareto ? "#7c2d12" : "#6b7280")), borderWidth: points.map((p) => (p.pareto ? 3 : 1)) }] },
    options: { animation: false,
      onClick: (_event, elements) => { if (elements.length) window.location = "/runs/" + points[elements[0].index].id; },
      plugins: { legend: { display: false }, tooltip: { callbacks: {
        label: (item) => `run ${item.raw.run}: ${item.raw.overrides} (L0 ${fmt(item.raw.x, 1)}, FVU ${fmt(item.raw.y, 3)})` } } },
      scales: { x: { title: { display: true, text: "L0 (features firing per token)" } }, y: { title: { display: true, text: "FVU (held-out)" } } } },
  });
}

// Live progress: rows and facts marked data-run with status "running" poll /api/live and update their cells.
function setLive(element, row) {
  const digits = { step: 0, loss: 4, fvu: 3, l0: 1 };
  for (const cell of element.querySelectorAll("[data-live]")) {
    const key = cell.dataset.live;
    if (!(key in row) || (row[key] === null && key !== "status")) continue;
    cell.textContent = key === "status" ? row.status : key === "dead_frac" ? (100 * row[key]).toFixed(2) + "%" : fmt(row[key], digits[key]);
    if (key === "status") cell.className = "status " + row.status;
  }
  element.dataset.status = row.status;
}

async function pollLive() {
  const running = [...document.querySelectorAll("[data-run][data-status=running]")];
  if (!running.length) return;
  const ids = [...new Set(running.map((e) => e.dataset.run))].join(",");
  try {
    const rows = await (await fetch("/api/live?ids=" + ids)).json();
    for (const row of rows) {
      for (const element of document.querySelectorAll(`[data-run="${row.id}"]`)) setLive(element, row);
      if (drawn.curves && row.id === Number(document.getElementById("live")?.dataset.run)) {
        const run = await (await fetch("/api/runs/" + row.id)).json();
        drawn.curves.data.labels = run.curves.steps;
        drawn.curves.data.datasets.forEach((d) => { d.data = run.curves.series[d.label] || d.data; });
        drawn.curves.update();
      }
    }
  } catch (error) { console.warn("live update failed", error); }
  setTimeout(pollLive, 3000);
}

// Try a text: post it, show its tokens, list the strongest features; a chosen feature colours the tokens.
function tryText() {
  const form = document.getElementById("try");
  if (!form) return;
  const status = document.getElementById("try-status");
  status.textContent = "loading the model…";
  const loading = performance.now();
  const ready = fetch(`/api/runs/${form.dataset.run}/warm`, { method: "POST" }).then(async (response) => {
    const answer = await response.json();
    status.className = response.ok ? "muted" : "error";
    status.textContent = response.ok ? `model ready (loaded in ${((performance.now() - loading) / 1000).toFixed(1)} s)` : answer.error;
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    await ready;
    status.textContent = "running…";
    const started = performance.now();
    const response = await fetch(`/api/runs/${form.dataset.run}/try`, { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text: form.elements.text.value }) });
    const answer = await response.json();
    if (!response.ok) { status.textContent = answer.error; status.className = "error"; return; }
    status.className = "muted";
    status.textContent = `${answer.tokens.length} tokens in ${Math.round(performance.now() - started)} ms`;
    showTry(form.dataset.run, answer);
  });
  if (form.elements.text.value.trim()) form.requestSubmit();
}

function showTry(run, answer) {
  document.getElementById("try-result").hidden = false;
  const line = document.getElementById("try-tokens");
  line.replaceChildren(...answer.tokens.map((t, i) => {
    const span = document.createElement("span");
    span.className = "tok"; span.textContent = t.text.replace(/\n/g, "⏎"); span.style.setProperty("--shade", 0);
    span.title = t.features.map(([f, v]) => `feature ${f}: ${v.toFixed(3)}`).join("\n") || "no feature fires";
    span.dataset.index = i;
    return span;
  }));
  const body = document.querySelector("#try-features tbody");
  body.replaceChildren(...answer.top.map(([feature, value, at]) => {
    const row = document.createElement("tr");
    row.dataset.feature = feature;
    row.innerHTML = `<td><a href="/runs/${run}/features/${feature}">feature ${feature}</a></td><td class="n">${value.toFixed(3)}</td>` +
      `<td><code></code></td><td><button type="button">colour the text</button></td>`;
    row.querySelector("code").textContent = answer.tokens[at].text;
    row.querySelector("button").addEventListener("click", () => colourBy(answer, feature));
    return row;
  }));
  if (answer.top.length) colourBy(answer, answer.top[0][0]);
}

function colourBy(answer, feature) {
  const values = answer.values[String(feature)];
  const peak = Math.max(...values) || 1;
  document.querySelectorAll("#try-tokens .tok").forEach((span, i) => {
    span.style.setProperty("--shade", Math.max(0, values[i]) / peak);
    span.classList.toggle("max", values[i] === peak && peak > 0);
  });
  document.querySelectorAll("#try-features tr").forEach((row) => row.classList.toggle("chosen", row.dataset.feature === String(feature)));
}

document.addEventListener("DOMContentLoaded", () => {
  curves(charts.curves);
  histogram(charts.histogram);
  bars("density", charts.density, "tokens", "#c2410c");
  bars("logits", charts.logits, "tokens", "#6b7280");
  frontier(charts.frontier);
  pollLive();
  tryText();
});
