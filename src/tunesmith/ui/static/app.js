// tunesmith ui: plain JS, no build step. Every text from a file is set as text (never as HTML).
"use strict";

const view = document.getElementById("view");
let cleanup = [];  // what the current page must stop when another opens (streams, timers, key handlers)

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}

async function api(path, body) {
  const init = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const res = await fetch(path, init);
  const data = await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) throw new Error(data.error || (data.detail && JSON.stringify(data.detail)) || res.statusText);
  return data;
}

const fmt = (v, d = 4) => (v === null || v === undefined ? "-" : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(d)) : String(v));
const status = (s) => h("span", { class: `status ${s}` }, s || "?");
const errorBox = (e) => h("div", { class: "error" }, String(e.message || e));
const enc = encodeURIComponent;

function table(headers, rows, sortable) {
  const body = h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c)))));
  const t = h("table", {}, h("thead", {}, h("tr", {}, headers.map((name, i) => h("th", {
    class: sortable ? "sort" : null,
    onclick: sortable ? () => sortBy(t, i) : null,
  }, name)))), body);
  return t;
}

function sortBy(t, i) {
  const body = t.tBodies[0];
  const dir = t.dataset.sort === String(i) ? -1 : 1;
  t.dataset.sort = dir === 1 ? String(i) : "";
  const key = (tr) => { const s = tr.cells[i].dataset.v ?? tr.cells[i].textContent; const n = parseFloat(s); return isNaN(n) ? s : n; };
  [...body.rows].sort((a, b) => (key(a) > key(b) ? dir : key(a) < key(b) ? -dir : 0)).forEach((r) => body.append(r));
}

function chart(el, title, series, data, opts = {}) {
  const width = opts.width || 400;
  return new uPlot({
    title, width, height: 230, scales: { x: { time: false } }, legend: { live: false },
    series: [{ label: "step" }, ...series.map((s) => ({ spanGaps: true, width: 1.5, points: { show: s.points ?? false }, ...s }))],
    ...opts,
  }, data, el);
}

// --- Runs ---------------------------------------------------------------------------------------------------

async function runsPage() {
  const box = h("div");
  view.append(h("h1", {}, "Runs"), box);
  async function load() {
    try {
      const d = await api("/api/runs");
      const rows = d.runs.map((r) => {
        const pct = r.progress === null || r.progress === undefined ? null : Math.round(r.progress * 100);
        const best = r.best ? `${r.best.metric} ${fmt(r.best.value)} @${r.best.step}` : "-";
        const prog = h("td", { "data-v": pct ?? -1 }, pct === null ? "-" : [h("span", { class: "bar" }, h("span", { style: `width:${pct}%` })), ` ${pct}%`]);
        return [h("a", { href: `#/run/${enc(r.name)}` }, r.name), r.model || "-", r.method || "-", r.host ? [status(r.status), ` on ${r.host}`] : status(r.status), prog, r.steps ?? 0, best,
          fmt(r.tokens_per_s, 3), r.compared ? h("a", { href: `#/compare/${enc(r.name)}` }, "comparison") : "-"];
      });
      const t = table(["run", "model", "method", "status", "progress", "steps", "best validation", "tokens/s", "compare"], [], true);
      rows.forEach((r) => t.tBodies[0].append(h("tr", {}, r.map((c) => (c instanceof HTMLTableCellElement ? c : h("td", {}, c))))));
      const queue = d.queue.length
        ? [h("h2", {}, `Queue (${d.queue.length} waiting; ${d.max_trainings} training at a time)`),
           table(["run", "queued", "kind", ""], d.queue.map((q, i) => [h("a", { href: `#/run/${enc(q.name)}` }, q.name), q.queued, q.resume ? "resume" : "new",
             h("button", { onclick: () => api(`/api/runs/${enc(q.name)}/stop`, {}).then(load) }, "remove")]))]
        : [];
      box.replaceChildren(d.runs.length ? t : h("p", { class: "muted" }, "No runs yet. Start one from New run."),
        h("p", { class: "muted" }, `Running now (training or comparing): ${d.active.join(", ") || "none"}`), ...queue);
      box.dataset.loaded = "1";
    } catch (e) { box.replaceChildren(errorBox(e)); }
  }
  await load();
  const timer = setInterval(load, 3000);
  cleanup.push(() => clearInterval(timer));
}

// --- One run ------------------------------------------------------------------------------------------------

async function runPage(name) {
  const head = h("div"), charts = h("div", { class: "row" }), samples = h("div", { id: "samples" }), info = h("div");
  view.append(head, charts, samples, info);
  let d;
  try { d = await api(`/api/runs/${enc(name)}`); } catch (e) { view.append(errorBox(e)); return; }
  const train = { step: [], loss: [], smooth: [], lr: [], gnorm: [] }, val = new Map(), rl = rewards.empty();  // rl.js
  const points = h("span", { id: "points" }, "0");
  const say = h("span", { class: "muted" });
  const stopBtn = h("button", { id: "stop", onclick: () => act("stop") }, "Stop");
  const resumeBtn = h("button", { id: "resume", onclick: () => act("resume") }, "Resume");
  const statusEl = h("span", { id: "run-status" }), meta = h("span", {}, "train points: ");
  function showStatus(s) {
    statusEl.replaceChildren(status(s));
    stopBtn.disabled = !["running", "queued", "starting"].includes(s);
    resumeBtn.disabled = ["running", "completed", "queued", "starting"].includes(s);
  }
  async function act(what) {
    try { const r = await api(`/api/runs/${enc(name)}/${what}`, {}); say.textContent = r.message; if (what === "resume") { if (source) source.close(); source = null; setTimeout(waitForStart, 300); } }
    catch (e) { say.textContent = e.message; }
  }
  head.append(h("h1", {}, name, " ", statusEl), h("div", {}, stopBtn, " ", resumeBtn, " ", say),
    h("p", { class: "muted" }, meta, points,
      d.compared ? [" · ", h("a", { href: `#/compare/${enc(name)}` }, "comparison report")] : ""));
  showStatus(d.status);

  const lossEl = h("div", { id: "loss-chart" }), rewardEl = h("div", { id: "reward-chart" }), lrEl = h("div"), gnEl = h("div");
  charts.append(lossEl, rewardEl, lrEl, gnEl);  // objective grpo: the reward next to the loss
  let lossPlot, rewardPlot, lrPlot, gnPlot, samplesAt = null;
  function add(r) {
    rewards.add(rl, r);
    if (r.type === "val") { val.set(r.step, r.val_loss ?? null); return; }
    if ((r.type || "train") !== "train") return;
    while (train.step.length && train.step[train.step.length - 1] >= r.step) for (const k in train) train[k].pop();  // a resume rewrote the tail
    train.step.push(r.step); train.loss.push(r.loss); train.smooth.push(r.smoothed_loss ?? null); train.lr.push(r.lr ?? null); train.gnorm.push(r.grad_norm ?? null);
  }
  function draw() {
    const steps = [...new Set([...train.step, ...val.keys()])].sort((a, b) => a - b);
    const at = new Map(train.step.map((s, i) => [s, i]));
    const col = (k) => steps.map((s) => (at.has(s) ? train[k][at.get(s)] : null));
    const loss = [steps, col("loss"), col("smooth"), steps.map((s) => val.get(s) ?? null)];
    if (!lossPlot) lossPlot = chart(lossEl, "loss", [{ label: "train", stroke: "#98a2b3" }, { label: "smoothed", stroke: "#2f6feb" }, { label: "val", stroke: "#d92d20", points: true }], loss);
    else lossPlot.setData(loss);
    const lr = [train.step, train.lr], gn = [train.step, train.gnorm];
    const sci = { axes: [{}, { size: 60, values: (u, vals) => vals.map((v) => v.toExponential(1)) }] };
    if (!lrPlot) lrPlot = chart(lrEl, "learning rate", [{ label: "lr", stroke: "#7a5af8" }], lr, sci); else lrPlot.setData(lr);
    if (!gnPlot) gnPlot = chart(gnEl, "grad norm", [{ label: "grad norm", stroke: "#f79009" }], gn); else gnPlot.setData(gn);
    points.textContent = String(train.step.length);
    drawRewards();
  }
  function drawRewards() {
    if (!rewards.seen(rl)) return;
    const data = rewards.chartData(rl), band = { stroke: "#a6d8c0", dash: [4, 4] };
    if (!rewardPlot) rewardPlot = chart(rewardEl, "reward", [{ label: "train (mean)", stroke: "#067647" }, { label: "mean - std", ...band },
      { label: "mean + std", ...band }, { label: "val", stroke: "#d92d20", points: true }], data);
    else rewardPlot.setData(data);
    if (rl.samples && rl.samples.step !== samplesAt) {
      samplesAt = rl.samples.step;
      samples.replaceChildren(h("h2", {}, `Sample completions (validation at step ${samplesAt})`),
        table(["prompt", "completion", "reward"], rewards.sampleRows(rl).map(([p, c, v]) => [p, h("pre", {}, c), fmt(v)])));
    }
  }
  (d.metrics || []).forEach(add);
  draw();

  let source = null;
  function follow(fresh) {
    if (source) source.close();
    if (fresh) { for (const k in train) train[k].length = 0; val.clear(); Object.assign(rl, rewards.empty()); samplesAt = null; }
    source = new EventSource(`/api/runs/${enc(name)}/stream`);
    source.addEventListener("metric", (e) => { add(JSON.parse(e.data)); draw(); showStatus("running"); });
    source.addEventListener("end", async (e) => {
      source.close(); source = null;
      const s = JSON.parse(e.data).status;
      const now = await api(`/api/runs/${enc(name)}`).catch(() => null);
      showStatus(now ? now.status : s);
      if (now && ["queued", "starting"].includes(now.status)) setTimeout(() => follow(true), 1000);
      else if (now) renderInfo(now);
    });
    source.onerror = () => { if (source) { source.close(); source = null; setTimeout(() => follow(true), 1500); } };
  }
  async function waitForStart() {  // queued or starting: no manifest yet to follow
    const now = await api(`/api/runs/${enc(name)}`).catch(() => null);
    if (!now) return;
    showStatus(now.status); renderInfo(now); say.textContent = "";
    if (["queued", "starting"].includes(now.status)) { const t = setTimeout(waitForStart, 1000); cleanup.push(() => clearTimeout(t)); }
    else follow(true);
  }
  cleanup.push(() => source && source.close());
  if (["queued", "starting"].includes(d.status)) waitForStart(); else follow(true);

  function renderInfo(r) {
    const rep = r.report || {};
    if (r.model) meta.textContent = `${r.model} · ${r.method} · ${r.objective} · train points: `;
    const parts = [];
    if (r.events && r.events.length) parts.push(h("h2", {}, "Events"), table(["step", "event"], r.events.map((e) => [e.step, e.event || (e.spike ? `loss spike ${fmt(e.loss)}` : e.overfitting ? "overfitting warning: val loss rising" : "")])));
    if (r.checkpoints && r.checkpoints.length) parts.push(h("h2", {}, "Checkpoints"), h("p", {}, r.checkpoints.join(", ")));
    const tc = rep.time_and_cost || {};
    if (rep.training) parts.push(h("h2", {}, "Time: plan estimate vs spent"), table(["estimated here (s)", "spent (s)", "ratio", "tokens/s"],
      [[fmt(tc.estimated_seconds_here), fmt(tc.spent_seconds), fmt(tc.estimate_ratio), fmt(rep.training.tokens_per_second)]]));
    const dc = rep.data_check;
    if (dc) parts.push(h("h2", {}, "Data check"), table(["examples", "errors", "warnings", "train", "val", "test"],
      [[fmt(dc.examples), fmt(dc.errors), (dc.warnings || []).join(", ") || "-", fmt(dc.train_examples), fmt(dc.val_examples), fmt(dc.test_examples)]]));
    if (r.config_text) parts.push(h("h2", {}, "Config"), h("pre", {}, r.config_text));
    if (r.log) parts.push(h("h2", {}, "Log (launched from this UI)"), h("pre", { id: "log" }, r.log));
    info.replaceChildren(...parts);
  }
  renderInfo(d);
}

// --- New run ------------------------------------------------------------------------------------------------

async function newPage() {
  let spec, files;
  try { [spec, files] = await Promise.all([api("/api/fields"), api("/api/files")]); } catch (e) { view.append(errorBox(e)); return; }
  const inputs = {};
  const form = h("div");
  for (const f of spec.fields) {
    let input;
    const options = f.key === "data.path" ? files.files.map((x) => x.path) : f.key === "model" ? spec.models
      : typeof f.default === "boolean" ? ["false", "true"] : f.choices.length ? f.choices : null;
    if (options) input = h("select", { name: f.key }, options.map((o) => h("option", { value: o, selected: o === String(f.default) ? true : null }, o)));
    else input = h("input", { name: f.key, value: f.default === null ? "" : String(f.default), placeholder: f.default === null ? "none" : "" });
    inputs[f.key] = input;
    form.append(h("div", { class: "field" }, h("label", {}, f.key), input, h("div", { class: "help" }, f.help)));
  }
  const result = h("div", { id: "prepare" });
  const launch = h("button", { class: "primary", id: "launch", disabled: true, onclick: go }, "Launch");
  const values = () => ({ fields: Object.fromEntries(Object.entries(inputs).map(([k, el]) => [k, el.value])) });
  Object.values(inputs).forEach((el) => el.addEventListener("change", () => { launch.disabled = true; }));
  async function prepare() {
    result.replaceChildren(h("p", { class: "muted" }, "Checking the data and estimating…"));
    try {
      const p = await api("/api/prepare", values());
      const c = p.check, parts = [h("h2", {}, "Data check"),
        h("p", { class: c.errors.length ? "bad" : "good" }, `${c.examples} examples (${c.format}): ${c.errors.length} errors, ${c.warnings.length} warnings`)];
      c.errors.slice(0, 20).forEach((e) => parts.push(h("div", { class: "bad" }, `line ${e.line}: ${e.message}`)));
      c.warnings.forEach((w) => parts.push(h("div", {}, `${w.code}: ${w.message}`)));
      if (p.blocks) parts.push(h("div", { class: "error" }, "The data check would stop this run (errors, or warnings without data.allow_warnings)."));
      parts.push(h("h2", {}, "Plan"));
      if (p.plan) {
        const e = p.plan.estimate, here = Object.keys(e.hours).find((k) => k.startsWith("this machine"));
        parts.push(table(["peak memory", "parameters (trainable)", "time here", "fits"], [[
          `${(e.peak_memory_bytes / 2 ** 30).toFixed(2)} GiB (${e.peak_phase})`, `${fmt(e.params, 3)} (${fmt(e.trainable_params, 3)})`,
          here ? `${fmt(e.hours[here] * 3600, 3)} s` : "-", here ? (p.plan.fits[here] ? "yes" : "no") : Object.entries(p.plan.fits).map(([k, v]) => `${k}: ${v ? "yes" : "no"}`).join("; ")]]));
      } else parts.push(h("div", { class: "error" }, p.plan_error || "no estimate"));
      if (p.active.length) parts.push(h("div", { class: "notice" }, `Training now: ${p.active.join(", ")}. This run will wait in the queue.`));
      if (p.exists) parts.push(h("div", { class: "error" }, "A run of this name exists; choose another name."));
      result.replaceChildren(...parts);
      launch.disabled = p.blocks || p.exists;
    } catch (e) { result.replaceChildren(errorBox(e)); }
  }
  async function go() {
    try { const r = await api("/api/launch", values()); location.hash = `#/run/${enc(r.name)}`; } catch (e) { result.append(errorBox(e)); }
  }
  view.append(h("h1", {}, "New run"), h("p", { class: "muted" }, `Data files from ${files.root}`), form,
    h("p", {}, h("button", { id: "prepare-btn", onclick: prepare }, "Check data and plan"), " ", launch), result);
}

// --- Data ---------------------------------------------------------------------------------------------------

function histogram(el, title, values) {
  if (!values.length) return;
  const max = Math.max(...values), bins = Math.min(30, max + 1), width = Math.max(1, Math.ceil((max + 1) / bins));
  const xs = [], ys = [];
  for (let i = 0; i * width <= max; i++) { xs.push(i * width); ys.push(0); }
  values.forEach((v) => ys[Math.floor(v / width)]++);
  const scales = { x: { time: false, range: [-width / 2, xs[xs.length - 1] + width / 2] } };
  chart(el, title, [{ label: "examples", stroke: "#2f6feb", fill: "#2f6feb55", paths: uPlot.paths.bars({ size: [0.9] }) }], [xs, ys], { scales, width: 560 });
}

async function dataPage(params) {
  let files;
  try { files = await api("/api/files"); } catch (e) { view.append(errorBox(e)); return; }
  const pick = h("select", { id: "data-file" }, files.files.map((f) => h("option", { value: f.path, selected: f.path === params.get("file") ? true : null }, f.path)));
  const sample = h("input", { id: "sample", value: params.get("sample") || "50", size: 4 }), seed = h("input", { value: "42", size: 4 });
  const report = h("div"), review = h("div", { class: "review" });
  view.append(h("h1", {}, "Data"), h("p", {}, pick, " ", h("button", { onclick: check }, "Check"), " sample ", sample, " seed ", seed, " ",
    h("button", { id: "review-start", onclick: startReview }, "Review")), review, report);

  async function check() {
    report.replaceChildren(h("p", { class: "muted" }, "Checking…"));
    try {
      const d = await api(`/api/data/check?path=${enc(pick.value)}`), r = d.report, ex = (n) => d.examples[n] || {};
      const card = (n) => h("div", { class: "card" }, h("div", { class: "muted" }, `line ${n}`), h("div", {}, ex(n).prompt), h("div", { class: "good" }, ex(n).answer));
      const parts = [h("h2", {}, `${r.examples} examples, format ${r.format}`)];
      parts.push(h("h3", {}, `Errors (${r.errors.length})`), ...r.errors.map((e) => h("div", { class: "bad" }, `line ${e.line}: ${e.message}`)));
      parts.push(h("h3", {}, `Warnings (${r.warnings.length})`), ...r.warnings.map((w) => h("div", {}, `${w.code}: ${w.message}`)));
      parts.push(h("h3", {}, `Exact duplicates (${r.exact_duplicates.length} clusters)`), ...r.exact_duplicates.slice(0, 20).map((c) => h("div", { class: "cluster" }, c.map(card))));
      parts.push(h("h3", {}, `Near duplicates (${r.near_duplicates.length} clusters)`), ...r.near_duplicates.slice(0, 20).map((c) => h("div", { class: "cluster" }, c.map(card))));
      parts.push(h("h3", {}, `Conflicts (${r.conflicts.length})`), ...r.conflicts.slice(0, 20).map((c) => h("div", { class: "cluster" }, c.lines.map(card))));
      if (r.class_balance) {
        const most = Math.max(...Object.values(r.class_balance));
        parts.push(h("h3", {}, "Class balance"), ...Object.entries(r.class_balance).map(([k, v]) =>
          h("div", { class: "hbar" }, h("span", { style: "width:140px" }, k), h("span", { class: "fill", style: `width:${Math.round(300 * v / most)}px` }), String(v))));
      }
      const hp = h("div"), ha = h("div");
      parts.push(h("h3", {}, "Lengths (words)"), h("div", { class: "row" }, hp, ha));
      if (r.token_lengths) parts.push(h("pre", {}, JSON.stringify(r.token_lengths, null, 1)));
      report.replaceChildren(...parts);
      histogram(hp, "prompt length", d.lengths.prompt_words);
      histogram(ha, "answer length", d.lengths.answer_words);
    } catch (e) { report.replaceChildren(errorBox(e)); }
  }

  let items = [], pos = 0, summary = null, onKey = null;
  async function startReview() {
    try {
      const d = await api(`/api/review?path=${enc(pick.value)}&sample=${enc(sample.value)}&seed=${enc(seed.value)}`);
      items = d.items; summary = d.summary;
      pos = items.findIndex((i) => !i.verdict); if (pos < 0) pos = items.length;
      showItem();
      if (onKey) document.removeEventListener("keydown", onKey);
      onKey = key; document.addEventListener("keydown", onKey);
      cleanup.push(() => document.removeEventListener("keydown", onKey));
    } catch (e) { review.replaceChildren(errorBox(e)); }
  }
  const note = h("input", { id: "note", placeholder: "note (n)", size: 40 });
  const edit = h("textarea", { id: "edit", rows: 4, cols: 80, style: "display:none" });
  function progress() {
    const acc = summary ? Object.entries(summary.acceptance_by_class).map(([k, v]) => `${k}: ${Math.round(v * 100)}% accepted`).join(" · ") : "";
    return h("p", { id: "review-progress" }, `${summary ? summary.reviewed : 0} of ${items.length} reviewed${acc ? " · " + acc : ""}`);
  }
  function showItem() {
    const keys = h("p", { class: "keys muted" }, h("kbd", {}, "a"), " accept ", h("kbd", {}, "r"), " reject ", h("kbd", {}, "e"), " edit the answer (Ctrl+Enter saves) ",
      h("kbd", {}, "s"), " skip ", h("kbd", {}, "n"), " note ", h("kbd", {}, "Esc"), " leave a field");
    const apply = h("button", { id: "apply", onclick: applyReview }, "Apply the review");
    if (pos >= items.length) {
      review.replaceChildren(h("h2", {}, "Review"), progress(), h("p", { class: "good", id: "review-done" }, "Every sampled example has a verdict."), apply);
      return;
    }
    const it = items[pos];
    note.value = ""; edit.value = it.answer; edit.style.display = "none";
    review.replaceChildren(h("h2", {}, "Review"), progress(), keys,
      h("div", { class: "card", id: "review-item" }, h("div", { class: "muted" }, `#${pos + 1} · line ${it.line}${it.label ? " · class " + it.label : ""}${it.verdict ? " · was " + it.verdict.verdict : ""}`),
        h("h3", {}, "Prompt"), h("div", { class: "text" }, it.prompt), h("h3", {}, "Answer"), h("div", { class: "text" }, it.answer)),
      h("div", {}, note), edit, apply);
  }
  async function verdict(v, edited) {
    const it = items[pos];
    try {
      const r = await api("/api/review/verdict", { path: pick.value, hash: it.hash, verdict: v, note: note.value, edited, sample: +sample.value, seed: +seed.value });
      summary = r.summary; it.verdict = { verdict: v }; pos++; showItem();
    } catch (e) { review.append(errorBox(e)); }
  }
  function key(e) {
    if (pos >= items.length) return;
    if (e.target === note) { if (e.key === "Escape" || e.key === "Enter") note.blur(); return; }
    if (e.target === edit) {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); verdict("edit", edit.value); }
      else if (e.key === "Escape") edit.blur();
      return;
    }
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT" || e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key.toLowerCase();
    if (k === "a") verdict("accept");
    else if (k === "r") verdict("reject");
    else if (k === "s") { pos++; showItem(); }
    else if (k === "n") { e.preventDefault(); note.focus(); }
    else if (k === "e") { e.preventDefault(); edit.style.display = "block"; edit.focus(); }
  }
  async function applyReview() {
    try { const r = await api("/api/review/apply", { path: pick.value, overwrite: true }); review.append(h("p", { class: "good", id: "applied" }, `Wrote ${r.written}: ${r.reviewed} reviewed.`)); }
    catch (e) { review.append(errorBox(e)); }
  }
  if (params.get("file")) check();
}

// --- Compare ------------------------------------------------------------------------------------------------

async function comparePage(name) {
  let d;
  try { d = await api(`/api/runs/${enc(name)}`); } catch (e) { view.append(errorBox(e)); return; }
  const c = d.comparison;
  view.append(h("h1", {}, "Compare: ", h("a", { href: `#/run/${enc(name)}` }, name)));
  if (!c) { view.append(h("p", { class: "muted" }, `No comparison yet. Run: tunesmith compare ${name}`)); return; }
  // c is compare.json as evaluate.compare.read_comparison gives it: one comparison per baseline, the same shape each.
  const versus = c.baselines, label = (key) => (versus[key] ? versus[key].label : key);
  view.append(h("div", { class: "verdict", id: "verdict" }, c.verdict),
    h("p", { class: "muted" }, `${c.items} ${c.split} items · primary ${c.primary} · strongest baseline ${label(c.strongest)}${c.chosen_on ? " (chosen by " + c.chosen_on + ")" : ""} · ${c.correction}`));
  const contestants = [...Object.keys(versus), "tuned"];
  const rows = Object.entries(versus.zero_shot.metrics).filter(([, m]) => "tuned" in m).map(([k, m]) => [k, ...Object.values(versus).map((v) => fmt((v.metrics[k] || {}).base)), fmt(m.tuned)]);
  rows.push(["generation seconds", ...contestants.map((x) => fmt(c.seconds[x], 3))]);
  view.append(h("h2", {}, "Every contestant"), table(["metric", ...contestants.map(label)], rows));
  if (c.preference) {
    const p = c.preference;
    view.append(h("h2", {}, `Preference accuracy (${p.items} held-out pairs)`), table(["against", "their accuracy", "tuned", "diff", "95% CI", "p"],
      ["base", "start"].filter((k) => p[`tuned_vs_${k}`]).map((k) => { const r = p[`tuned_vs_${k}`]; return [k, fmt(r.base), fmt(r.tuned), fmt(r.diff), `[${fmt(r.ci_low)}, ${fmt(r.ci_high)}]`, r.p_text]; })));
  }
  for (const v of Object.values(versus)) {
    view.append(h("h2", {}, `Tuned vs ${v.label}`), table(["metric", v.label, "tuned", "diff", "95% CI", "p", "p (Holm)", "test", "significant"],
      Object.entries(v.metrics).map(([k, m]) => [k, fmt(m.base), fmt(m.tuned), fmt(m.diff), "ci_low" in m ? `[${fmt(m.ci_low)}, ${fmt(m.ci_high)}]` : "-",
        m.p_text || "-", fmt(m.p_holm), m.test || "-", m.significant ? "yes" : "no"])),
    h("p", {}, `Decided per item by ${v.decided_by}: ${v.wins} wins, ${v.ties} ties, ${v.losses} losses.`));
  }
  const fields = c.field_accuracy || {};
  if (Object.keys(fields).length) {
    const names = [...new Set(Object.values(fields).flatMap((f) => Object.keys(f)))];
    view.append(h("h2", {}, "Per-field accuracy"), table(["model", ...names], Object.entries(fields).map(([m, f]) => [label(m), ...names.map((n) => fmt(f[n], 3))])));
  }
  const against = h("select", {}, Object.keys(versus).map((k) => h("option", { value: k }, label(k))));
  const kind = h("select", {}, h("option", { value: "fixed" }, "fixed by fine-tuning"), h("option", { value: "broken" }, "broken by fine-tuning"));
  const filter = h("input", { id: "flip-filter", placeholder: "filter text", size: 30 });
  const flips = h("div", { id: "flipped" });
  function showFlips() {
    const v = versus[against.value], q = filter.value.toLowerCase();
    const list = v.flipped[kind.value].filter((r) => !q || JSON.stringify(r).toLowerCase().includes(q));
    flips.replaceChildren(h("p", { class: "muted" }, `${list.length} items`), ...list.slice(0, 100).map((r) => h("div", { class: "card" },
      h("div", { class: "muted" }, `line ${r.line}`), h("div", {}, r.prompt),
      h("div", { class: "answers" }, h("div", { class: "card" }, h("b", {}, "reference\n"), r.reference), h("div", { class: "card" }, h("b", {}, `${v.label}\n`), r[v.against] || ""),
        h("div", { class: "card" }, h("b", {}, "tuned\n"), r.tuned)))));
  }
  [against, kind].forEach((el) => el.addEventListener("change", showFlips));
  filter.addEventListener("input", showFlips);
  view.append(h("h2", {}, "Flipped items"), h("p", {}, against, " ", kind, " ", filter), flips);
  showFlips();
}

// --- Playground ---------------------------------------------------------------------------------------------

async function playPage() {
  let d;
  try { d = await api("/api/playground"); } catch (e) { view.append(errorBox(e)); return; }
  view.append(h("h1", {}, "Playground"));
  if (d.training.length) view.append(h("div", { class: "notice", id: "compete" }, `Busy now (${d.training.join(", ")}: training or comparing): the playground shares this machine's cores with it; both will be slower.`));
  if (!d.runs.length) { view.append(h("p", { class: "muted" }, "No completed runs to chat with yet.")); return; }
  const boxes = d.runs.map((r, i) => h("label", {}, h("input", { type: "checkbox", value: r.name, checked: i === 0 ? true : null }), ` ${r.name} (${r.method}) `));
  const base = h("input", { type: "checkbox", id: "with-base", checked: true });
  const prompt = h("textarea", { id: "prompt", rows: 3, cols: 90, placeholder: "Your message" });
  const maxTokens = h("input", { value: "48", size: 4 });
  const answers = h("div", { class: "answers", id: "answers" });
  view.append(h("p", {}, ...boxes, h("label", {}, base, " base model")), prompt, h("p", {}, "max tokens ", maxTokens, " ", h("button", { class: "primary", id: "send", onclick: send }, "Send")), answers);
  async function send() {
    const runs = boxes.map((b) => b.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
    if (!runs.length) { answers.replaceChildren(errorBox("Pick at least one run.")); return; }
    const models = [...(base.checked ? ["base"] : []), ...runs];
    answers.replaceChildren();
    await Promise.all(models.map((model) => stream(model, runs)));
  }
  async function stream(model, runs) {
    const text = h("div", { class: "answer-text" }), card = h("div", { class: "card", "data-model": model }, h("b", {}, model), h("div", { class: "muted" }, "…"), text);
    answers.append(card);
    const res = await fetch("/api/playground/chat", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ runs, model, messages: [{ role: "user", content: prompt.value }], max_tokens: +maxTokens.value }) });
    if (!res.ok) { card.append(errorBox((await res.json().catch(() => ({}))).error || res.statusText)); return; }
    const reader = res.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const chunk = buf.slice(0, cut); buf = buf.slice(cut + 2);
        const kind = (chunk.match(/^event: (.*)$/m) || [])[1], data = JSON.parse((chunk.match(/^data: (.*)$/m) || [, "{}"])[1]);
        if (kind === "delta") text.textContent += data.text;
        else if (kind === "done") { card.children[1].textContent = `${data.tokens} tokens (${data.finish})`; card.dataset.done = "1"; }
        else if (kind === "error") card.append(errorBox(data.error));
      }
    }
  }
}

// --- Router -------------------------------------------------------------------------------------------------

async function route() {
  cleanup.forEach((f) => f()); cleanup = [];
  view.replaceChildren();
  const [path, query] = (location.hash.slice(1) || "/runs").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || "");
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("on", a.dataset.page === parts[0]));
  const pages = { runs: runsPage, run: () => runPage(parts[1]), new: newPage, data: () => dataPage(params), compare: () => comparePage(parts[1]), play: playPage };
  await (pages[parts[0]] || runsPage)();
  view.dataset.page = parts[0] || "runs";
}
window.addEventListener("hashchange", route);
route();
