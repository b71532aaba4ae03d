// igtv-node dashboard: plain JavaScript over the node's JSON API (/api/...).
// The bearer token, when the node needs one, is kept in sessionStorage for this tab only.
// Every value from the API is inserted with textContent (never as HTML).
"use strict";

const REFRESH_MS = 3000;
const state = { token: sessionStorage.getItem("igtv-token") || "", selected: null, previewUrl: null,
                previewJob: null, previewKey: null, timer: null };

function $(id) { return document.getElementById(id); }

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function fmt(value, digits) {
  if (value === null || value === undefined) return "–";
  return typeof value === "number" ? value.toFixed(digits === undefined ? 1 : digits) : String(value);
}

function when(epoch) {
  return epoch ? new Date(epoch * 1000).toLocaleString() : "–";
}

function shortUid(uid) {
  return uid && uid.length > 24 ? "…" + uid.slice(-20) : uid;
}

function stateBadge(value) {
  return el("span", value || "–", "state state-" + (value || "none"));
}

class AuthError extends Error {}

async function api(path, options) {
  const opts = options || {};
  const headers = Object.assign({}, opts.headers || {});
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  const response = await fetch(path, Object.assign({}, opts, { headers: headers }));
  if (response.status === 401) throw new AuthError("token required or wrong");
  return response;
}

async function apiJson(path, options) {
  const response = await api(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || ("HTTP " + response.status));
  return body;
}

function showLogin(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  if (state.timer) { clearInterval(state.timer); state.timer = null; }
}

function renderCounts(summary) {
  const box = $("counts");
  box.replaceChildren();
  for (const [name, count] of Object.entries(summary.jobs_by_state)) {
    box.appendChild(el("span", name + " " + count, "state state-" + name));
  }
  $("node-name").textContent = summary.node;
  document.title = "igtv-node " + summary.node;
}

function renderStudies(studies) {
  const body = $("studies").tBodies[0];
  body.replaceChildren();
  $("studies-empty").hidden = studies.length > 0;
  for (const s of studies) {
    const row = document.createElement("tr");
    row.dataset.study = s.study_uid;
    row.appendChild(el("td", s.patient || "–", "uid"));
    row.appendChild(el("td", s.study_date || "–"));
    row.appendChild(el("td", s.modalities.join(", ")));
    row.appendChild(el("td", s.instances));
    row.appendChild(el("td", when(s.last_received)));
    const st = el("td"); st.appendChild(stateBadge(s.state));
    if (s.reason) st.appendChild(el("div", s.reason, "muted"));
    row.appendChild(st);
    const job = el("td");
    if (s.latest_job) {
      job.appendChild(el("span", "#" + s.latest_job.id + " "));
      job.appendChild(stateBadge(s.latest_job.state));
      row.addEventListener("click", () => selectJob(s.latest_job.id));
    } else {
      job.textContent = "–";
    }
    row.appendChild(job);
    body.appendChild(row);
  }
}

function renderJobs(jobs) {
  const body = $("jobs").tBodies[0];
  body.replaceChildren();
  $("jobs-empty").hidden = jobs.length > 0;
  for (const j of jobs) {
    const row = document.createElement("tr");
    row.dataset.job = String(j.id);
    if (j.id === state.selected) row.classList.add("selected");
    row.appendChild(el("td", "#" + j.id));
    const study = el("td", shortUid(j.study_uid), "uid"); study.title = j.study_uid;
    row.appendChild(study);
    const st = el("td"); st.appendChild(stateBadge(j.state)); row.appendChild(st);
    const pr = el("td", "", "progress"); const bar = document.createElement("progress");
    bar.max = 1; bar.value = j.progress; bar.title = Math.round(j.progress * 100) + " %";
    pr.appendChild(bar);
    if (j.stage) pr.appendChild(el("span", j.stage, "stage"));
    row.appendChild(pr);
    row.appendChild(el("td", j.elapsed_s === null ? "–" : fmt(j.elapsed_s, 1) + " s"));
    row.appendChild(el("td", fmt(j.numbers.igtv_volume_cc, 2)));
    row.appendChild(el("td", fmt(j.numbers.suv_max, 2)));
    row.appendChild(el("td", fmt(j.numbers.si_extent_mm, 1)));
    row.appendChild(el("td", j.reason || "", j.state === "failed" ? "error" : "muted"));
    row.addEventListener("click", () => selectJob(j.id));
    body.appendChild(row);
  }
}

function fillList(target, pairs) {
  target.replaceChildren();
  for (const [name, value] of pairs) {
    target.appendChild(el("dt", name));
    target.appendChild(el("dd", value));
  }
}

async function loadPreview(job) {
  const img = $("preview");
  const key = job.id + ":" + job.finished;
  if (state.previewKey === key) return;
  state.previewKey = key;
  if (state.previewUrl) { URL.revokeObjectURL(state.previewUrl); state.previewUrl = null; }
  img.removeAttribute("src");
  img.dataset.loaded = "";
  if (!job.has_preview) {
    $("preview-caption").textContent = "No preview (yet) for this job.";
    return;
  }
  const response = await api("/api/jobs/" + job.id + "/preview.png");
  if (!response.ok) { $("preview-caption").textContent = "Preview unavailable."; return; }
  state.previewUrl = URL.createObjectURL(await response.blob());
  img.onload = () => { img.dataset.loaded = "1"; };
  img.src = state.previewUrl;
  $("preview-caption").textContent = "CT with PET overlay and the IGTV contour (job #" + job.id + ").";
}

async function renderDetail() {
  if (state.selected === null) return;
  const job = await apiJson("/api/jobs/" + state.selected);
  $("detail").hidden = false;
  $("detail-id").textContent = "#" + job.id;
  $("detail-state").replaceChildren(stateBadge(job.state));
  const n = job.numbers;
  fillList($("numbers"), [
    ["Study", job.study_uid],
    ["IGTV volume", fmt(n.igtv_volume_cc, 2) + " cc"],
    ["SUVmax", fmt(n.suv_max, 2)],
    ["SI motion extent", fmt(n.si_extent_mm, 1) + " mm"],
    ["Lesions", fmt(n.lesions, 0)],
    ["Attempts", String(job.attempts)],
    ["Started", when(job.started)],
    ["Finished", when(job.finished)],
    ["Reason", job.reason || "–"],
  ]);
  fillList($("timings"), Object.entries(job.timings).map(([k, v]) => [k, fmt(v, 2)]));
  const exports = $("exports");
  exports.replaceChildren();
  for (const e of job.exports) {
    const item = el("li", e.destination + ": " + e.state + " (" + e.attempts + " attempt(s))");
    if (e.reason) item.appendChild(el("div", e.reason, e.state === "failed" ? "error" : "muted"));
    exports.appendChild(item);
  }
  if (job.exports.length === 0) exports.appendChild(el("li", "none", "muted"));
  $("rerun").disabled = job.state === "queued" || job.state === "running";
  $("resend").disabled = !(job.state === "done" || job.state === "failed") || job.result_uids.length === 0;
  await loadPreview(job);
}

function renderAudit(events) {
  const list = $("audit");
  list.replaceChildren();
  for (const e of events) {
    const rest = Object.assign({}, e); delete rest.ts; delete rest.event;
    list.appendChild(el("li", e.ts + " " + e.event + " " + JSON.stringify(rest)));
  }
}

async function refresh() {
  try {
    const summary = await apiJson("/api/summary");
    $("login").hidden = true;
    $("main").hidden = false;
    renderCounts(summary);
    renderStudies((await apiJson("/api/studies")).studies);
    renderJobs((await apiJson("/api/jobs?limit=100")).jobs);
    await renderDetail();
    if (summary.audit) {
      $("audit-section").hidden = false;
      renderAudit((await apiJson("/api/audit?limit=50")).events);
    }
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.ready = "1";
  } catch (err) {
    if (err instanceof AuthError) { showLogin(state.token ? "The token was not accepted." : ""); return; }
    $("status").textContent = "error: " + err.message;
  }
}

async function selectJob(id) {
  state.selected = id;
  for (const row of $("jobs").tBodies[0].rows) row.classList.toggle("selected", row.dataset.job === String(id));
  $("action-result").textContent = "";
  await renderDetail();
}

async function action(kind) {
  const id = state.selected;
  const out = $("action-result");
  try {
    const result = await apiJson("/api/jobs/" + id + "/" + kind, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
    });
    if (kind === "rerun") {
      out.textContent = "Queued as job #" + result.job_id + ".";
      state.selected = result.job_id;
    } else {
      out.textContent = "Results queued for " + result.destinations.join(", ") + ".";
    }
    await refresh();
  } catch (err) {
    out.textContent = "Failed: " + err.message;
  }
}

function start() {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("igtv-token", state.token);
    refresh().then(() => { if (!state.timer && !$("main").hidden) state.timer = setInterval(refresh, REFRESH_MS); });
  });
  $("rerun").addEventListener("click", () => action("rerun"));
  $("resend").addEventListener("click", () => action("resend"));
  refresh().then(() => { if (!$("main").hidden) state.timer = setInterval(refresh, REFRESH_MS); });
}

document.addEventListener("DOMContentLoaded", start);
