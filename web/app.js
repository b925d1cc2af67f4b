/* Trainer monitor dashboard. Plain JS, no build step.
 *
 * Updates come from /api/stream (Server-Sent Events); if the stream fails the page polls the
 * JSON API until the stream is back. Everything that comes from datasets, file names, errors or
 * logs is put on the page with textContent (never innerHTML). Changes are POSTed with the header
 * X-Trainer-Request: 1 (the server refuses changes without it).
 */
"use strict";
(function () {
  // ---- token: taken once from ?token=, kept in sessionStorage, removed from the address bar ----
  const TOKEN_KEY = "trainerMonitorToken";
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    sessionStorage.setItem(TOKEN_KEY, params.get("token") || "");
    params.delete("token");
    const q = params.toString();
    history.replaceState(null, "", location.pathname + (q ? "?" + q : "") + location.hash);
  }
  const TOKEN = sessionStorage.getItem(TOKEN_KEY) || "";

  const MAX_POINTS = 20000;
  const MAX_SYS_POINTS = 1800;
  const MAX_LOG_LINES = 400;
  const MAX_EVENTS = 200;
  const DONE_SHOWN = 50;

  // ---- small DOM helpers (text only) ----
  const $ = (id) => document.getElementById(id);
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === undefined || v === null) continue;
        if (k === "text") node.textContent = String(v);
        else if (k === "className") node.className = v;
        else if (k === "title") node.title = String(v);
        else if (k === "dataset") Object.assign(node.dataset, v);
        else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, String(v));
      }
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  function setPanel(node, state, reason) {
    node.dataset.state = state;
    const r = node.querySelector(":scope > .reason") || node.querySelector(".reason");
    if (r && reason !== undefined) r.textContent = reason;
  }

  // ---- formatting ----
  const nf = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  function num(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (typeof v !== "number") return String(v);
    if (digits !== undefined) return v.toFixed(digits);
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
    if (a >= 100) return nf.format(v);
    return v.toPrecision(4).replace(/\.?0+$/, "");
  }
  function bytes(v) {
    if (v === null || v === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0, x = v;
    while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
    return (i === 0 ? x : x.toFixed(x >= 100 ? 0 : 1)) + " " + units[i];
  }
  function dur(s) {
    if (s === null || s === undefined || !isFinite(s)) return "–";
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
    if (m) return `${m}m ${String(sec).padStart(2, "0")}s`;
    return `${sec}s`;
  }
  function when(ts) {
    if (ts === null || ts === undefined) return "–";
    const d = typeof ts === "number" ? new Date(ts * 1000) : new Date(ts);
    if (isNaN(d)) return String(ts);
    const today = new Date();
    return d.toDateString() === today.toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
  }
  const GiB = 1024 ** 3;

  // ---- API ----
  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (TOKEN) h["Authorization"] = "Bearer " + TOKEN;
    return h;
  }
  async function api(method, path, body, extraHeaders) {
    const init = { method, headers: headers(extraHeaders), cache: "no-store", credentials: "same-origin" };
    if (method !== "GET" && method !== "HEAD") init.headers["X-Trainer-Request"] = "1";
    if (body !== undefined) {
      if (body instanceof Blob) init.body = body;
      else { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
    }
    let res;
    try { res = await fetch(path, init); } catch (e) { return { ok: false, status: 0, data: { detail: "monitor unreachable: " + e.message } }; }
    let data = null;
    try { data = await res.json(); } catch (e) { data = { detail: res.statusText }; }
    return { ok: res.ok, status: res.status, data };
  }
  function detailOf(data) {
    if (!data) return "";
    if (typeof data.message === "string") return data.message;
    if (typeof data.detail === "string") return data.detail;
    if (Array.isArray(data.detail)) return data.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    return JSON.stringify(data);
  }

  function toast(text, kind) {
    const t = el("div", { className: "toast " + (kind || ""), text });
    $("toasts").append(t);
    setTimeout(() => t.remove(), kind === "bad" ? 9000 : 5000);
  }

  // ---- theme-aware colours for charts and heatmap ----
  const dark = window.matchMedia("(prefers-color-scheme: dark)");
  function css(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }
  const PALETTE_LIGHT = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2"];
  const PALETTE_DARK = ["#60a5fa", "#f87171", "#34d399", "#fbbf24", "#a78bfa", "#22d3ee"];
  const palette = () => (dark.matches ? PALETTE_DARK : PALETTE_LIGHT);

  // ---- charts (uPlot) ----
  const charts = {};   // id -> {u, data, defs, fmt}
  // time axis: whole seconds at the finest, labelled by what the step between ticks needs
  const X_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
    86400, 172800, 604800, 2592000];
  function xTicks(u, vals, axisIdx, space, incr) {
    return vals.map((v) => {
      const d = new Date(v * 1000);
      if (incr >= 86400) return d.toLocaleDateString([], { month: "short", day: "numeric" });
      if (incr >= 60) return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
    });
  }
  function chartWidth(node) { return Math.max(200, Math.floor(node.clientWidth || node.parentNode.clientWidth || 300)); }
  // the legend shows each series' latest value while the cursor is off the chart
  function latest(arr) {
    for (let i = arr.length - 1; i >= 0; i--) if (arr[i] != null) return arr[i];
    return null;
  }
  // dashed vertical lines where each job's points begin
  function drawStarts(u, starts) {
    if (!starts || !starts.length) return;
    const ctx = u.ctx, { left, top, width, height } = u.bbox;
    ctx.save();
    ctx.strokeStyle = css("--muted");
    ctx.fillStyle = css("--muted");
    ctx.setLineDash([4, 4]);
    ctx.lineWidth = 1;
    ctx.font = `${Math.round(10 * devicePixelRatio)}px system-ui, sans-serif`;
    for (const s of starts) {
      const x = Math.round(u.valToPos(s.t, "x", true));
      if (x < left || x > left + width) continue;
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, top + height);
      ctx.stroke();
      ctx.fillText(String(s.label).slice(0, 24), x + 3 * devicePixelRatio, top + 11 * devicePixelRatio);
    }
    ctx.restore();
  }
  function makeChart(id, defs, fmt, data, starts) {
    const node = $(id);
    const old = charts[id];
    if (old && old.u) old.u.destroy();
    node.replaceChildren();
    const axisStroke = css("--muted"), grid = css("--border");
    const colors = palette();
    const opts = {
      width: chartWidth(node), height: 190,
      scales: { x: { time: true, range: (u, min, max) => (min === max || min == null ? [(min ?? 0) - 30, (max ?? 0) + 30] : [min, max]) } },
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      series: [{ value: (u, v, si, i) => (i == null ? "latest" : v == null ? "–" : when(v)) }].concat(defs.map((d, i) => ({
        label: d.label, stroke: d.color || colors[i % colors.length], width: 1.6, spanGaps: false,
        points: { show: (u, si, i0, i1) => !!d.points || i1 - i0 < 2, size: 5 },
        value: (u, v, si, idx) => {
          const x = idx == null ? latest(u.data[si]) : v;
          return x == null ? "–" : fmt(x);
        },
      }))),
      hooks: starts ? { draw: [(u) => drawStarts(u, starts)] } : {},
      axes: [
        { stroke: axisStroke, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 },
          space: 100, incrs: X_INCRS, values: xTicks },
        { stroke: axisStroke, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 },
          size: (u, values) => 24 + 7.5 * Math.max(3, ...(values || []).map((v) => String(v).length)),
          values: (u, vals) => vals.map((v) => (v == null ? "" : fmt(v))) },
      ],
    };
    const u = typeof uPlot === "function" ? new uPlot(opts, data, node) : null;
    charts[id] = { u, data, defs, fmt };
    return charts[id];
  }
  const dirty = new Set();
  function redraw(id) {
    dirty.add(id);
    if (dirty.size === 1) requestAnimationFrame(flushCharts);
  }
  function flushCharts() {
    for (const id of dirty) {
      const c = charts[id];
      if (c && c.u) {
        c.u.setData(c.data);
        if (c.u.cursor.idx == null) c.u.setLegend({ idx: null });    // the latest values
      }
    }
    dirty.clear();
  }
  const ro = new ResizeObserver((entries) => {
    for (const e of entries) {
      const c = charts[e.target.id];
      if (c && c.u && e.contentRect.width > 0) c.u.setSize({ width: Math.floor(e.contentRect.width), height: 190 });
    }
  });

  // ---- state ----
  let status = null;
  // metrics; a null point between two jobs breaks the lines (no false ramp over the idle time
  // between them), and starts[] marks where each job's points begin
  const M = { t: [], loss: [], eval: [], lr: [], tps: [], seq: -1, total: 0, job: null, starts: [] };
  window.trainerCharts = charts;   // read by the browser tests (the plotted data)
  const S = { t: [], gpu: [], ram: [], daemon: [], worker: [], gpuCount: -1, last: null };
  let queue = null;
  let layers = null;
  let lastEventId = 0;

  // ---- header / status ----
  // the last finished job, when none runs; one the promotion gate held back is marked (text only)
  function showLastJob(lj) {
    const box = $("last-job");
    box.replaceChildren();
    box.hidden = !(lj && lj.file);
    box.dataset.held = lj && lj.held ? "true" : "false";
    if (box.hidden) return;
    if (lj.held) box.append(el("span", { className: "held-badge", text: "held" }), " ");
    let text = `last job: ${lj.file} ${lj.outcome || ""}`;
    if (lj.held) {
      const snap = String(lj.held.snapshot || "").split("/").pop();
      text += ` (${lj.reason || "held"}) · current_model/ unchanged · candidate snapshots/${snap}`
        + ` (trainer-ctl promote ${snap})`;
    } else if (lj.reason && lj.outcome !== "completed") text += ` (${lj.reason})`;
    box.append(text);
  }
  function onStatus(s) {
    status = s;
    const st = s.status || "unknown";
    const badge = $("state-badge");
    const shown = s.daemon_running && s.paused && st !== "paused" && st !== "stopping" ? st + " (pausing)" : st;
    badge.textContent = shown;
    badge.dataset.status = st;
    const running = !!s.daemon_running;
    const job = running ? s.current_file : null;
    $("job-file").textContent = job ? job : "no job running";
    $("job-file").title = job || "";
    const step = s.current_step, total = s.total_steps;
    const pct = job && total ? Math.min(100, (100 * (step || 0)) / total) : 0;
    $("progress-bar").style.width = pct.toFixed(1) + "%";
    $("progress").setAttribute("aria-valuenow", pct.toFixed(0));
    const meta = [];
    const prep = s.preparing;
    const training = total != null;   // the worker started training (the rest may still be tokenized)
    if (job && prep && !training) {
      meta.push(prep.phase === "tokenizing" && prep.total
        ? `preparing data ${Math.round(prep.percent || 0)} % (${(prep.done || 0).toLocaleString()} / ${prep.total.toLocaleString()} records)`
          + (prep.eta_seconds != null ? " · ETA " + dur(prep.eta_seconds) : "")
        : "preparing data (validating the file)");
    } else if (job) {
      const pausedNow = st === "paused";
      meta.push(`step ${step ?? 0} of ${total ?? "?"}` + (total ? ` (${pct.toFixed(0)}%)` : ""));
      meta.push(pausedNow ? "paused" : "ETA " + dur(s.eta_seconds));    // no stale ETA or tok/s while paused
      if (s.loss != null) meta.push("loss " + num(s.loss));
      if (s.tokens_per_second != null && !pausedNow) meta.push(num(s.tokens_per_second) + " tok/s");
      if (s.ranks > 1) meta.push(`on ${s.ranks} ranks`);
      if (prep && prep.total) meta.push(`tokenizing the rest ${Math.round(prep.percent || 0)} %`);
    } else if (s.queue && running) {
      meta.push(`queue: ${s.queue.pending ?? 0} pending`);
    }
    if (running && s.checking && s.checking.file) meta.push(`checking inbox/${s.checking.file}`);
    $("job-meta").textContent = meta.join(" · ") || "–";
    const detail = [];
    if (!running) detail.push(s.message || "daemon not running");
    else if (s.daemon_pid) detail.push(`daemon pid ${s.daemon_pid}` + (s.started_at ? `, up since ${when(s.started_at)}` : ""));
    if (running && s.paused_reason && st === "paused") detail.push("paused: " + s.paused_reason);
    if (s.last_error && s.last_error.message) detail.push("last error: " + s.last_error.message);
    const lc = s.last_command;
    if (lc && lc.message && ["pause", "resume", "skip", "stop"].includes(lc.command)) {
      detail.push(`last command: ${lc.command} from ${lc.source || "?"}` + (lc.at ? ` at ${when(lc.at)}` : "") + (lc.ok ? "" : ` (refused: ${lc.message})`));
    }
    $("state-detail").textContent = detail.join(" — ");
    showLastJob(job ? null : s.last_job);
    // buttons
    const paused = !!s.paused || st === "paused";
    const busy = st === "stopping" || st === "stopped";
    setBtn("btn-pause", running && !paused && !busy, running ? (paused ? "already paused" : "") : "daemon not running");
    setBtn("btn-resume", running && paused && !busy, running ? (paused ? "" : "not paused") : "daemon not running");
    setBtn("btn-skip", running && !!s.current_file && !busy, running ? (s.current_file ? "" : "no job running") : "daemon not running");
    setBtn("btn-stop", running && !busy, running ? "" : "daemon not running");
    // training stats line
    const stats = $("train-stats");
    stats.replaceChildren();
    const add = (label, value) => stats.append(el("span", { className: "stat" }, label + " ", el("b", { text: value })));
    add("trainer", s.trainer || "–");
    add("model", s.model_name || "–");
    add("loss", num(s.loss));
    add("eval loss", num(s.eval_loss));
    add("lr", num(s.learning_rate));
    add("grad norm", num(s.grad_norm));
    add("tokens/s", st === "paused" ? "paused" : num(s.tokens_per_second));
    add("epoch", num(s.epoch));
    add("peak memory", bytes(s.peak_memory_bytes));
    $("top").dataset.state = "data";
    if (queue) renderJobs("q-processing", (queue.jobs || {}).processing || [], processingItem, "nothing is training");
    updateMetricReasons();
    if (!S.last) updateSystemReasons();
  }
  function setBtn(id, enabled, why) {
    const b = $(id);
    b.disabled = !enabled;
    b.title = enabled ? "" : why;
  }

  // ---- control buttons ----
  async function control(command) {
    if (command === "stop") {
      const ok = await confirmDialog("Stop the daemon? The current job is checkpointed and resumes at the next start.", "Stop");
      if (!ok) return;
    }
    const b = $("btn-" + command);
    b.disabled = true;
    const r = await api("POST", "api/control/" + command);
    toast(detailOf(r.data) || (r.ok ? command + " sent" : "failed"), r.ok ? "ok" : "bad");
    if (status) onStatus(status);
    if (pollMode) pollOnce();
  }
  function confirmDialog(text, okLabel) {
    const d = $("confirm-dialog");
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = okLabel;
    return new Promise((resolve) => {
      const done = (v) => { d.close(); cleanup(); resolve(v); };
      const ok = () => done(true), cancel = () => done(false);
      const onCancel = (e) => { e.preventDefault(); done(false); };
      function cleanup() {
        $("confirm-ok").removeEventListener("click", ok);
        $("confirm-cancel").removeEventListener("click", cancel);
        d.removeEventListener("cancel", onCancel);
      }
      $("confirm-ok").addEventListener("click", ok);
      $("confirm-cancel").addEventListener("click", cancel);
      d.addEventListener("cancel", onCancel);
      d.showModal();
      $("confirm-cancel").focus();
    });
  }

  // ---- training metrics ----
  const SERIES = ["t", "loss", "eval", "lr", "tps"];
  function resetMetrics() {
    for (const k of SERIES) M[k].length = 0;
    M.job = null;
    M.starts.length = 0;
  }
  function onMetrics(msg) {
    if (msg.reset) resetMetrics();
    for (const r of msg.records || []) {
      if (typeof r.time !== "number") continue;
      const job = r.job_id ?? r.file ?? null;
      if (job !== M.job) {
        const last = M.t.length ? M.t[M.t.length - 1] : null;
        if (last != null && r.time > last) {          // the gap: one null point between the two jobs
          M.t.push((last + r.time) / 2);
          for (const k of SERIES.slice(1)) M[k].push(null);
        }
        M.starts.push({ t: r.time, label: r.file || (r.job_id != null ? "job " + r.job_id : "job") });
        M.job = job;
      }
      // a value a record does not carry is undefined (uPlot joins across it); null is the gap
      const val = (v) => (typeof v === "number" ? v : undefined);
      M.t.push(r.time);
      M.loss.push(val(r.loss));
      M.eval.push(val(r.eval_loss));
      M.lr.push(val(r.learning_rate));
      M.tps.push(val(r.tokens_per_second));
      if (typeof r.seq === "number") M.seq = Math.max(M.seq, r.seq);
    }
    if (typeof msg.total === "number") M.total = msg.total;
    const extra = M.t.length - MAX_POINTS;
    if (extra > 0) {
      for (const k of SERIES) M[k].splice(0, extra);
      while (M.starts.length > 1 && M.starts[1].t <= M.t[0]) M.starts.shift();
    }
    updateMetricReasons();
    for (const id of ["chart-loss", "chart-lr", "chart-tps"]) if (charts[id]) redraw(id);
  }
  const has = (arr) => arr.some((v) => v != null);
  function updateMetricReasons() {
    const trainer = status && status.trainer ? status.trainer : null;
    const none = M.t.length === 0;
    const whyNone = "no training metrics yet: they appear once a job trains";
    const whyMissing = (what) => trainer === "standin"
      ? `no ${what}: the stand-in trainer (config "trainer": "standin") trains no model and reports none`
      : `no ${what} in the metrics yet` + (trainer ? ` (trainer: ${trainer})` : "");
    setChartBox("box-loss", "chart-loss", none ? whyNone : (has(M.loss) || has(M.eval) ? null : whyMissing("loss values")),
      () => [[{ label: "train loss" }, { label: "eval loss", points: true }], (v) => num(v), [M.t, M.loss, M.eval], M.starts]);
    setChartBox("box-lr", "chart-lr", none ? whyNone : (has(M.lr) ? null : whyMissing("learning rate")),
      () => [[{ label: "learning rate" }], (v) => num(v), [M.t, M.lr], M.starts]);
    setChartBox("box-tps", "chart-tps", none ? whyNone : (has(M.tps) ? null : whyMissing("tokens/s")),
      () => [[{ label: "tokens/s" }], (v) => num(v), [M.t, M.tps], M.starts]);
  }
  function setChartBox(boxId, chartId, reason, spec) {
    const box = $(boxId);
    if (reason) {
      setPanel(box, "reason", reason);
      return;
    }
    const wasShown = box.dataset.state === "data";
    setPanel(box, "data");
    if (!charts[chartId] || !wasShown) {
      const [defs, fmt, data, starts] = spec();
      makeChart(chartId, defs, fmt, data, starts);
      ro.observe($(chartId));
    }
  }

  // ---- GPU and memory ----
  function onSystemHistory(msg) {
    S.t.length = 0; S.gpu.length = 0; S.ram.length = 0; S.daemon.length = 0; S.worker.length = 0;
    for (const s of msg.samples || []) addSample(s, false);
    renderSystem(true);
  }
  function onSystem(s) {
    addSample(s, true);
    renderSystem(false);
  }
  function addSample(s, trim) {
    S.last = s;
    S.t.push(s.time);
    S.gpu.push(s.gpu && s.gpu.available ? s.gpu.gpus : null);
    const m = s.memory || {};
    S.ram.push(m.system ? m.system.used_bytes / GiB : null);
    S.daemon.push(m.daemon ? m.daemon.rss_bytes / GiB : null);
    S.worker.push(m.daemon ? (m.worker_rss_bytes || 0) / GiB : null);
    if (trim && S.t.length > MAX_SYS_POINTS) for (const k of ["t", "gpu", "ram", "daemon", "worker"]) S[k].shift();
  }
  function gpuSeries(field, scale) {
    const n = Math.max(S.gpuCount, 0);
    const cols = [];
    for (let i = 0; i < n; i++) cols.push(S.gpu.map((g) => (g && g[i] && g[i][field] != null ? g[i][field] * scale : null)));
    return cols;
  }
  function renderSystem(rebuild) {
    updateSystemReasons();
    const s = S.last;
    // GPU
    const gpu = s && s.gpu;
    if (gpu && gpu.available) {
      const count = gpu.gpus.length;
      const names = gpu.gpus.map((g) => `GPU ${g.index}`);
      const needBuild = rebuild || count !== S.gpuCount || !charts["chart-gpu-util"];
      S.gpuCount = count;
      const specs = [["chart-gpu-util", "utilization_percent", 1, (v) => num(v, 0) + "%"],
        ["chart-gpu-mem", "memory_used_bytes", 1 / GiB, (v) => num(v, 1)],
        ["chart-gpu-temp", "temperature_c", 1, (v) => num(v, 0) + "°"],
        ["chart-gpu-power", "power_w", 1, (v) => num(v, 0) + " W"]];
      for (const [id, field, scale, fmt] of specs) {
        const data = [S.t].concat(gpuSeries(field, scale));
        if (needBuild) { makeChart(id, names.map((l) => ({ label: l })), fmt, data); ro.observe($(id)); }
        else { charts[id].data = data; redraw(id); }
      }
      const info = $("gpu-info");
      info.replaceChildren();
      for (const g of gpu.gpus) {
        const procs = (g.processes || []).map((p) => `${p.name || "?"} (${p.pid}${p.used_memory_bytes != null ? ", " + bytes(p.used_memory_bytes) : ""})`).join(", ");
        info.append(el("span", { className: "stat" }, `GPU ${g.index} `, el("b", { text: g.name || "?" }),
          ` · ${num(g.utilization_percent, 0)}% · ${bytes(g.memory_used_bytes)} / ${bytes(g.memory_total_bytes)} · ${num(g.temperature_c, 0)} °C · ${num(g.power_w, 0)} / ${num(g.power_limit_w, 0)} W · SM ${num(g.clock_sm_mhz, 0)} MHz · mem ${num(g.clock_mem_mhz, 0)} MHz`
          + (procs ? ` · processes: ${procs}` : " · no processes")));
      }
      if (gpu.driver) info.append(el("span", { className: "stat muted", text: "driver " + gpu.driver }));
    }
    // memory
    if (s && s.memory) {
      const m = s.memory;
      const data = [S.t, S.ram, S.daemon, S.worker];
      if (rebuild || !charts["chart-mem"]) {
        makeChart("chart-mem", [{ label: "system RAM in use" }, { label: "daemon RSS" }, { label: "worker RSS" }], (v) => num(v, v < 1 ? 2 : 1), data);
        ro.observe($("chart-mem"));
      } else { charts["chart-mem"].data = data; redraw("chart-mem"); }
      const info = $("mem-info");
      info.replaceChildren();
      const add = (label, value) => info.append(el("span", { className: "stat" }, label + " ", el("b", { text: value })));
      add("RAM", `${bytes(m.system.used_bytes)} / ${bytes(m.system.total_bytes)} (${num(m.system.percent, 0)}%)`);
      add("swap", `${bytes(m.swap.used_bytes)} / ${bytes(m.swap.total_bytes)}`);
      add("daemon RSS", m.daemon ? bytes(m.daemon.rss_bytes) : "–");
      add("workers", m.daemon ? `${m.workers.length} (${bytes(m.worker_rss_bytes)})` : "–");
      if (m.disk && m.disk.free_bytes != null) add("disk free", `${bytes(m.disk.free_bytes)} of ${bytes(m.disk.total_bytes)}`);
      if (m.process_reason) info.append(el("span", { className: "stat muted", text: "process memory: " + m.process_reason }));
    }
  }
  function updateSystemReasons() {
    const s = S.last;
    if (!s) {
      setPanel($("gpu-panel"), "loading", "waiting for the first GPU reading…");
      setPanel($("mem-panel"), "loading", "waiting for the first memory reading…");
      return;
    }
    if (s.gpu && s.gpu.available) setPanel($("gpu-panel"), "data");
    else {
      setPanel($("gpu-panel"), "reason", (s.gpu && s.gpu.reason) || "no NVIDIA GPU detected");
      $("gpu-info").replaceChildren();
    }
    setPanel($("mem-panel"), s.memory ? "data" : "reason", s.memory ? undefined : "no memory reading");
  }

  // ---- layers ----
  const TYPE_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
  function onLayers(l) {
    layers = l;
    renderLayers();
  }
  function heatColor(f) {
    // from the panel colour to a strong blue (light) or amber (dark)
    const lo = dark.matches ? [23, 27, 35] : [255, 255, 255];
    const hi = dark.matches ? [251, 146, 60] : [29, 78, 216];
    const c = lo.map((a, i) => Math.round(a + (hi[i] - a) * f));
    return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
  }
  function renderLayers() {
    const panel = $("layers");
    const l = layers;
    if (!l || !l.available) {
      setPanel(panel, "reason", (l && l.reason) || "no layer activity yet");
      return;
    }
    const rows = Array.isArray(l.modules) ? l.modules : [];
    if (!rows.length) {
      setPanel(panel, "reason", "layer activity file has no modules yet");
      return;
    }
    setPanel(panel, "data");
    const metric = $("heat-metric").value;
    const layerKeys = [...new Set(rows.map((r) => (r.layer === null || r.layer === undefined ? "other" : r.layer)))]
      .sort((a, b) => (a === "other") - (b === "other") || a - b);
    const types = [...new Set(rows.map((r) => String(r.type)))]
      .sort((a, b) => {
        const ia = TYPE_ORDER.indexOf(a), ib = TYPE_ORDER.indexOf(b);
        return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
      });
    const cell = new Map();
    for (const r of rows) {
      const key = (r.layer === null || r.layer === undefined ? "other" : r.layer) + "|" + r.type;
      const v = typeof r[metric] === "number" ? r[metric] : null;
      const prev = cell.get(key);
      cell.set(key, prev == null ? v : Math.sqrt(prev * prev + (v || 0) * (v || 0)));
    }
    const vals = [...cell.values()].filter((v) => v !== null).map(Math.abs);
    const max = vals.length ? Math.max(...vals) : 0;
    const table = $("heatmap");
    const head = el("tr", null, el("th", { text: "layer" }), ...types.map((t) => el("th", { text: t })));
    const body = el("tbody");
    for (const lk of layerKeys) {
      const tr = el("tr", null, el("th", { text: String(lk) }));
      for (const t of types) {
        const v = cell.get(lk + "|" + t);
        if (v === undefined || v === null) { tr.append(el("td", { className: "empty", text: "·" })); continue; }
        const f = max > 0 ? Math.abs(v) / max : 0;
        const td = el("td", { text: num(v), title: `layer ${lk} ${t}: ${metric} = ${v}` });
        td.style.backgroundColor = heatColor(f);
        if (f > 0.55) td.classList.add("hot");
        tr.append(td);
      }
      body.append(tr);
    }
    table.replaceChildren(el("thead", null, head), body);
    $("heat-ramp").style.background = `linear-gradient(to right, ${heatColor(0)}, ${heatColor(1)})`;
    $("layers-meta").textContent = `step ${l.step ?? "?"}` + (l.job_id != null ? `, job ${l.job_id}` : "") + (l.updated_at ? `, ${when(l.updated_at)}` : "") + ` · max ${num(max)}`;
    const top = rows.slice().sort((a, b) => Math.abs(b.delta_change || 0) - Math.abs(a.delta_change || 0)).slice(0, 10);
    $("movers").replaceChildren(...top.map((r) => el("li", null, String(r.module || `${r.layer}.${r.type}`), " ",
      el("span", { className: "num", text: `Δ ${num(r.delta_change)} · ‖ΔW‖ ${num(r.delta_norm)} · grad ${num(r.grad_norm)}` }))));
  }

  // ---- retention: the forgetting matrix (GET /api/eval, the stream's "eval" event) ----
  // rows: datasets (the reference set first); columns: the adapter after each job; a cell: the
  // eval loss on that dataset's retention set and its change since the dataset was learned. Colour:
  // that change relative to the learned loss, green lower, red higher, saturated at RET_SAT.
  const RET_SAT = 0.5;
  const RET_NEUTRAL = 0.01;
  let evalData = null;
  function onEval(e) {
    evalData = e;
    renderRetention();
  }
  function changeColor(rel) {
    const lo = dark.matches ? [23, 27, 35] : [255, 255, 255];
    const hi = rel < 0 ? (dark.matches ? [34, 197, 94] : [21, 128, 61]) : (dark.matches ? [239, 68, 68] : [185, 28, 28]);
    const f = Math.min(1, Math.abs(rel) / RET_SAT);
    const c = lo.map((a, i) => Math.round(a + (hi[i] - a) * f));
    return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
  }
  const signed = (v, digits) => (v < 0 ? "-" : "+") + Math.abs(v).toFixed(digits);     // as trainer-ctl eval
  const pct = (rel) => signed(100 * rel, Math.abs(rel) >= 0.1 ? 0 : 1) + " %";
  function datasetLabel(d) {
    return d.reference ? String(d.name || "reference set") : `${d.name || "?"} #${d.job_id}`;
  }
  function columnLabel(c) {
    return `after job ${c.after_job}` + (c.name ? ` (${c.name})` : "");
  }
  function retentionHead(c) {
    const th = el("th", { scope: "col", title: columnLabel(c) + (c.gate ? "\npromotion gate: " + c.gate : ""),
      dataset: { job: String(c.after_job) } },
    el("div", { className: "ret-job", text: `after job ${c.after_job}` }),
    el("div", { className: "ret-name", text: c.name || "?" }));
    const marks = el("div", { className: "ret-marks" });
    if (c.held) {
      th.classList.add("held");
      marks.append(el("span", { className: "mark held", text: "held", title: c.held.reason }));
    }
    if (c.promoted) {
      const rolled = c.promoted.kind === "rolled_back";
      marks.append(el("span", { className: "mark " + (rolled ? "rolled-back" : "promoted"),
        text: rolled ? "rolled back" : "promoted", title: c.promoted.message }));
    }
    if (c.current) marks.append(el("span", { className: "mark live", text: "live", title: "current_model/ is this adapter" }));
    if (marks.childNodes.length) th.append(marks);
    return th;
  }
  function retentionCell(d, c, cell) {
    const where = `${datasetLabel(d)} after job ${c.after_job}`;
    const td = el("td", { dataset: { job: String(c.after_job) } });
    if (c.held) td.classList.add("held");
    if (!cell) {
      td.classList.add("empty");
      td.title = `${where}: not evaluated`;
      return td;
    }
    if (cell.loss === null || cell.loss === undefined) {
      td.classList.add("skipped");
      td.textContent = cell.skipped ? "skipped" : "n/a";
      td.title = `${where}: ` + (cell.skipped ? "skipped: " + cell.skipped : "no finite loss");
      return td;
    }
    const learned = !d.reference && c.after_job === d.job_id;
    const rel = typeof cell.relative_change === "number" ? cell.relative_change : null;
    if (learned || typeof cell.change !== "number") {
      td.textContent = cell.loss.toFixed(2);
      if (learned) td.classList.add("learned");
    } else {
      td.textContent = `${cell.loss.toFixed(2)} (${signed(cell.change, 2)})`;
      if (rel !== null && Math.abs(rel) >= RET_NEUTRAL) {
        td.style.backgroundColor = changeColor(rel);
        td.dataset.change = rel < 0 ? "lower" : "higher";
        if (Math.abs(rel) / RET_SAT > 0.55) td.classList.add("hot");
      } else td.dataset.change = "same";
    }
    const since = d.reference ? "since the base model" : `since it was learned (after job ${d.job_id})`;
    td.title = `${where}: loss ${cell.loss.toFixed(4)}` + (learned ? " (learned here)"
      : typeof cell.change === "number" ? `, ${signed(cell.change, 4)}` + (rel !== null ? ` (${pct(rel)})` : "") + ` ${since}` : "")
      + (cell.tokens != null ? ` · ${count(cell.tokens)} tokens` : "");
    return td;
  }
  function retentionNotes(e) {
    const notes = [];
    for (const c of e.columns) {
      if (c.held) {
        const snap = c.held.snapshot ? ` · candidate snapshots/${c.held.snapshot} (trainer-ctl promote ${c.held.snapshot})` : "";
        notes.push(el("li", { className: "held" }, el("span", { className: "mark held", text: "held" }), " ",
          `${columnLabel(c)}: ${c.held.reason}${snap}`));
      }
      if (c.promoted) {
        const rolled = c.promoted.kind === "rolled_back";
        notes.push(el("li", null, el("span", { className: "mark " + (rolled ? "rolled-back" : "promoted"), text: rolled ? "rolled back" : "promoted" }), " ",
          `${columnLabel(c)}: ${rolled ? "rolled back to" : "promoted"}` + (c.promoted.snapshot ? ` snapshots/${c.promoted.snapshot}` : "")
          + (c.promoted.at ? ` at ${when(c.promoted.at)}` : "")));
      }
    }
    const live = e.columns.find((c) => c.current);
    notes.push(el("li", { className: "muted", text: live ? `current_model/ is the adapter ${columnLabel(live)}`
      : e.current_job != null ? `current_model/ is the adapter after job ${e.current_job} (not among the columns shown)`
        : "current_model/ holds no adapter these columns show" }));
    if (e.hidden_columns) notes.push(el("li", { className: "muted", text: `${e.hidden_columns} older adapters not shown` }));
    return notes;
  }
  function renderRetention() {
    const panel = $("retention");
    const e = evalData;
    if (!e || !e.available || !Array.isArray(e.columns) || !e.columns.length) {
      setPanel(panel, "reason", (e && e.reason) || "no retention evaluations yet");
      $("retention-meta").textContent = "";
      return;
    }
    const datasets = Array.isArray(e.datasets) ? e.datasets : [];
    const head = el("tr", null, el("th", { scope: "col", className: "ret-corner", text: "dataset" }), ...e.columns.map(retentionHead));
    const body = el("tbody");
    for (const d of datasets) {
      const byJob = new Map((d.cells || []).map((c) => [c.after_job, c]));
      body.append(el("tr", { dataset: { dataset: String(d.job_id) }, className: d.reference ? "reference" : null },
        el("th", { scope: "row", text: datasetLabel(d), title: datasetLabel(d) + (d.learned_loss != null
          ? (d.reference ? " · base model's loss " : " · loss when learned ") + d.learned_loss.toFixed(4) : "") }),
        ...e.columns.map((c) => retentionCell(d, c, byJob.get(c.after_job)))));
    }
    $("retention-table").replaceChildren(el("thead", null, head), body);
    $("retention-ramp").style.background = `linear-gradient(to right, ${changeColor(-RET_SAT)}, ${changeColor(0)}, ${changeColor(RET_SAT)})`;
    $("retention-notes").replaceChildren(...retentionNotes(e));
    $("retention-meta").textContent = `${datasets.length} datasets × ${e.columns.length} adapters`
      + (e.updated_at ? ` · last evaluation ${when(e.updated_at)}` : "");
    setPanel(panel, "data");
  }
  dark.addEventListener("change", renderRetention);

  // ---- queue ----
  function onQueue(q) {
    queue = q;
    const panel = $("queue");
    const jobs = q.jobs || {};
    const counts = q.counts || {};
    for (const st of ["processing", "pending", "failed", "done"]) $("count-" + st).textContent = String(counts[st] ?? (jobs[st] || []).length);
    $("queue-counts").textContent = Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(" · ");
    setPanel(panel, q.available ? "data" : "reason", q.available ? "" : (q.reason || "queue not available"));
    renderJobs("q-processing", jobs.processing || [], processingItem, "nothing is training");
    renderJobs("q-pending", jobs.pending || [], pendingItem, "no pending jobs: drop a .jsonl file above or into inbox/");
    renderJobs("q-failed", jobs.failed || [], failedItem, "no failed jobs");
    const done = (jobs.done || []).slice(0, DONE_SHOWN);
    renderJobs("q-done", done, doneItem, "nothing trained yet");
    const more = (counts.done || 0) - done.length;
    if (more > 0) $("q-done").append(el("li", { className: "empty", text: `${more} older finished jobs not shown` }));
  }
  function renderJobs(id, jobs, item, empty) {
    const ul = $(id);
    ul.replaceChildren(...(jobs.length ? jobs.map(item) : [el("li", { className: "empty", text: empty })]));
  }
  function jobHead(j) {
    const head = el("div", { className: "job-name", text: j.name, title: j.original_name && j.original_name !== j.name ? "uploaded as: " + j.original_name : j.name });
    const sub = [];
    if (j.original_name && j.original_name !== j.name) sub.push("from " + j.original_name);
    if (j.records != null) sub.push(`${nf.format(j.records)} records`);
    if (j.format) sub.push(j.format);
    if (j.size != null) sub.push(bytes(j.size));
    return [head, el("div", { className: "job-sub", text: sub.join(" · ") }), dataReport(j.data_report)];
  }
  // ---- a job's data report (from the worker's "started" event; every value is data: text only) ----
  const isNum = (v) => typeof v === "number" && isFinite(v);
  const count = (v) => (isNum(v) ? nf.format(v) : String(v));
  function compact(v) {
    if (!isNum(v)) return String(v);
    const a = Math.abs(v);
    for (const [f, u] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
      if (a >= f) return (a >= 100 * f ? (v / f).toFixed(0) : (v / f).toFixed(1).replace(/\.0$/, "")) + u;
    }
    return nf.format(v);
  }
  function plural(n, one) {
    return `${count(n)} ${n === 1 ? one : one + "s"}`;
  }
  function reasonText(name, r) {
    if (r === null || typeof r !== "object" || Array.isArray(r)) return `${name}: ${typeof r === "object" ? JSON.stringify(r) : String(r)}`;
    let t = r.count != null ? `${name}: ${plural(r.count, "record")}` : `${name}:`;
    const notes = [];
    if (r.tokens_cut != null) notes.push(`${count(r.tokens_cut)} tokens cut`);
    for (const [k, v] of Object.entries(r)) {
      if (!["count", "lines", "tokens_cut", "message"].includes(k)) notes.push(`${k.replace(/_/g, " ")} ${typeof v === "object" ? JSON.stringify(v) : count(v)}`);
    }
    if (notes.length) t += ` (${notes.join(", ")})`;
    const lines = Array.isArray(r.lines) ? r.lines : [];
    if (lines.length) {
      const more = isNum(r.count) && r.count > lines.length;
      t += `, ${lines.length === 1 && !more ? "line" : "lines"} ${lines.map(String).join(", ")}${more ? ", …" : ""}`;
    }
    if (r.message != null && r.message !== "") t += ` — ${String(r.message)}`;
    return t;
  }
  function dataReport(r) {
    if (!r || typeof r !== "object" || Array.isArray(r)) return null;
    // "1,000 records → 1,010 examples, 491k tokens (250k trained)"
    let line = "";
    if (r.records != null) line += plural(r.records, "record");
    if (r.examples != null) line += (line ? " → " : "") + plural(r.examples, "example");
    if (r.tokens != null) {
      line += (line ? ", " : "") + `${compact(r.tokens)} tokens`;
      if (r.trained_tokens != null) line += ` (${compact(r.trained_tokens)} trained)`;
    } else if (r.trained_tokens != null) line += (line ? ", " : "") + `${compact(r.trained_tokens)} trained tokens`;
    const how = ["format", "truncation", "max_length"].filter((k) => r[k] != null).map((k) => `${k.replace(/_/g, " ")} ${String(r[k])}`);
    const box = el("div", { className: "data-report", title: how.length ? "data report: " + how.join(", ") : "data report" },
      el("div", { className: "dr-summary", text: line || "data report" }));
    const reasons = r.reasons && typeof r.reasons === "object" && !Array.isArray(r.reasons) ? Object.entries(r.reasons) : [];
    if (reasons.length) {
      box.append(el("ul", { className: "dr-reasons" },
        ...reasons.map(([name, v]) => el("li", { dataset: { reason: name }, text: reasonText(name, v) }))));
    }
    return box;
  }
  function processingItem(j) {
    const extra = [];
    if (status && status.current_file === j.name && status.total_steps) extra.push(`step ${status.current_step ?? 0} / ${status.total_steps}`);
    extra.push(`attempt ${j.attempts}`);
    if (j.started_at) extra.push("started " + when(j.started_at));
    return el("li", { dataset: { job: j.name } }, ...jobHead(j), el("div", { className: "job-sub", text: extra.join(" · ") }));
  }
  function pendingItem(j) {
    const sel = el("select", { "aria-label": "priority of " + j.name },
      ...["high", "normal", "low"].map((p) => el("option", { value: p, text: p })));
    sel.value = j.priority;
    sel.addEventListener("change", async () => {
      const r = await api("POST", `api/queue/${encodeURIComponent(j.name)}/priority`, { level: sel.value });
      toast(detailOf(r.data), r.ok ? "ok" : "bad");
      if (!r.ok) sel.value = j.priority;
    });
    const rm = el("button", { type: "button", className: "small danger", text: "Remove" });
    rm.addEventListener("click", async () => {
      rm.disabled = true;
      const r = await api("DELETE", `api/queue/${encodeURIComponent(j.name)}`);
      toast(detailOf(r.data), r.ok ? "ok" : "bad");
      rm.disabled = false;
    });
    return el("li", { dataset: { job: j.name } }, ...jobHead(j),
      el("div", { className: "job-actions" }, el("span", { className: "job-sub", text: `#${j.position ?? "?"}` + (j.resume ? " · resumes" : "") }),
        el("label", { className: "job-sub" }, "priority ", sel), rm));
  }
  function failedItem(j) {
    const retry = el("button", { type: "button", className: "small", text: "Retry" });
    retry.addEventListener("click", async () => {
      retry.disabled = true;
      const dup = (j.error || "").startsWith("duplicate");
      const r = await api("POST", `api/queue/${encodeURIComponent(j.name)}/retry`, { force: dup });
      toast(detailOf(r.data), r.ok ? "ok" : "bad");
      retry.disabled = false;
    });
    return el("li", { dataset: { job: j.name } }, ...jobHead(j),
      el("div", { className: "job-error", text: j.error || "failed (no reason recorded)" }),
      el("div", { className: "job-actions" }, el("span", { className: "job-sub", text: `attempts ${j.attempts}` + (j.finished_at ? " · " + when(j.finished_at) : "") }), retry));
  }
  function doneItem(j) {
    return el("li", { dataset: { job: j.name } }, ...jobHead(j),
      el("div", { className: "job-sub", text: (j.steps != null ? `${j.steps} steps · ` : "") + "finished " + when(j.finished_at || j.updated_at) }));
  }

  // ---- upload ----
  async function upload(files) {
    const pr = $("upload-priority").value;
    for (const f of files) {
      const li = el("li", { text: `${f.name}: uploading…` });
      $("upload-results").prepend(li);
      const r = await api("POST", `api/queue?name=${encodeURIComponent(f.name)}&priority=${encodeURIComponent(pr)}`, f,
        { "Content-Type": "application/x-ndjson" });
      li.textContent = `${f.name}: ${detailOf(r.data) || r.status}`;
      li.className = r.ok ? "ok" : "bad";
    }
    while ($("upload-results").children.length > 8) $("upload-results").lastChild.remove();
  }
  function setupUpload() {
    const dz = $("dropzone");
    const stop = (e) => { e.preventDefault(); e.stopPropagation(); };
    ["dragenter", "dragover"].forEach((t) => dz.addEventListener(t, (e) => { stop(e); dz.classList.add("over"); }));
    ["dragleave", "drop"].forEach((t) => dz.addEventListener(t, (e) => { stop(e); dz.classList.remove("over"); }));
    dz.addEventListener("drop", (e) => { if (e.dataTransfer && e.dataTransfer.files.length) upload([...e.dataTransfer.files]); });
    // a file dropped elsewhere on the page must not navigate away
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());
    $("file-input").addEventListener("change", (e) => { upload([...e.target.files]); e.target.value = ""; });
  }

  // ---- samples: the probe prompts' answers over time (GET /api/samples; every value is data: text only) ----
  // words of b that are not in the longest common subsequence of the words of a and b (a small word diff)
  function changedWords(a, b) {
    const wa = a.split(/\s+/).filter(Boolean), wb = b.split(/\s+/).filter(Boolean);
    const changed = new Set();
    if (wa.length * wb.length > 250000) { wb.forEach((_, i) => changed.add(i)); return changed; }
    const n = wa.length, m = wb.length;
    const L = Array.from({ length: n + 1 }, () => new Uint16Array(m + 1));
    for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--) {
      L[i][j] = wa[i] === wb[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
    }
    let i = 0, j = 0;
    while (j < m) {
      if (i < n && wa[i] === wb[j]) { i++; j++; }
      else if (i < n && L[i + 1][j] >= L[i][j + 1]) i++;
      else { changed.add(j); j++; }
    }
    return changed;
  }
  // an answer as text nodes, the words changed since *prev* (when given) in <mark>
  function answerNode(text, prev) {
    if (!/\S/.test(text)) {
      return el("div", { className: "answer empty", text: text.length ? `(only whitespace: ${text.length} characters)` : "(empty: the model stopped at once)" });
    }
    const box = el("div", { className: "answer" });
    const changed = prev === undefined ? null : changedWords(prev, text);
    let w = 0;
    for (const part of text.split(/(\s+)/)) {
      if (!part) continue;
      if (/^\s+$/.test(part) || !changed || !changed.has(w)) box.append(part);
      else box.append(el("mark", { text: part }));
      if (!/^\s+$/.test(part)) w++;
    }
    return box;
  }
  function answerLabel(a) {
    const where = a.phase === "base" ? "base model" : a.phase === "end" ? `after the job (step ${a.step})` : `step ${a.step}`;
    return [where, a.dataset ? String(a.dataset) : (a.job_id != null ? `job ${a.job_id}` : null), when(a.at)].filter(Boolean).join(" · ");
  }
  function sampleItem(p) {
    const answers = Array.isArray(p.answers) ? p.answers : [];
    const list = el("ol", { className: "answers" });
    answers.forEach((a, i) => {
      const newest = i === answers.length - 1;
      const prev = newest && i > 0 ? String(answers[i - 1].answer ?? "") : undefined;
      list.append(el("li", { className: newest ? "newest" : "", dataset: { phase: String(a.phase || "") } },
        el("div", { className: "answer-meta", text: answerLabel(a) + (newest && i > 0 ? " · newest, changes marked" : "") }),
        answerNode(String(a.answer ?? ""), prev)));
      if (i === 0 && p.omitted > 0) list.append(el("li", { className: "more", text: `${nf.format(p.omitted)} answers between these not shown` }));
    });
    return el("li", { className: "sample" },
      el("div", { className: "sample-prompt", text: String(p.prompt ?? "") }),
      el("span", { className: "sample-source", text: p.source === "config" ? "probe_prompts" : "retention set of " + String(p.source ?? "?") }),
      p.reference != null ? el("div", { className: "sample-ref" }, el("b", { text: "reference: " }), String(p.reference)) : null,
      list);
  }
  let samplesSeq = 0;
  let samplesTimer = null;
  async function loadSamples() {
    const seq = ++samplesSeq;
    const r = await api("GET", "api/samples");
    if (seq !== samplesSeq) return;            // a newer load answered already
    const panel = $("samples");
    if (!r.ok || !r.data || !Array.isArray(r.data.prompts)) {
      setPanel(panel, "reason", "samples unavailable: " + (detailOf(r.data) || `HTTP ${r.status}`));
      return;
    }
    const d = r.data;
    const ol = $("samples-list");
    const scroll = [...ol.querySelectorAll("ol.answers")].map((x) => x.scrollTop + x.clientHeight >= x.scrollHeight - 8);
    ol.replaceChildren(...d.prompts.map(sampleItem));
    ol.querySelectorAll("ol.answers").forEach((x, i) => { if (scroll[i] !== false) x.scrollTop = x.scrollHeight; });
    const n = d.prompts.reduce((acc, p) => acc + (p.total || 0), 0);
    $("samples-meta").textContent = d.prompts.length ? `${d.prompts.length} prompts · ${nf.format(n)} answers` : "";
    setPanel(panel, d.available && d.prompts.length ? "data" : "reason", d.reason || "no samples yet");
  }
  function scheduleSamples() {
    if (!samplesTimer) samplesTimer = setTimeout(() => { samplesTimer = null; loadSamples(); }, 300);
  }

  // ---- events and logs ----
  function onEvents(msg) {
    const ul = $("events");
    const panel = ul.closest("[data-panel]");
    if (msg.reset) ul.replaceChildren();
    if (!msg.available && msg.reset) { setPanel(panel, "reason", msg.reason || "no events"); return; }
    for (const ev of msg.events || []) {
      if (ev.kind === "probe") scheduleSamples();        // new probe answers: the Samples panel reloads
      lastEventId = Math.max(lastEventId, ev.id || 0);
      ul.prepend(el("li", { className: "ev-" + (ev.level || "info") },
        el("span", { className: "ev-time", text: when(ev.ts) }), el("span", { className: "ev-kind", text: ev.kind }), ev.message));
    }
    while (ul.children.length > MAX_EVENTS) ul.lastChild.remove();
    if (ul.children.length) setPanel(panel, "data");
    else setPanel(panel, "reason", "no events yet: jobs accepted, started, finished and failed show here");
  }
  function onLogs(msg) {
    const key = msg.file === "training" ? "training" : "daemon";
    const pre = $("log-" + key);
    const panel = pre.closest("[data-panel]");
    $(`log-${key}-name`).textContent = msg.name ? "(" + msg.name + ")" : "";
    const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 8;
    let lines = msg.reset ? [] : (pre.textContent ? pre.textContent.split("\n") : []);
    lines = lines.concat(msg.lines || []).slice(-MAX_LOG_LINES);
    pre.textContent = lines.join("\n");
    if (stick || msg.reset) pre.scrollTop = pre.scrollHeight;
    if (lines.length) setPanel(panel, "data");
    else setPanel(panel, "reason", key === "daemon"
      ? (msg.name ? "the daemon log is empty so far" : "no daemon log yet: logs/daemon_YYYYMMDD.log appears when the daemon starts")
      : (msg.name ? "no training output yet" : "no training output yet: logs/training_output.log appears when the trainer writes to it"));
  }

  // ---- live updates: SSE, with polling as the fallback ----
  let es = null;
  let pollMode = false;
  let pollTimer = null;
  let fallbackTimer = null;
  function setConn(state, text) {
    const c = $("conn");
    c.dataset.conn = state;
    c.textContent = text;
  }
  const handlers = {
    status: onStatus, metrics: onMetrics, queue: onQueue, events: onEvents, layers: onLayers,
    system: onSystem, system_history: onSystemHistory, logs: onLogs,
    eval: onEval,
  };
  function connect() {
    if (es) es.close();
    const url = "api/stream" + (TOKEN ? "?token=" + encodeURIComponent(TOKEN) : "");
    es = new EventSource(url);
    for (const [name, fn] of Object.entries(handlers)) {
      es.addEventListener(name, (e) => {
        let data;
        try { data = JSON.parse(e.data); } catch (err) { return; }
        try { fn(data); } catch (err) { console.warn("dashboard: could not show", name, err); }
      });
    }
    es.onopen = () => {
      setConn("live", "live");
      scheduleSamples();                         // (re)connected: what changed meanwhile
      clearTimeout(fallbackTimer);
      fallbackTimer = null;
      stopPolling();
    };
    es.onerror = () => {
      setConn("connecting", "reconnecting…");
      if (!fallbackTimer && !pollMode) fallbackTimer = setTimeout(startPolling, 4000);
      if (es.readyState === EventSource.CLOSED) setTimeout(connect, 5000);
    };
  }
  function startPolling() {
    fallbackTimer = null;
    if (es && es.readyState === EventSource.OPEN) return;
    pollMode = true;
    setConn("polling", "stream unavailable: polling");
    pollOnce();
    pollTimer = setInterval(pollOnce, 3000);
  }
  function stopPolling() {
    pollMode = false;
    if (pollTimer) clearInterval(pollTimer);
    pollTimer = null;
  }
  async function pollOnce() {
    const [st, q, m, ev, ly, gpu, mem, logs] = await Promise.all([
      api("GET", "api/status"), api("GET", "api/queue"),
      api("GET", "api/metrics?limit=5000" + (M.seq >= 0 ? "&since_seq=" + M.seq : "")),
      api("GET", "api/events?limit=200&since_id=" + lastEventId), api("GET", "api/layers"),
      api("GET", "api/gpu"), api("GET", "api/memory"), api("GET", "api/logs?lines=200")]);
    if (st.status === 401) { setConn("down", "unauthorised: open the page as /?token=TOKEN"); return; }
    if (!st.ok) { setConn("down", "monitor unreachable"); return; }
    onStatus(st.data);
    if (q.ok) onQueue(q.data);
    if (m.ok) onMetrics({ reset: M.seq < 0, records: m.data.records, total: m.data.total });
    if (ev.ok) onEvents({ reset: lastEventId === 0, ...ev.data });
    if (ly.ok) onLayers(ly.data);
    if (gpu.ok && mem.ok) onSystem({ time: Date.now() / 1000, gpu: gpu.data, memory: mem.data });
    if (logs.ok) for (const k of ["daemon", "training"]) onLogs({ file: k, name: logs.data[k].file, lines: logs.data[k].lines, reset: true });
    const ret = await api("GET", "api/eval");
    if (ret.ok) onEval(ret.data);
  }

  // ---- start ----
  function start() {
    for (const b of document.querySelectorAll(".controls button")) b.addEventListener("click", () => control(b.dataset.command));
    $("heat-metric").addEventListener("change", renderLayers);
    setupUpload();
    loadSamples();
    dark.addEventListener("change", () => {       // rebuild charts in the new colours
      for (const id of Object.keys(charts)) { if (charts[id].u) charts[id].u.destroy(); delete charts[id]; }
      for (const id of ["box-loss", "box-lr", "box-tps"]) $(id).dataset.state = "loading";
      updateMetricReasons();
      renderSystem(true);
      renderLayers();
    });
    if (typeof uPlot !== "function") toast("chart library failed to load: charts are off", "bad");
    connect();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
