// The mqota dashboard. It follows `mqota serve` live through Server-Sent
// Events (/api/events: a snapshot, then numbered changes); while that stream
// keeps failing it polls /api/fleet and /api/deployments instead, and it
// closes the stream while the tab is hidden.
//
// Every piece of data reaches the DOM through textContent or an attribute
// set by property, never as markup: device ids, versions and error texts
// come from devices and files nobody vetted.
"use strict";

const $ = (id) => document.getElementById(id);

// Characters that would make text lie about itself on screen: bidi
// overrides and isolates (which reorder what follows, so "gnp.exe" reads as
// "exe.png") and other control characters. They are shown as escapes, the
// way `mqota status` prints them in a terminal.
const HIDDEN = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

// `x` as text that shows every character it holds.
function plain(x) {
  return String(x).replace(HIDDEN, (c) => "\\u{" + c.codePointAt(0).toString(16) + "}");
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = plain(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c);
    else if (c !== undefined && c !== null) td.textContent = plain(c);
    tr.appendChild(td);
  }
  return tr;
}

// Who is logged in, as GET /api/session says: {login_required, user, role, csrf}.
let session = { login_required: false, user: null, role: null, csrf: null };

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (r.status === 401) showLogin("your session has ended: log in again");
  if (!r.ok) throw new Error(url + ": HTTP " + r.status);
  return r.json();
}

// A state-changing request: it carries the session's CSRF token, which
// serve wants besides the cookie (a page elsewhere cannot read it).
function send(url, options) {
  const headers = Object.assign({}, options.headers || {});
  if (session.csrf) headers["x-mqota-csrf"] = session.csrf;
  return fetch(url, Object.assign({}, options, { headers }));
}

// Device id -> the device as /api/fleet lists it.
const devices = new Map();
// The deployments as /api/deployments lists them.
let deploymentList = [];
// Device id -> its latest progress event (for the deployments' tables).
let progressOf = new Map();

const GOOD = new Set(["done", "succeeded", "reverted"]);
const BAD = new Set(["failed", "rolled_back", "cancelled", "timed_out", "revert_failed"]);
const TERMINAL = new Set(["done", "failed", "rolled_back", "cancelled"]);

// Phases and error codes in words.
const PHASE_WORDS = {
  accepted: "accepted", downloading: "downloading", verifying: "verifying",
  rebooting: "rebooting", confirming: "confirming", done: "updated",
  failed: "failed", rolled_back: "rolled back", cancelled: "cancelled",
};
// Why a device last started, as its status says (`boot_reason`).
const BOOT_WORDS = {
  power_on: "power on",
  software_reset: "software reset (an update or a rollback)",
  watchdog: "watchdog reset",
  panic: "panic",
  brownout: "brownout (the supply dropped)",
  deep_sleep: "wake from deep sleep",
  unknown: "unknown reason",
};

const ERROR_WORDS = {
  bad_command: "the command was malformed",
  busy: "busy with another update",
  http_status: "the firmware server refused the download",
  network: "the network failed during the download",
  timeout: "timed out",
  too_large: "the image does not fit the OTA slot",
  size_mismatch: "the download had the wrong size",
  bad_image: "not a valid firmware image",
  wrong_chip: "the image is for another chip",
  hash_mismatch: "the image's SHA-256 did not match",
  flash: "writing the flash failed",
  health_check_failed: "the new firmware failed its health check; rolled back",
  boot_failed: "the new firmware did not boot; rolled back",
  cancelled: "cancelled on request",
  no_previous_image: "no previous image to roll back to",
  duplicate_job: "this job already ran on the device",
  bad_signature: "the image signature is not valid",
  downgrade: "refused: older than the running version",
};
const words = (map, code) => (code in map ? map[code] : String(code).replace(/_/g, " "));

function stateSpan(name) {
  const cls = GOOD.has(name) ? "good" : BAD.has(name) ? "bad" : name === "running" || name === "sent" ? "running" : "";
  return el("span", name, cls);
}

function percentCell(p) {
  if (!p) return null;
  const bar = el("progress");
  bar.max = 100;
  bar.value = p.percent;
  bar.title = p.percent + "%";
  const span = el("span");
  span.appendChild(bar);
  span.appendChild(document.createTextNode(" " + p.percent + "%"));
  return span;
}

function phaseCell(p) {
  if (!p) return null;
  const s = stateSpan(p.phase);
  if (p.error) s.textContent += " (" + p.error + ")";
  return s;
}

// --- the fleet table -------------------------------------------------------

// Device id -> the version a running deployment is taking it to.
let targetOf = new Map();

function updating(d) {
  return !!(d.in_flight && d.progress && !TERMINAL.has(d.progress.phase));
}

// One device as the table shows it, with sort keys.
function viewOf(d) {
  const s = d.status || {};
  const last = s.last || null;
  const failed = !!(last && BAD.has(last.result));
  return {
    d,
    id: d.id,
    online: d.online ? "online" : "offline",
    chip: s.chip || "",
    project: s.project || "",
    version: s.version || "",
    target: targetOf.get(d.id) || "",
    phase: updating(d) ? d.progress.phase : "",
    last: last ? words(PHASE_WORDS, last.result) : "",
    error: last && last.error ? words(ERROR_WORDS, last.error) : (d.progress && d.progress.message && BAD.has(d.progress.phase) ? d.progress.message : ""),
    state: updating(d) ? "updating" : failed ? "failed" : "idle",
  };
}

const ui = { q: "", state: "", online: "", version: "", chip: "", key: "id", dir: "asc", page: 0 };
const PAGE_SIZE = 100;

function matches(v) {
  if (ui.state && v.state !== ui.state) return false;
  if (ui.online && v.online !== ui.online) return false;
  if (ui.version && v.version !== ui.version) return false;
  if (ui.chip && v.chip !== ui.chip) return false;
  if (!ui.q) return true;
  const q = ui.q.toLowerCase();
  return [v.id, v.version, v.target, v.chip, v.project, v.error, v.last, v.online]
    .some((x) => x && x.toLowerCase().includes(q));
}

const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

// Devices the operator ticked, kept across pages, filters and redraws.
const selected = new Set();

function fleetRow(v) {
  const d = v.d;
  const tr = document.createElement("tr");
  tr.dataset.id = d.id;
  const tick = document.createElement("input");
  tick.type = "checkbox";
  tick.checked = selected.has(d.id);
  tick.setAttribute("aria-label", "select " + d.id);
  tick.addEventListener("change", () => {
    if (tick.checked) selected.add(d.id);
    else selected.delete(d.id);
    renderSelection();
  });
  const online = el("span");
  online.appendChild(el("span", d.status ? v.online : "no status", d.status ? (d.online ? "pill good" : "pill bad") : "muted"));
  if (d.status && d.online_since) online.appendChild(el("span", " " + since(d.online_since), "muted since"));
  let phase = null;
  if (v.phase) {
    phase = el("span");
    phase.appendChild(el("span", words(PHASE_WORDS, v.phase) + " ", "running"));
    const bar = el("progress");
    bar.max = 100;
    bar.value = d.progress.percent;
    bar.title = d.progress.percent + "%";
    phase.appendChild(bar);
    phase.appendChild(el("span", " " + d.progress.percent + "%", "muted"));
  }
  const s = d.status || {};
  const last = s.last ? el("span", v.last, BAD.has(s.last.result) ? "bad" : GOOD.has(s.last.result) ? "good" : "") : null;
  const open = el("button", d.id, "link");
  open.type = "button";
  open.title = "details and history of " + d.id;
  open.addEventListener("click", () => openDetail(d.id));
  const cells = [open, online, v.chip, v.project, v.version,
    v.target ? el("span", v.target, "running") : null, phase, last, v.error ? el("span", v.error, "bad") : null,
    s.signed_only ? el("span", "signed only", "pill good") : null, tick];
  cells.forEach((c, i) => {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c);
    else if (c) td.textContent = plain(c);
    if (i === 8) td.className = "err";
    tr.appendChild(td);
  });
  return tr;
}

function fillChoices(select, values) {
  const key = values.join("\u0000");
  if (select.dataset.key === key) return;
  select.dataset.key = key;
  const chosen = select.value;
  select.replaceChildren(el("option", "any"));
  select.firstChild.value = "";
  for (const x of values) {
    const o = el("option", x);
    o.value = x;
    select.appendChild(o);
  }
  select.value = values.includes(chosen) ? chosen : "";
}

function renderFleet() {
  targetOf = new Map();
  for (const dep of deploymentList) {
    if (dep.state !== "running") continue;
    for (const x of dep.devices) if (x.state === "pending" || x.state === "sent") targetOf.set(x.device, dep.version);
  }
  const all = [...devices.values()].map(viewOf);
  fillChoices($("f-version"), [...new Set(all.map((v) => v.version).filter((x) => x))].sort(collator.compare));
  fillChoices($("f-chip"), [...new Set(all.map((v) => v.chip).filter((x) => x))].sort(collator.compare));
  const shown = all.filter(matches);
  const sign = ui.dir === "asc" ? 1 : -1;
  shown.sort((a, b) => sign * collator.compare(a[ui.key], b[ui.key]) || collator.compare(a.id, b.id));
  const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
  ui.page = Math.min(ui.page, pages - 1);
  const from = ui.page * PAGE_SIZE;
  const rows = shown.slice(from, from + PAGE_SIZE).map(fleetRow);
  $("fleet").replaceChildren(...rows);
  shownIds = shown.slice(from, from + PAGE_SIZE).map((v) => v.id);
  renderSelection();
  $("fleet-empty").hidden = all.length > 0;
  $("fleet-count").textContent = shown.length === all.length ? all.length + " devices" : shown.length + " of " + all.length + " devices";
  $("page-info").textContent = shown.length ? "rows " + (from + 1) + "–" + (from + rows.length) + " of " + shown.length + ", page " + (ui.page + 1) + " of " + pages : "no rows";
  $("page-prev").disabled = ui.page === 0;
  $("page-next").disabled = ui.page >= pages - 1;
  const online = all.filter((v) => v.online === "online").length;
  const busy = all.filter((v) => v.state === "updating").length;
  $("summary").textContent = all.length + " devices · " + online + " online · " + busy + " updating";
  for (const b of document.querySelectorAll("#fleet-head button")) {
    if (b.dataset.key === ui.key) b.dataset.dir = ui.dir;
    else delete b.dataset.dir;
  }
}

let pending = false;
function render() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    progressOf = new Map([...devices.values()].map((d) => [d.id, d.progress]));
    renderFleet();
    renderDetail();
    renderDeployments(deploymentList);
  });
}

for (const [id, key] of [["q", "q"], ["f-state", "state"], ["f-online", "online"], ["f-version", "version"], ["f-chip", "chip"]]) {
  const update = (e) => { ui[key] = e.target.value.trim(); ui.page = 0; render(); };
  $(id).addEventListener("input", update);
  $(id).addEventListener("change", update);
}
for (const b of document.querySelectorAll("#fleet-head button")) {
  b.addEventListener("click", () => {
    if (ui.key === b.dataset.key) ui.dir = ui.dir === "asc" ? "desc" : "asc";
    else { ui.key = b.dataset.key; ui.dir = "asc"; }
    render();
  });
}
$("page-prev").addEventListener("click", () => { ui.page = Math.max(0, ui.page - 1); render(); });
$("page-next").addEventListener("click", () => { ui.page++; render(); });

// --- selection and device commands -----------------------------------------

// The ids of the rows on the fleet page as drawn.
let shownIds = [];

function renderSelection() {
  // Devices that left the fleet leave the selection.
  for (const id of selected) if (!devices.has(id)) selected.delete(id);
  const n = selected.size;
  $("selected-count").textContent = n ? n + (n === 1 ? " device selected" : " devices selected") : "none selected";
  for (const b of ["sel-deploy", "sel-rollback", "sel-cancel", "sel-clear"]) $(b).disabled = n === 0;
  const page = $("sel-page");
  page.checked = shownIds.length > 0 && shownIds.every((id) => selected.has(id));
}

$("sel-page").addEventListener("change", () => {
  for (const id of shownIds) {
    if ($("sel-page").checked) selected.add(id);
    else selected.delete(id);
  }
  renderFleet();
});
$("sel-clear").addEventListener("click", () => { selected.clear(); renderFleet(); });
$("sel-deploy").addEventListener("click", () => {
  $("d-targets").value = [...selected].sort(collator.compare).join(",");
  $("d-targets").focus();
  $("d-targets").scrollIntoView({ block: "center" });
});

// POST /api/devices/commands; says what happened in `status`. The devices'
// answers (rolled back, cancelled) arrive on the event stream.
async function deviceCommand(command, ids, status) {
  status.textContent = "sending " + command + " to " + ids.length + (ids.length === 1 ? " device…" : " devices…");
  status.className = "muted";
  try {
    const r = await send("/api/devices/commands", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ command, devices: ids }),
    });
    const j = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(j.error || "HTTP " + r.status);
    status.textContent = command + " sent to " + plain(j.sent.join(", ")) + (command === "rollback" ? (j.sent.length === 1 ? ": it rolls back and reboots" : ": each rolls back and reboots") : "");
    status.className = "good";
  } catch (e) {
    status.textContent = command + " not sent: " + e.message;
    status.className = "bad";
  }
}

$("sel-rollback").addEventListener("click", () => deviceCommand("rollback", [...selected].sort(collator.compare), $("sel-status")));
$("sel-cancel").addEventListener("click", () => deviceCommand("cancel", [...selected].sort(collator.compare), $("sel-status")));
$("detail-rollback").addEventListener("click", () => { if (detailId !== null) deviceCommand("rollback", [detailId], $("detail-command-status")); });
$("detail-cancel").addEventListener("click", () => { if (detailId !== null) deviceCommand("cancel", [detailId], $("detail-command-status")); });

// --- one device: details and history ---------------------------------------

let detailId = null;
let historyAt = 0;

function openDetail(id) {
  if (detailId !== id) $("detail-command-status").textContent = "";
  detailId = id;
  historyAt = 0;
  $("detail").hidden = false;
  renderDetail();
  loadLog(id);
  $("detail").scrollIntoView({ block: "nearest" });
}

$("detail-close").addEventListener("click", () => {
  detailId = null;
  $("detail").hidden = true;
});

function historyLine(h) {
  const x = h.data || {};
  if (h.kind === "status") {
    let t = "version " + x.version + ", " + x.state;
    if (x.last) t += "; last " + words(PHASE_WORDS, x.last.result) + (x.last.error ? ": " + words(ERROR_WORDS, x.last.error) : "");
    // The boot trail: each status a device publishes after a boot says why.
    if (x.boot_reason) t += "; booted: " + words(BOOT_WORDS, x.boot_reason);
    return t;
  }
  let t = words(PHASE_WORDS, x.phase);
  if (x.percent) t += " " + x.percent + "%";
  if (x.error) t += ": " + words(ERROR_WORDS, x.error);
  if (x.message) t += " (" + x.message + ")";
  return t;
}

async function loadHistory(id) {
  try {
    const list = await getJSON("/api/devices/" + encodeURIComponent(id) + "/history");
    if (id !== detailId) return;
    const rows = list.slice().reverse().map((h) => {
      const job = h.data && (h.data.job || (h.data.last && h.data.last.job));
      return row([when(h.at), h.kind, historyLine(h), job ? el("code", job, "muted") : null]);
    });
    $("detail-history").replaceChildren(...rows);
    $("detail-empty").hidden = list.length > 0;
  } catch (e) {
    $("detail-empty").textContent = "cannot read the history: " + e.message;
    $("detail-empty").hidden = false;
  }
}

// Reads the device's log over MQTT (through serve): it takes a moment, and
// fails with serve's reason when the device is offline or silent.
async function loadLog(id) {
  const status = $("detail-log-status");
  status.textContent = "reading the log from the device…";
  status.className = "muted";
  $("detail-log").replaceChildren();
  try {
    const r = await fetch("/api/devices/" + encodeURIComponent(id) + "/log", { cache: "no-store" });
    const j = await r.json().catch(() => ({}));
    if (id !== detailId) return;
    if (!r.ok) throw new Error(j.error || "HTTP " + r.status);
    $("detail-log").replaceChildren(...j.records.slice().reverse().map((x) => {
      const tr = row([x.n, x.boot, (x.ms / 1000).toFixed(3) + " s", x.level, x.msg]);
      if (x.level === "error") tr.cells[3].className = "bad";
      else if (x.level === "warn") tr.cells[3].className = "running";
      return tr;
    }));
    status.textContent = j.records.length ? j.records.length + " records, newest first" + (j.lost_chunks ? " (" + j.lost_chunks + " chunks lost)" : "") : "the log is empty";
    status.className = "muted";
  } catch (e) {
    if (id !== detailId) return;
    status.textContent = "cannot read the log: " + e.message;
    status.className = "bad";
  }
}

$("detail-log-read").addEventListener("click", () => { if (detailId !== null) loadLog(detailId); });

function renderDetail() {
  if (detailId === null) return;
  const d = devices.get(detailId);
  $("detail-title").textContent = "Device " + plain(detailId);
  const s = (d && d.status) || {};
  const p = d && d.progress;
  const fields = [
    ["online", d ? (d.online ? "online" : "offline") + (d.online_since ? " " + since(d.online_since) : "") : "not in the fleet now"],
    ["chip", s.chip], ["project", s.project], ["version", s.version],
    ["slot", s.slot !== undefined && s.slot !== null ? "ota_" + s.slot : s.version ? "factory" : null],
    ["state", s.state], ["https", s.https === undefined ? null : s.https ? "yes" : "no"],
    ["last boot", s.boot_reason ? words(BOOT_WORDS, s.boot_reason) : null],
    ["installs", s.signed_only === undefined ? null : s.signed_only ? "signed images only" : "any valid image"],
    ["secure version", s.secure_version],
    ["last job sequence", s.job_seq],
    ["updating to", targetOf.get(detailId)],
    ["job in flight", d && d.in_flight],
    ["latest progress", p ? historyLine({ kind: "progress", data: p }) : null],
  ];
  const dl = $("detail-fields");
  dl.replaceChildren();
  for (const [k, v] of fields) {
    if (v === undefined || v === null || v === "") continue;
    dl.appendChild(el("dt", k));
    dl.appendChild(el("dd", v));
  }
  // The history grows with every status and ending: read it again at most
  // once a second while the device is open.
  const now = Date.now();
  if (now - historyAt > 1000) {
    historyAt = now;
    loadHistory(detailId);
  }
}

function showGaps(gaps) {
  const text = Array.isArray(gaps) ? gaps.join("; ") : gaps || "";
  $("fleet-gaps").textContent = text ? "The fleet may be incomplete: " + text : "";
  $("fleet-gaps").hidden = !text;
}

function setStatus(text, cls) {
  $("status").textContent = text;
  $("status").className = cls;
}

// --- firmware and deployments ---------------------------------------------

let firmwareKey = "";

// Who signed an image: the key digests of the signature blocks that
// verify (whether a device trusts that key is the device's business).
function signersCell(f) {
  if (!f.signers || !f.signers.length) return el("span", "unsigned", "muted");
  const box = el("span", "signed by ", "good");
  f.signers.forEach((k, i) => {
    if (i) box.appendChild(document.createTextNode(", "));
    const c = el("code", k.slice(0, 12));
    c.title = "key digest " + k;
    box.appendChild(c);
  });
  return box;
}

function renderFirmware(list) {
  const body = $("firmware");
  body.replaceChildren();
  for (const f of list) {
    body.appendChild(row([
      el("code", f.name),
      f.chip,
      f.project,
      f.version,
      f.size.toLocaleString() + " B",
      el("code", f.sha256.slice(0, 12), "muted"),
      signersCell(f),
      f.valid ? null : el("span", f.error, "bad"),
      deleteButton(f.name),
    ]));
    body.lastChild.dataset.name = f.name;
  }
  // Rebuild the choices only when they change, so a choice being made
  // survives the refresh.
  const valid = list.filter((f) => f.valid);
  const key = JSON.stringify(valid.map((f) => [f.name, f.version]));
  if (key === firmwareKey) return;
  firmwareKey = key;
  const sel = $("d-firmware");
  const chosen = sel.value;
  sel.replaceChildren();
  for (const f of valid) {
    const o = el("option", f.name + " (" + f.chip + " " + f.project + " " + f.version + ")");
    o.value = f.name;
    sel.appendChild(o);
  }
  if (valid.some((f) => f.name === chosen)) sel.value = chosen;
}

function deleteButton(name) {
  const b = el("button", "delete");
  b.type = "button";
  b.setAttribute("aria-label", "delete " + name);
  b.addEventListener("click", async () => {
    const out = $("firmware-result");
    try {
      const r = await send("/api/firmware/" + encodeURIComponent(name), { method: "DELETE" });
      const j = await r.json();
      if (!r.ok) throw new Error(j.error || "HTTP " + r.status);
      out.textContent = "deleted " + name;
      out.className = "good";
    } catch (e) {
      out.textContent = "cannot delete " + name + ": " + e.message;
      out.className = "bad";
    }
    loadFirmware();
  });
  return b;
}

// Sends a file to the catalogue; serve checks that it is an app image.
async function upload(file) {
  const out = $("upload-result");
  out.textContent = "checking " + file.name + "…";
  out.className = "muted";
  try {
    const r = await send("/api/firmware/" + encodeURIComponent(file.name), {
      method: "POST",
      headers: { "Content-Type": "application/octet-stream" },
      body: file,
    });
    const j = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(j.error || "HTTP " + r.status);
    out.textContent = plain("added " + j.name + " (" + j.chip + " " + j.project + " " + j.version + ")");
    out.className = "good";
    loadFirmware();
  } catch (e) {
    out.textContent = plain("refused " + file.name + ": " + e.message);
    out.className = "bad";
  }
}

$("upload-file").addEventListener("change", (e) => {
  const f = e.target.files[0];
  if (f) upload(f);
  e.target.value = "";
});
const drop = $("drop");
for (const kind of ["dragenter", "dragover"]) {
  drop.addEventListener(kind, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const f = e.dataTransfer && e.dataTransfer.files[0];
  if (f) upload(f);
});
// A file dropped beside the zone must not replace the page.
for (const kind of ["dragover", "drop"]) window.addEventListener(kind, (e) => e.preventDefault());

function when(unix) {
  return new Date(unix * 1000).toLocaleString();
}

// "since 6:42:05 AM" today, "since 12/6/2026, 6:42:05 AM" before.
function since(unix) {
  const t = new Date(unix * 1000);
  return "since " + (t.toDateString() === new Date().toDateString() ? t.toLocaleTimeString() : t.toLocaleString());
}

// The states a deployment's counts always show (with `downloading`: sent,
// and the device says it is downloading this job), then any other state
// that has devices.
const COUNTED = ["pending", "sent", "downloading", "done", "failed", "rolled_back", "timed_out"];
const FINISHED = (state) => state !== "pending" && state !== "sent" && state !== "rollback_sent";

// The live progress of device `x` of deployment `d`, if it is this job's.
function liveOf(d, x) {
  const p = progressOf.get(x.device);
  return (x.state === "sent" || x.state === "rollback_sent") && p && p.job === d.id ? p : null;
}

// Where a device stands for the counts.
function countedState(d, x) {
  const p = liveOf(d, x);
  return x.state === "sent" && p && p.phase === "downloading" ? "downloading" : x.state;
}

function countsOf(d) {
  const counts = Object.fromEntries(COUNTED.map((k) => [k, 0]));
  for (const x of d.devices) {
    const k = countedState(d, x);
    counts[k] = (counts[k] || 0) + 1;
  }
  return counts;
}

// Share of a deployment's work done, 0..1: finished devices count whole,
// devices in flight by their percentage.
function doneShare(d, devices) {
  if (!devices.length) return 0;
  let sum = 0;
  for (const x of devices) {
    if (FINISHED(x.state)) sum += 100;
    else {
      const p = liveOf(d, x);
      if (p) sum += p.percent;
    }
  }
  return sum / (devices.length * 100);
}

function bar(share, label) {
  const b = el("progress");
  b.max = 100;
  b.value = Math.round(share * 100);
  b.setAttribute("aria-label", label);
  b.title = b.value + "%";
  return b;
}

let depId = null;
// What the list and the detail last drew: they are drawn again only when
// it changes, so a button or an open log keeps its focus and state.
let listKey = "";
let depKey = "";
// Devices whose log records are unfolded in the deployment's detail.
const unfolded = new Set();

function renderDeployments(list) {
  const key = JSON.stringify(list.map((d) => [d.id, d.state, d.firmware, d.version, d.created_at, countsOf(d), doneShare(d, d.devices)]));
  if (key !== listKey) {
    listKey = key;
    drawDeploymentList(list);
  }
  renderDeployment();
}

function drawDeploymentList(list) {
  const body = $("deployments");
  body.replaceChildren();
  for (const d of list) {
    const open = el("button", d.id, "link");
    open.type = "button";
    open.title = "details of deployment " + d.id;
    open.addEventListener("click", () => openDeployment(d.id));
    const counts = countsOf(d);
    const summary = Object.entries(counts).filter(([, v]) => v > 0).map(([k, v]) => v + " " + k.replace(/_/g, " ")).join(", ");
    const tr = row([open, d.firmware + " → " + d.version, stateSpan(d.state), d.devices.length + ": " + summary,
      bar(doneShare(d, d.devices), "progress of " + d.id), when(d.created_at)]);
    tr.dataset.id = d.id;
    body.appendChild(tr);
  }
  $("deployments-empty").hidden = list.length > 0;
}

function openDeployment(id) {
  depId = id;
  depKey = "";
  $("dep-result").textContent = "";
  $("dep").hidden = false;
  renderDeployment();
  $("dep").scrollIntoView({ block: "nearest" });
  $("dep-title").focus();
}

$("dep-close").addEventListener("click", () => {
  depId = null;
  $("dep").hidden = true;
});

// A device's error in words, with what its log said when the job failed.
function whyCell(x) {
  if (!x.error && !x.log) return null;
  const box = el("div");
  if (x.error) box.appendChild(el("span", words(ERROR_WORDS, x.error), "bad"));
  const log = x.log;
  if (log && log.line) {
    box.appendChild(document.createTextNode(" — "));
    box.appendChild(el("q", log.line, "log-line"));
  } else if (log && log.error) {
    box.appendChild(el("span", " (log not read: " + log.error + ")", "muted"));
  }
  if (log && log.records && log.records.length) {
    const more = el("details");
    more.open = unfolded.has(x.device);
    more.addEventListener("toggle", () => {
      if (more.open) unfolded.add(x.device);
      else unfolded.delete(x.device);
    });
    more.appendChild(el("summary", "last " + log.records.length + " log records"));
    more.appendChild(el("pre", log.records.map(recordLine).join("\n"), "log"));
    box.appendChild(more);
  }
  return box;
}

function recordLine(r) {
  return "#" + r.n + " boot " + r.boot + " +" + (r.ms / 1000).toFixed(3) + "s " + r.level + " " + r.msg;
}

function renderDeployment() {
  if (depId === null) return;
  const d = deploymentList.find((x) => x.id === depId);
  const key = JSON.stringify([d, d ? d.devices.map((x) => liveOf(d, x)) : null]);
  if (key === depKey) return;
  depKey = key;
  $("dep-title").textContent = "Deployment " + depId;
  $("dep-title").tabIndex = -1;
  if (!d) {
    // Not (yet) in the list: show nothing of the deployment drawn before.
    $("dep-about").textContent = "not in the store (any more)";
    for (const id of ["dep-state", "dep-counts", "dep-stages", "dep-devices"]) $(id).replaceChildren();
    return;
  }
  $("dep-state").replaceChildren(stateSpan(d.state === "running" && d.reason ? "stopping" : d.state));
  const o = d.options || {};
  $("dep-about").textContent = plain(d.firmware + " → " + d.version) + " · created " + when(d.created_at) +
    " · canary " + (o.canary || 0) + " · timeout " + (o.timeout_s || "?") + " s" + (o.auto_rollback ? " · auto-rollback" : "");
  $("dep-reason").textContent = plain(d.reason || "");
  $("dep-reason").hidden = !d.reason;
  const stopping = d.state === "running" && !!d.reason;
  $("dep-pause").disabled = d.state !== "running" || stopping;
  $("dep-resume").disabled = d.state !== "paused";
  $("dep-stop").disabled = !((d.state === "running" && !stopping) || d.state === "paused");
  const over = ["succeeded", "failed", "stopped"].includes(d.state);
  const failedCount = d.devices.filter((x) => BAD.has(x.state)).length;
  $("dep-retry").disabled = !over || failedCount === 0;
  $("dep-retry").textContent = "retry the failed" + (failedCount ? " (" + failedCount + ")" : "");

  const counts = countsOf(d);
  $("dep-counts").replaceChildren(...Object.entries(counts)
    .filter(([k, v]) => COUNTED.includes(k) || v > 0)
    .map(([k, v]) => {
      const li = el("li");
      li.dataset.state = k;
      li.appendChild(el("b", v));
      li.appendChild(document.createTextNode(" " + k.replace(/_/g, " ")));
      return li;
    }));

  const stages = new Map();
  for (const x of d.devices) {
    if (!stages.has(x.stage)) stages.set(x.stage, []);
    stages.get(x.stage).push(x);
  }
  const box = $("dep-stages");
  box.replaceChildren();
  const canary = (o.canary || 0) > 0;
  for (const [stage, members] of [...stages.entries()].sort((a, b) => a[0] - b[0])) {
    const name = "stage " + (stage + 1) + (canary && stage === 0 ? " (canary)" : "");
    const finished = members.filter((x) => FINISHED(x.state)).length;
    const failed = members.filter((x) => BAD.has(x.state)).length;
    const label = el("span", name);
    const b = bar(doneShare(d, members), name);
    b.dataset.stage = stage;
    box.appendChild(label);
    box.appendChild(b);
    box.appendChild(el("span", finished + " of " + members.length + " finished" + (failed ? ", " + failed + " failed" : ""), failed ? "bad" : "muted"));
  }

  const tb = $("dep-devices");
  tb.replaceChildren();
  for (const x of d.devices) {
    const live = liveOf(d, x);
    const tr = row([x.device, x.stage + 1, x.from_version, stateSpan(x.state),
      live ? (() => { const s = el("span"); s.appendChild(phaseCell(live)); s.appendChild(document.createTextNode(" ")); s.appendChild(percentCell(live)); return s; })() : null,
      whyCell(x)]);
    tr.dataset.id = x.device;
    tr.lastChild.className = "why";
    tb.appendChild(tr);
  }
}

$("dep-retry").addEventListener("click", async () => {
  const out = $("dep-result");
  const id = depId;
  out.textContent = "retrying…";
  out.className = "muted";
  try {
    const r = await send("/api/deployments/" + encodeURIComponent(id) + "/retry", { method: "POST" });
    const j = await r.json();
    if (!r.ok) throw new Error(j.error || "HTTP " + r.status);
    if (!stream) poll();
    openDeployment(j.id);
    $("dep-result").textContent = "deployment " + j.id + " retries " + j.devices.length + " device" + (j.devices.length === 1 ? "" : "s") + " of " + id;
    $("dep-result").className = "good";
  } catch (e) {
    out.textContent = "cannot retry: " + e.message;
    out.className = "bad";
  }
});

for (const b of document.querySelectorAll("#dep .actions button[data-action]")) {
  b.addEventListener("click", async () => {
    const out = $("dep-result");
    const id = depId;
    out.textContent = b.dataset.action + "…";
    out.className = "muted";
    try {
      const r = await send("/api/deployments/" + encodeURIComponent(id) + "/" + b.dataset.action, { method: "POST" });
      const j = await r.json();
      if (!r.ok) throw new Error(j.error || "HTTP " + r.status);
      // The answer is the deployment as stored now: show it at once.
      deploymentList = deploymentList.map((x) => (x.id === j.id ? j : x));
      out.textContent = b.dataset.action === "pause" ? "paused: jobs already sent finish" : b.dataset.action === "resume" ? "resumed" : "stopped";
      out.className = "good";
      render();
    } catch (e) {
      out.textContent = "cannot " + b.dataset.action + ": " + e.message;
      out.className = "bad";
    }
  });
}

async function loadFirmware() {
  try {
    renderFirmware(await getJSON("/api/firmware"));
  } catch (e) {
    setStatus("cannot reach serve: " + e.message, "bad");
  }
}

// --- live: the event stream, polling as the fallback ----------------------

let stream = null;
let lastSeq = 0;
let failures = 0;
let pollTimer = null;
let retryTimer = null;
// After this many failures in a row the page polls, and tries the stream
// again now and then.
const MAX_FAILURES = 3;

function onEvent(kind, handle) {
  stream.addEventListener(kind, (e) => {
    const data = JSON.parse(e.data);
    if (kind !== "snapshot" && data.seq !== lastSeq + 1) {
      // A change was missed: start over with a fresh snapshot.
      reconnect();
      return;
    }
    lastSeq = data.seq;
    handle(data);
    render();
  });
}

function connect() {
  if (stream || document.hidden || $("app").hidden) return;
  clearTimeout(retryTimer);
  stream = new EventSource("/api/events");
  onEvent("snapshot", (s) => {
    devices.clear();
    for (const d of s.devices) devices.set(d.id, d);
    deploymentList = s.deployments;
    showGaps(s.gaps);
  });
  onEvent("change", (c) => {
    for (const d of c.devices) devices.set(d.id, d);
    for (const id of c.removed) devices.delete(id);
  });
  onEvent("deployments", (x) => {
    deploymentList = x.deployments;
    loadHealth();
    loadAudit();
  });
  onEvent("gaps", (x) => showGaps(x.gaps));
  stream.onopen = () => {
    failures = 0;
    stopPolling();
    setStatus("live", "live");
  };
  stream.onerror = () => {
    failures++;
    if (failures < MAX_FAILURES && stream.readyState !== EventSource.CLOSED) {
      setStatus("reconnecting…", "bad");
      return;
    }
    disconnect();
    startPolling();
    retryTimer = setTimeout(connect, 30000);
  };
}

function disconnect() {
  if (stream) stream.close();
  stream = null;
}

function reconnect() {
  disconnect();
  connect();
}

let busy = false;

async function poll() {
  if (busy) return;
  busy = true;
  try {
    const [fleetResponse, deployments] = await Promise.all([
      fetch("/api/fleet", { cache: "no-store" }),
      getJSON("/api/deployments"),
    ]);
    if (!fleetResponse.ok) throw new Error("/api/fleet: HTTP " + fleetResponse.status);
    // Why the picture may be incomplete (broker unreachable, replay cut).
    showGaps(fleetResponse.headers.get("x-mqota-fleet-gaps"));
    const fleet = await fleetResponse.json();
    devices.clear();
    for (const d of fleet) devices.set(d.id, d);
    deploymentList = deployments;
    render();
    setStatus("polling (live updates failed) · " + new Date().toLocaleTimeString(), "polling");
  } catch (e) {
    setStatus("cannot reach serve: " + e.message, "bad");
  } finally {
    busy = false;
  }
}

function startPolling() {
  if (pollTimer || document.hidden) return;
  poll();
  pollTimer = setInterval(poll, 2000);
}

function stopPolling() {
  clearInterval(pollTimer);
  pollTimer = null;
}

document.addEventListener("visibilitychange", () => {
  if (document.hidden) {
    // Nobody looks: hold no connection open and ask nothing.
    disconnect();
    stopPolling();
    clearTimeout(retryTimer);
    setStatus("paused while hidden", "muted");
  } else {
    failures = 0;
    if (!$("app").hidden) {
      connect();
      loadFirmware();
    }
  }
});

// --- the deploy form ---------------------------------------------------------

function amount(text) {
  const t = text.trim();
  return /^\d+$/.test(t) ? Number(t) : t;
}

function deployBody() {
  const body = {
    firmware: $("d-firmware").value,
    canary: Number($("d-canary").value || 0),
    batch: amount($("d-batch").value),
    max_failures: amount($("d-max-failures").value),
    auto_rollback: $("d-auto-rollback").checked,
    timeout: Number($("d-timeout").value || 600),
  };
  const targets = $("d-targets").value;
  switch ($("d-mode").value) {
    case "all": body.all = true; break;
    case "to": body.to = targets.split(",").map((s) => s.trim()).filter((s) => s); break;
    case "where": body.where = targets; break;
  }
  return body;
}

// Reasons a preview gives for leaving devices out, in words.
const SKIPPED_WORDS = {
  current: "already on this version",
  offline: "offline",
  wrong_chip: "another chip",
  other_project: "another project",
  downgrade: "newer or incomparable version (a downgrade)",
  unsigned: "take only signed images; this one is unsigned",
  no_https: "https not enabled on the device",
};

function idList(ids) {
  return ids.slice(0, 20).join(", ") + (ids.length > 20 ? " and " + (ids.length - 20) + " more" : "");
}

// Shows which devices a deployment would touch, and why others are left out.
async function preview() {
  const out = $("preview");
  out.hidden = false;
  out.replaceChildren(el("p", "planning…", "muted"));
  try {
    const r = await send("/api/deployments/preview", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(deployBody()),
    });
    const j = await r.json();
    if (!r.ok) throw new Error(j.error || "HTTP " + r.status);
    const head = el("p", "Would update " + j.devices.length + " device" + (j.devices.length === 1 ? "" : "s") +
      " to " + j.version + " in " + j.stages + " stage" + (j.stages === 1 ? "" : "s") + ":", "good");
    const list = el("ul");
    list.id = "preview-touch";
    const byStage = new Map();
    for (const x of j.devices) {
      if (!byStage.has(x.stage)) byStage.set(x.stage, []);
      byStage.get(x.stage).push(x.device + (x.from_version ? " (from " + x.from_version + ")" : ""));
    }
    for (const [stage, ids] of byStage) list.appendChild(el("li", "stage " + (stage + 1) + ": " + idList(ids)));
    const skipped = el("ul");
    skipped.id = "preview-skip";
    for (const [why, ids] of Object.entries(j.skipped)) {
      if (!ids.length) continue;
      const li = el("li", ids.length + " skipped, " + words(SKIPPED_WORDS, why) + ": " + idList(ids));
      li.dataset.reason = why;
      skipped.appendChild(li);
    }
    const parts = [head, list];
    if (skipped.children.length) parts.push(el("p", "Left out:"), skipped);
    if (j.in_deployment.length) {
      parts.push(el("p", "In a running deployment (the deployment would be refused): " +
        j.in_deployment.map((x) => x.device + " in " + x.deployment).join(", "), "bad"));
    }
    out.replaceChildren(...parts);
  } catch (e) {
    out.replaceChildren(el("p", "No deployment: " + e.message, "bad"));
  }
}

$("deploy-preview").addEventListener("click", preview);

$("deploy").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("deploy-result");
  const body = deployBody();
  out.textContent = "starting…";
  out.className = "wide muted";
  try {
    const r = await send("/api/deployments", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const j = await r.json();
    if (!r.ok) throw new Error(j.error || "HTTP " + r.status);
    let text = "deployment " + j.id + " of " + j.version + " to " + j.devices.length + " device" + (j.devices.length === 1 ? "" : "s") +
      " in " + j.stages + " stage" + (j.stages === 1 ? "" : "s");
    if (j.current.length) text += "; already on " + j.version + ": " + j.current.join(", ");
    if (j.no_https && j.no_https.length) text += "; https is not enabled on: " + j.no_https.join(", ") + " (left out)";
    out.textContent = text;
    out.className = "wide good";
    loadFirmware();
    if (!stream) poll();
  } catch (e) {
    out.textContent = e.message;
    out.className = "wide bad";
  }
});

// --- health, audit, login ---------------------------------------------------

async function loadHealth() {
  try {
    const h = await getJSON("/api/health");
    const broker = $("health-broker");
    broker.textContent = h.broker_connected ? "broker reachable" : "broker unreachable";
    broker.className = h.broker_connected ? "good" : "bad";
    $("health-online").textContent = h.online + " of " + h.devices + " devices online";
    $("health-rollouts").textContent = h.rollouts_running + " rollout" + (h.rollouts_running === 1 ? "" : "s") + " running" +
      (h.rollouts_paused ? ", " + h.rollouts_paused + " paused" : "");
    $("health-users").textContent = session.login_required
      ? "logged in: " + (h.logged_in.length ? h.logged_in.join(", ") : "nobody")
      : "no login (loopback)";
  } catch (e) {
    $("health-broker").textContent = "health unknown: " + e.message;
    $("health-broker").className = "bad";
  }
}

async function loadAudit() {
  try {
    const list = await getJSON("/api/audit?limit=50");
    const body = $("audit");
    body.replaceChildren();
    for (const a of list) {
      body.appendChild(row([when(a.at), a.actor, a.action, a.target, a.source,
        el("span", a.status, a.status >= 400 ? "bad" : "good")]));
    }
    $("audit-empty").hidden = list.length > 0;
  } catch (e) {
    // The session check says why; nothing more to show here.
  }
}

function showLogin(why) {
  disconnect();
  stopPolling();
  $("app").hidden = true;
  $("login").hidden = false;
  $("login-result").textContent = why || "";
  $("whoami").textContent = "";
  $("logout").hidden = true;
  setStatus("login required", "muted");
  $("login-name").focus();
}

let started = false;

function startApp() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("whoami").textContent = session.user ? session.user + " (" + session.role + ")" : "";
  $("logout").hidden = !session.user;
  document.body.dataset.role = session.role || "admin";
  loadFirmware();
  loadHealth();
  loadAudit();
  connect();
  if (started) return;
  started = true;
  // The catalogue is a directory: looking again twice a minute is plenty.
  setInterval(() => { if (!document.hidden && !$("app").hidden) loadFirmware(); }, 30000);
  setInterval(() => { if (!document.hidden && !$("app").hidden) { loadHealth(); loadAudit(); } }, 3000);
}

async function begin() {
  try {
    session = await (await fetch("/api/session", { cache: "no-store" })).json();
  } catch (e) {
    setStatus("cannot reach serve: " + e.message, "bad");
    return;
  }
  if (session.login_required && !session.user) showLogin("");
  else startApp();
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("login-result");
  out.textContent = "checking…";
  out.className = "wide muted";
  try {
    const r = await fetch("/api/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ user: $("login-name").value, password: $("login-password").value }),
    });
    const j = await r.json();
    if (!r.ok) throw new Error(j.error || "HTTP " + r.status);
    $("login-password").value = "";
    session = { login_required: true, user: j.user, role: j.role, csrf: j.csrf };
    startApp();
  } catch (e) {
    out.textContent = e.message;
    out.className = "wide bad";
  }
});

$("logout").addEventListener("click", async () => {
  await send("/api/logout", { method: "POST" }).catch(() => {});
  session = { login_required: true, user: null, role: null, csrf: null };
  showLogin("logged out");
});

begin();
