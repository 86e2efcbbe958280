// The swarmrl dashboard: polls /api/status and /api/metrics (trainer/dashboard.py), draws the
// worker table and the uPlot charts. Everything from the run, worker names above all, is set
// as text (textContent), never as markup.
"use strict";

const POLL_MS = 2000;
const HEIGHT = 220;
const COLORS = ["#3867d6", "#e67e22", "#2e8b57", "#8e44ad"];
const STEP_TICKS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000];  // whole steps
// Each chart reads one kind of metrics.jsonl record ("train": a step, "eval": held-out
// accuracy) and plots some of its fields against the step.
const CHARTS = [
  { id: "reward", title: "mean reward of scored samples", kind: "train",
    fields: [["reward_mean", "reward"]] },
  { id: "accuracy", title: "held-out greedy accuracy", kind: "eval",
    fields: [["accuracy", "accuracy"]] },
  { id: "loss", title: "loss", kind: "train", fields: [["loss", "loss"]] },
  { id: "step-time", title: "step time (s)", kind: "train",
    fields: [["wait_seconds", "waiting for samples"], ["optimize_seconds", "training"],
             ["publish_seconds", "publishing weights"]] },
  { id: "update-bytes", title: "weight update sent to workers (bytes)", kind: "train",
    fields: [["update_bytes", "bytes"]] },
  { id: "throughput", title: "accepted samples per second", kind: "train",
    fields: [["accepted_samples_per_s", "samples/s"]] },
];

const token = new URLSearchParams(location.search).get("token");
const records = [];
const plots = {};
let offset = 0;

async function api(path) {
  const url = token ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`
    : path;
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path.split("?")[0]}: HTTP ${response.status}`);
  return response.json();
}

function age(seconds) {
  if (seconds < 120) return `${Math.max(0, Math.round(seconds))}s ago`;
  if (seconds < 7200) return `${Math.round(seconds / 60)}m ago`;
  return `${Math.round(seconds / 3600)}h ago`;
}

function addCell(row, text, className) {
  const cell = document.createElement("td");
  cell.textContent = text;
  if (className) cell.className = className;
  row.appendChild(cell);
}

function drawHeader(status) {
  document.getElementById("run").textContent = status.run;
  document.title = `${status.run} · swarmrl`;
  const state = document.getElementById("state");
  state.textContent = status.state;
  state.className = `state ${status.state}`;
  const steps = records.filter((record) => record.kind === "train");
  const step = steps.length ? steps[steps.length - 1].step : 0;
  let text = `step ${step}` + (status.max_steps ? ` of ${status.max_steps}` : "");
  if (status.max_minutes) text += ` · at most ${status.max_minutes} min`;
  document.getElementById("progress").textContent = text;
}

function drawWorkers(status) {
  const rows = status.workers.map((worker) => {
    const row = document.createElement("tr");
    row.dataset.worker = worker.name;
    row.className = worker.quarantined ? "quarantined" : worker.status.includes("left") ? "left" : "";
    const reasons = Object.entries(worker.reasons).sort((a, b) => b[1] - a[1])
      .map(([reason, count]) => `${reason} ${count}`).join(", ");
    addCell(row, worker.name);
    addCell(row, worker.status);
    addCell(row, String(worker.accepted), "number");
    addCell(row, String(worker.rejected), "number");
    addCell(row, reasons || "-", "reasons");
    addCell(row, `${(100 * worker.share).toFixed(1)}%`, "number");
    addCell(row, worker.samples_per_s.toFixed(2), "number");
    addCell(row, age(status.now - worker.last_seen));
    return row;
  });
  document.querySelector("#workers tbody").replaceChildren(...rows);
  const more = document.getElementById("more-workers");
  more.hidden = !status.more_workers;
  more.textContent = `and ${status.more_workers} more workers with fewer samples`;
}

function chartData(chart) {
  const byStep = new Map();  // a resumed run repeats steps: the latest record of each counts
  for (const record of records) if (record.kind === chart.kind) byStep.set(record.step, record);
  const rows = [...byStep.values()].sort((a, b) => a.step - b.step);
  return [rows.map((row) => row.step),
          ...chart.fields.map(([key]) => rows.map((row) => row[key] ?? null))];
}

function chartOptions(chart, width) {
  return {
    title: chart.title,
    width: Math.max(width - 10, 300),
    height: HEIGHT,
    scales: { x: { time: false } },
    axes: [{ label: "step", incrs: STEP_TICKS }, { size: 70 }],
    series: [{ label: "step" }, ...chart.fields.map(([, label], i) => ({
      label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
      points: { show: true, size: 5 },
    }))],
  };
}

function drawCharts() {
  const box = document.getElementById("charts");
  for (const chart of CHARTS) {
    let element = document.getElementById(chart.id);
    if (!element) {
      element = document.createElement("div");
      element.id = chart.id;
      element.className = "chart";
      const empty = document.createElement("div");
      empty.className = "empty";
      empty.textContent = `${chart.title}: no data yet`;
      element.appendChild(empty);
      box.appendChild(element);
    }
    const data = chartData(chart);
    element.dataset.points = String(data[0].length);
    if (!data[0].length) continue;
    if (plots[chart.id]) {
      plots[chart.id].setData(data);
    } else {
      element.replaceChildren();
      plots[chart.id] = new uPlot(chartOptions(chart, element.clientWidth), data, element);
    }
  }
}

async function poll() {
  const problem = document.getElementById("problem");
  try {
    const [metrics, status] = await Promise.all([
      api(`/api/metrics?from=${offset}`), api("/api/status"),
    ]);
    records.push(...metrics.records);
    offset = metrics.next;
    drawHeader(status);
    drawWorkers(status);
    drawCharts();
    problem.hidden = true;
  } catch (error) {
    problem.textContent = `cannot reach the dashboard (${error.message}); if the run has ended, ` +
      "`swarmrl dashboard runs/NAME` serves its folder";
    problem.hidden = false;
  }
  setTimeout(poll, POLL_MS);
}

window.addEventListener("resize", () => {
  for (const [id, plot] of Object.entries(plots)) {
    plot.setSize({ width: Math.max(document.getElementById(id).clientWidth - 10, 300),
                   height: HEIGHT });
  }
});
poll();
