// tunelab board front end: plain JavaScript, no libraries. Every text from a run is set with textContent
// (never innerHTML), so a run's data cannot inject markup. Charts are drawn as SVG here.
"use strict";

const S = {runs: [], sort: {key: "started", dir: -1}, current: null, overlay: new Set(),
           series: {}, since: {}, view: "runs", timer: null};
const CURVES = [["loss", "train loss"], ["eval_loss", "eval loss"], ["lr", "learning rate"],
                ["grad_norm", "grad norm"], ["tok_per_s", "tokens/s"]];
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids.flat(Infinity)) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}
function svg(tag, attrs, ...kids) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k);
  return e;
}
const fmt = (v, d = 4) => v === null || v === undefined ? "-" : (typeof v === "number" ? (Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(2) : +v.toPrecision(d)) : v);
const q = (params) => new URLSearchParams(params).toString();

// The secret token arrives once in the URL `tunelab board` prints (?token=...); it is kept in this browser's
// storage, taken out of the address bar, and sent with every POST as X-Board-Token.
const TOKEN = (() => {
  const u = new URL(location.href), t = u.searchParams.get("token");
  if (t) {
    localStorage.setItem("tunelab-board-token", t);
    u.searchParams.delete("token");
    history.replaceState(null, "", u.pathname + u.search + u.hash);
  }
  return t || localStorage.getItem("tunelab-board-token") || "";
})();
const postRaw = (path, body) => fetch(path, {method: "POST", body: JSON.stringify(body),
  headers: {"Content-Type": "application/json", "X-Board-Token": TOKEN}});
async function apiPost(path, body) {
  const r = await postRaw(path, body);
  const answer = await r.json().catch(() => ({error: `HTTP ${r.status}: not JSON`}));
  if (!r.ok) throw new Error(answer.error || `HTTP ${r.status}`);
  return answer;
}

async function api(path) {
  const r = await fetch(path);
  const body = await r.json().catch(() => ({error: `HTTP ${r.status}: not JSON`}));
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}
// replaceChildren with nested arrays flattened and empty parts ("" / null) dropped
const put = (box, ...kids) => box.replaceChildren(...kids.flat(Infinity).filter(k => k !== null && k !== undefined && k !== ""));
function showError(box, err) { put(box, el("p", {class: "problem"}, String(err.message || err))); }

// ---- views ----
function show(view) {
  S.view = view;
  for (const s of document.querySelectorAll("main > section")) s.hidden = s.id !== "view-" + view;
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.view === view);
  ({runs: loadRuns, run: loadRun, curves: loadCurves, data: loadData, evals: loadEvals, chat: () => {},
    launch: loadLaunch})[view]();
}
function pick(name) {
  S.current = name;
  document.getElementById("current").textContent = "run: " + name;
  S.overlay.add(name);
}

// ---- runs table ----
const COLS = [["", ""], ["name", "run"], ["method", "method"], ["model", "model"], ["data", "data"],
              ["step", "steps"], ["final_loss", "final loss"], ["eval_loss", "eval loss"],
              ["started", "started"], ["status", "status"]];
async function loadRuns() {
  try { const r = await api("/api/runs"); S.runs = r.runs; document.getElementById("root").textContent = r.root; }
  catch (e) { return showError(document.querySelector("#runs-table tbody"), e); }
  drawRuns();
}
function drawRuns() {
  const head = el("tr", {}, COLS.map(([k, label]) => el("th", {"data-key": k, onclick: () => {
    if (!k) return; S.sort = {key: k, dir: S.sort.key === k ? -S.sort.dir : 1}; drawRuns(); }},
    label + (S.sort.key === k && k ? (S.sort.dir > 0 ? " ▲" : " ▼") : ""))));
  document.querySelector("#runs-table thead").replaceChildren(head);
  const f = document.getElementById("filter").value.toLowerCase();
  const rows = S.runs.filter(r => !f || [r.name, r.method, r.model, r.data, r.status].join(" ").toLowerCase().includes(f));
  const {key, dir} = S.sort;
  rows.sort((a, b) => (a[key] ?? -Infinity) > (b[key] ?? -Infinity) ? dir : (a[key] ?? -Infinity) < (b[key] ?? -Infinity) ? -dir : 0);
  put(document.querySelector("#runs-table tbody"), ...rows.map(r => el("tr", {"data-run": r.name},
    el("td", {}, el("input", {type: "checkbox", title: "overlay in Curves", ...(S.overlay.has(r.name) ? {checked: ""} : {}),
      onchange: (e) => e.target.checked ? S.overlay.add(r.name) : S.overlay.delete(r.name)})),
    el("td", {}, el("a", {href: "#run", onclick: () => pick(r.name)}, r.name),
       r.problems.map(p => el("div", {class: "problem"}, p))),
    el("td", {}, r.method ?? "-"), el("td", {}, r.model ?? "-"), el("td", {}, r.data || "-"),
    el("td", {class: "num"}, `${r.step}${r.total_steps ? " / " + r.total_steps : ""}`),
    el("td", {class: "num"}, fmt(r.final_loss)), el("td", {class: "num"}, fmt(r.eval_loss)),
    el("td", {}, r.started ? new Date(r.started * 1000).toISOString().slice(0, 16).replace("T", " ") : "-"),
    el("td", {class: "status-" + r.status, title: r.status_why}, r.status))));
  document.getElementById("runs-empty").hidden = S.runs.length > 0;
}

// ---- one run ----
async function loadRun() {
  const box = document.getElementById("run-body");
  if (!S.current) return;
  let d;
  try { d = await api("/api/run?" + q({name: S.current})); } catch (e) { return showError(box, e); }
  const kib = (b) => (b / 1024).toFixed(1) + " KiB";
  put(box, 
    el("h2", {}, d.name, " ", el("span", {class: "status-" + d.status}, d.status)),
    el("p", {class: "muted"}, d.status_why),
    d.status === "running" ? el("button", {id: "run-stop", onclick: () => act("stop", d.name)}, "stop (SIGTERM)") : "",
    d.status === "resumable" ? el("button", {id: "run-resume", onclick: () => act("resume", d.name)}, "resume") : "",
    el("span", {id: "run-action", class: "muted"}),
    d.problems.map(p => el("p", {class: "problem"}, p)),
    el("h3", {}, "checkpoints"),
    d.checkpoints.length ? el("table", {class: "grid"}, el("tr", {}, el("th", {}, "folder"), el("th", {}, "step"), el("th", {}, "loss"), el("th", {}, "size")),
      d.checkpoints.map(c => el("tr", {}, el("td", {}, c.name), el("td", {class: "num"}, c.step ?? "-"),
        el("td", {class: "num"}, fmt(c.loss)), el("td", {class: "num"}, kib(c.bytes))))) : el("p", {class: "muted"}, "none"),
    el("h3", {}, "outputs"),
    d.outputs.length ? el("ul", {}, d.outputs.map(o => el("li", {}, el("b", {}, o.name + "/"), ` ${kib(o.bytes)}: ${o.files.join(", ")}`)))
      : el("p", {class: "muted"}, "no adapter/ or model/ yet"),
    d.files.includes("loss.png") ? el("img", {src: "/api/file?" + q({name: d.name, path: "loss.png"}), alt: "loss plot", width: 480}) : "",
    el("h3", {}, "config.yaml"),
    el("pre", {id: "config-text"}, d.config_text ?? d.config_error),
    el("h3", {}, "files"), el("p", {}, d.files.join("  ")));
}

// ---- curves: every metric of every overlaid run, polled while the view is open ----
async function poll() {
  if (S.polling) return;  // one poll at a time: two with the same `since` would add the rows twice
  S.polling = true;
  try { await pollOnce(); } finally { S.polling = false; }
}
async function pollOnce() {
  const names = [...S.overlay];
  for (const n of names) {
    try {
      const r = await api("/api/metrics?" + q({name: n, since: S.since[n] || 0}));
      S.series[n] = (S.series[n] || []).concat(r.rows);
      S.since[n] = r.next;
      if (r.bad_lines.length) S.series[n].bad = (S.series[n].bad || 0) + r.bad_lines.length;
    } catch (e) { S.series[n] = S.series[n] || []; S.series[n].error = e.message; }
  }
  if (S.view === "curves") drawCurves();
}
function loadCurves() {
  if (S.current) S.overlay.add(S.current);
  clearInterval(S.timer);
  poll();
  S.timer = setInterval(() => S.view === "curves" ? poll() : clearInterval(S.timer), 2000);
}
function drawCurves() {
  const names = [...S.overlay];
  put(document.getElementById("curves-runs"), names.length ? "" : "Tick runs in the Runs table (or pick one) to see their curves. ",
    ...names.map((n, i) => el("span", {style: `color:${COLORS[i % COLORS.length]}`}, "■ " + n + " ",
      S.series[n]?.bad ? el("span", {class: "problem"}, `(${S.series[n].bad} unreadable line(s) skipped) `) : "",
      S.series[n]?.error ? el("span", {class: "problem"}, `(${S.series[n].error}) `) : "")));
  document.getElementById("curves-live").textContent = "updates every 2 s";
  put(document.getElementById("charts"), ...CURVES.map(([key, label]) =>
    chart(label, names.map((n, i) => ({color: COLORS[i % COLORS.length], name: n,
      pts: (S.series[n] || []).filter(r => typeof r[key] === "number").map(r => [r.step, r[key]])})), key)));
}
function chart(title, lines, key) {
  const W = 420, H = 240, L = 56, R = 10, T = 22, B = 30;
  const all = lines.flatMap(l => l.pts);
  const g = svg("svg", {width: W, height: H, class: "chart", "data-metric": key});
  g.append(svg("text", {x: L, y: 14}, title));
  if (!all.length) { g.append(svg("text", {x: L, y: H / 2, class: "muted"}, "no points yet")); return g; }
  let [x0, x1] = [Math.min(...all.map(p => p[0])), Math.max(...all.map(p => p[0]))];
  let [y0, y1] = [Math.min(...all.map(p => p[1])), Math.max(...all.map(p => p[1]))];
  if (x1 === x0) x1 = x0 + 1; if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 || 1; y1 += Math.abs(y1) * 0.05 || 1; }
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R), Y = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (let i = 0; i <= 4; i++) {  // grid and tick labels
    const yv = y0 + (y1 - y0) * i / 4, xv = x0 + (x1 - x0) * i / 4;
    g.append(svg("line", {x1: L, x2: W - R, y1: Y(yv), y2: Y(yv), stroke: "#eee"}),
             svg("text", {x: L - 4, y: Y(yv) + 4, "text-anchor": "end"}, String(fmt(yv, 3))),
             svg("text", {x: X(xv), y: H - B + 14, "text-anchor": "middle"}, String(Math.round(xv))));
  }
  g.append(svg("text", {x: W - R, y: H - 4, "text-anchor": "end"}, "step"));
  for (const l of lines) {
    if (!l.pts.length) continue;
    g.append(svg("polyline", {points: l.pts.map(p => `${X(p[0])},${Y(p[1])}`).join(" "), fill: "none",
                              stroke: l.color, "stroke-width": 1.5, "data-run": l.name, "data-points": l.pts.length}));
    if (l.pts.length < 30) for (const p of l.pts) g.append(svg("circle", {cx: X(p[0]), cy: Y(p[1]), r: 2, fill: l.color}));
  }
  return g;
}

// ---- data: token-by-token rows with the SFT mask ----
async function loadData() {
  const box = document.getElementById("data-body");
  if (!S.current) return;
  put(box, el("p", {class: "muted"}, "loading the tokenizer and rows..."));
  let d;
  try {
    d = await api("/api/data?" + q({name: S.current, split: document.getElementById("data-split").value,
      start: document.getElementById("data-start").value, n: document.getElementById("data-n").value}));
  } catch (e) { return showError(box, e); }
  const rep = d.report;
  put(box, 
    el("p", {}, `${d.split}: ${d.rows} rows, packing ${d.packing}, seq_len ${d.seq_len}; prepared in ${d.prepared}`),
    d.examples.map(x => el("div", {class: "example", "data-row": x.index},
      el("div", {class: "muted"}, `row ${x.index}: ${x.length} tokens, ${x.trained} trained `, x.cut ? el("span", {class: "cut"}, "cut at seq_len") : ""),
      x.tokens.map(([t, trained, start]) => [start ? el("span", {class: "docstart", title: "a new document starts"}, "|") : "",
        el("span", {class: "tok" + (trained ? " trained" : "")}, t.replace(/\n/g, "↵\n"))]))),
    el("h3", {}, "data report"),
    rep ? mixture(rep) : el("p", {class: "muted"}, "no numeric report in this manifest (built by an older tunelab)"),
    d.report_text ? el("pre", {}, d.report_text) : "");
}
function mixture(rep) {
  return [
    el("table", {class: "grid", id: "mixture"}, el("tr", {}, ["source", "kind", "docs", "tokens", "share planned", "share realised", ""].map(h => el("th", {}, h))),
      rep.sources.map(s => el("tr", {}, el("td", {}, s.name), el("td", {}, s.kind), el("td", {class: "num"}, s.docs),
        el("td", {class: "num"}, s.tokens), el("td", {class: "num"}, s.share_planned.toFixed(3)),
        el("td", {class: "num"}, s.share_realised.toFixed(3)),
        el("td", {}, svg("svg", {width: 160, height: 14}, svg("rect", {width: 160 * s.share_planned, height: 6, fill: "#bbb"}),
          svg("rect", {y: 7, width: 160 * s.share_realised, height: 6, fill: "#69c"})))))),
    el("p", {}, `filters: ${rep.filters.seen} seen, ${rep.filters.removed} removed` +
      Object.entries(rep.filters.by_filter).map(([k, v]) => `; ${k} ${v.removed}`).join("") +
      `; bad rows skipped ${rep.skipped_rows}; truncated ${rep.truncated}; ${rep.train_rows} train rows, ${rep.eval_rows} eval rows`)];
}

// ---- evaluations ----
async function loadEvals() {
  const box = document.getElementById("evals-body");
  if (!S.current) return;
  let d;
  try { d = await api("/api/evals?" + q({name: S.current})); } catch (e) { return showError(box, e); }
  if (!d.evals.length) return put(box, el("p", {class: "muted"},
    "No evaluation yet: `tunelab eval RUN` writes RUN/eval/results.json; `tunelab quickstart` writes quickstart.json."));
  put(box, ...d.evals.map(ev => el("div", {class: "eval"}, el("h2", {}, ev.name),
    ev.error ? el("p", {class: "problem"}, ev.error) : "",
    ev.tables.map(t => [el("h3", {}, t.title), evalTable(t), rateBars(t)]))));
}
const cell = c => c ? `${fmt(c.value)}${c.interval ? ` [${fmt(c.interval[0], 3)}, ${fmt(c.interval[1], 3)}]` : ""}` : "-";
function evalTable(t) {
  return el("table", {class: "grid"}, el("tr", {}, el("th", {}, "metric"), t.labels.map(l => el("th", {}, l + " [95% CI]")),
    t.labels.length === 2 ? el("th", {}, "change") : ""),
    t.rows.map(r => el("tr", {}, el("td", {}, r.metric), r.cells.map(c => el("td", {class: "num"}, cell(c))),
      t.labels.length === 2 ? el("td", {class: "num"}, r.cells[0] && r.cells[1] ? (r.cells[1].value - r.cells[0].value >= 0 ? "+" : "") + fmt(r.cells[1].value - r.cells[0].value, 3) : "") : "")));
}
function rateBars(t) {  // rates in [0, 1] with their intervals as whiskers, one group per metric
  const rows = t.rows.filter(r => r.rate);
  if (!rows.length) return "";
  const bw = 18, gw = bw * t.labels.length + 14, W = 60 + gw * rows.length, H = 190, B = 20, T = 10;
  const Y = v => T + (1 - v) * (H - T - B);
  const g = svg("svg", {width: W, height: H + 90, class: "chart"});
  for (const v of [0, 0.5, 1]) g.append(svg("line", {x1: 40, x2: W, y1: Y(v), y2: Y(v), stroke: "#eee"}), svg("text", {x: 36, y: Y(v) + 4, "text-anchor": "end"}, String(v)));
  rows.forEach((r, i) => {
    r.cells.forEach((c, j) => {
      if (!c) return;
      const x = 50 + i * gw + j * bw;
      g.append(svg("rect", {x, y: Y(c.value), width: bw - 3, height: Y(0) - Y(c.value), class: "bar b" + j}));
      if (c.interval) g.append(svg("line", {x1: x + bw / 2 - 1.5, x2: x + bw / 2 - 1.5, y1: Y(c.interval[0]), y2: Y(c.interval[1]), class: "whisker"}));
    });
    g.append(svg("text", {x: 50 + i * gw, y: H - B + 14, transform: `rotate(25 ${50 + i * gw} ${H - B + 14})`}, r.metric.slice(0, 34)));
  });
  t.labels.forEach((l, j) => g.append(svg("rect", {x: 50 + j * 80, y: H + 75, width: 10, height: 10, class: "bar b" + j}),
                                      svg("text", {x: 64 + j * 80, y: H + 84}, l)));
  return el("div", {}, g);
}

// ---- chat: one POST, server-sent events for the base answer then the tuned one ----
async function send() {
  const status = document.getElementById("chat-status");
  if (!S.current) { status.textContent = "pick a run first"; return; }
  const messages = [];
  const sys = document.getElementById("chat-system").value.trim();
  if (sys) messages.push({role: "system", content: sys});
  messages.push({role: "user", content: document.getElementById("chat-prompt").value});
  const out = {base: document.getElementById("chat-base"), tuned: document.getElementById("chat-tuned")};
  out.base.textContent = out.tuned.textContent = "";
  status.textContent = "loading the models (first time: a while) and generating...";
  const body = {name: S.current, messages, max_new_tokens: +document.getElementById("chat-max").value,
                temperature: +document.getElementById("chat-temp").value};
  const r = await postRaw("/api/chat", body);
  if (!r.ok) { status.textContent = (await r.json().catch(() => ({}))).error || `HTTP ${r.status}`; return; }
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, i); buf = buf.slice(i + 2);
      if (!line.startsWith("data: ")) continue;
      const ev = JSON.parse(line.slice(6));
      if (ev.error && !ev.side) { status.textContent = ev.error; return; }
      if (ev.text) out[ev.side].textContent += ev.text;
      if (ev.done) { out[ev.side].dataset.done = "1"; if (ev.error) out[ev.side].textContent += "\n[" + ev.error + "]"; }
    }
  }
  status.textContent = "done";
  const t = await postRaw("/api/template", {name: S.current, messages});
  if (t.ok) { const j = await t.json(); document.getElementById("chat-prompt-text").textContent = j.prompt;
              document.getElementById("chat-template").textContent = j.template; }
}

// ---- launch: a config file + key=value overrides (keys from the RunConfig schema), its cost, then a run ----
async function loadLaunch() {
  const status = document.getElementById("launch-status");
  if (!S.launch) {
    try { S.launch = await api("/api/configs"); } catch (e) { status.textContent = e.message; return; }
    const sel = document.getElementById("launch-config");
    put(sel, S.launch.configs.map(c => el("option", {value: c.path}, `${c.path} (${c.where})`)));
    put(document.getElementById("launch-key"), S.launch.fields.map(f => el("option", {value: f.key}, f.key)));
    sel.addEventListener("change", configChosen);
    document.getElementById("launch-key").addEventListener("change", keyChosen);
    configChosen(); keyChosen();
  }
  pollJobs();
  clearInterval(S.jobsTimer);
  S.jobsTimer = setInterval(() => S.view === "launch" ? pollJobs() : clearInterval(S.jobsTimer), 2000);
}
function configChosen() {
  const c = S.launch.configs.find(c => c.path === document.getElementById("launch-config").value);
  document.getElementById("launch-config-text").textContent = c ? c.text : "no config files: put YAML files in configs/";
  edited();
}
function keyChosen() {
  const f = S.launch.fields.find(f => f.key === document.getElementById("launch-key").value);
  if (f) document.getElementById("launch-key-doc").textContent =
    `${f.choices ? f.choices.join(" | ") : f.type}, default ${JSON.stringify(f.default)}${f.doc ? ": " + f.doc : ""}`;
}
function edited() { document.getElementById("launch-go").disabled = true; put(document.getElementById("launch-cost")); }
const launchBody = () => ({config: document.getElementById("launch-config").value,
  overrides: document.getElementById("launch-overrides").value.split("\n").map(s => s.trim()).filter(Boolean),
  name: document.getElementById("launch-name").value.trim()});
async function checkLaunch() {  // validates the config with its overrides and shows `tunelab cost`'s estimate
  const status = document.getElementById("launch-status"), box = document.getElementById("launch-cost");
  status.textContent = "checking the config, estimating the cost...";
  let c;
  try { c = await apiPost("/api/cost", launchBody()); } catch (e) { status.textContent = ""; return showError(box, e); }
  const mib = b => (b / 2 ** 20).toFixed(1);
  put(box, c.rows ? [el("table", {class: "grid", id: "cost-table"},
      el("tr", {}, ["method", "trainable", "weights", "grads", "AdamW", "activations", "loss bufs", "peak MiB", "GFLOP/token"].map(h => el("th", {}, h))),
      c.rows.map(r => el("tr", {}, el("td", {}, r.method), el("td", {class: "num"}, r.trainable.toLocaleString()),
        [r.weights, r.grads, r.optimizer, r.activations, r.loss_buffers, r.peak].map(v => el("td", {class: "num"}, mib(v))),
        el("td", {class: "num"}, (r.flops_per_token / 1e9).toFixed(3))))),
      el("p", {class: "muted"}, `analytic, ${c.note}: ${c.command.join(" ")}`)]
    : el("p", {class: "muted"}, "no cost estimate: " + c.error),
    el("details", {}, el("summary", {}, "the config the run will get"), el("pre", {}, c.config)));
  status.textContent = "valid";
  document.getElementById("launch-go").disabled = false;
}
async function launch() {
  const status = document.getElementById("launch-status");
  try { const j = await apiPost("/api/launch", launchBody()); status.textContent = `started ${j.name} (pid ${j.pid})`; }
  catch (e) { status.textContent = e.message; }
  S.launch = null;  // the new run's config.yaml joins the list
  pollJobs();
}
async function act(what, name) {  // stop or resume, from the Run view or the jobs table
  const box = document.getElementById(S.view === "run" ? "run-action" : "launch-status");
  box.textContent = what === "stop" ? "stopping..." : "resuming...";
  try { const j = await apiPost("/api/" + what, {name}); box.textContent = `${j.name}: ${j.state}`; }
  catch (e) { box.textContent = e.message; }
  if (S.view === "launch") pollJobs();
}
async function pollJobs() {
  let d;
  try { d = await api("/api/jobs"); } catch (e) { return; }
  document.getElementById("jobs-empty").hidden = d.jobs.length > 0;
  put(document.getElementById("jobs-table"), d.jobs.length ? el("tr", {}, ["run", "pid", "state", "started", "", "output (train.log)"].map(h => el("th", {}, h))) : "",
    d.jobs.map(j => el("tr", {"data-job": j.name}, el("td", {}, j.name), el("td", {class: "num"}, j.pid),
      el("td", {class: "status-" + j.state}, j.state + (j.returncode !== null ? ` (exit ${j.returncode})` : "")),
      el("td", {}, new Date(j.started * 1000).toISOString().slice(11, 19)),
      el("td", {}, j.state === "running" ? el("button", {onclick: () => act("stop", j.name)}, "stop") :
        el("button", {onclick: () => act("resume", j.name)}, "resume")),
      el("td", {}, el("details", {}, el("summary", {}, j.command.slice(3, 5).join(" ") + " ..."),
        el("pre", {}, j.command.join(" ") + "\n\n" + j.log))))));
}

window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("filter").addEventListener("input", drawRuns);
  document.getElementById("data-load").addEventListener("click", loadData);
  document.getElementById("chat-send").addEventListener("click", send);
  document.getElementById("launch-check").addEventListener("click", checkLaunch);
  document.getElementById("launch-go").addEventListener("click", launch);
  document.getElementById("launch-add").addEventListener("click", () => {
    const f = S.launch.fields.find(f => f.key === document.getElementById("launch-key").value), box = document.getElementById("launch-overrides");
    box.value = (box.value.trim() ? box.value.trim() + "\n" : "") + `${f.key}=${f.default === null ? "" : typeof f.default === "object" ? JSON.stringify(f.default) : f.default}`;
    edited();
  });
  document.getElementById("launch-overrides").addEventListener("input", edited);
  for (const a of document.querySelectorAll("#tabs a")) a.addEventListener("click", (e) => { e.preventDefault(); show(a.dataset.view); });
  document.body.addEventListener("click", (e) => { const a = e.target.closest("a[href='#run']"); if (a) { e.preventDefault(); show("run"); } });
  show("runs");
});
