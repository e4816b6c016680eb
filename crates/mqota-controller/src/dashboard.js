// The mqota dashboard: polls the JSON API of `mqota serve` every second.
// Every piece of data reaches the DOM through textContent or an attribute
// set by property, never as markup: device ids, versions and error texts
// come from devices and files nobody vetted.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c);
    else if (c !== undefined && c !== null) td.textContent = String(c);
    tr.appendChild(td);
  }
  return tr;
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(url + ": HTTP " + r.status);
  return r.json();
}

// Device id -> its latest progress event, from /api/fleet.
let progressOf = new Map();

const GOOD = new Set(["done", "succeeded", "reverted"]);
const BAD = new Set(["failed", "rolled_back", "cancelled", "timed_out", "revert_failed"]);

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

function renderFleet(list) {
  progressOf = new Map(list.map((d) => [d.id, d.progress]));
  const body = $("fleet");
  body.replaceChildren();
  for (const d of list) {
    const s = d.status;
    const p = d.progress;
    let last = null;
    if (s && s.last) {
      last = stateSpan(s.last.result);
      if (s.last.error) last.appendChild(document.createTextNode(" (" + s.last.error + ")"));
      if (s.last.job) last.appendChild(el("span", " " + s.last.job, "muted"));
    }
    body.appendChild(row([
      d.id,
      s ? el("span", d.online ? "online" : "offline", d.online ? "good" : "bad") : el("span", "no status", "muted"),
      s && s.chip,
      s && s.project,
      s && s.version,
      s && s.slot !== null && s.slot !== undefined ? "ota_" + s.slot : s ? "factory" : null,
      s && s.state,
      last,
      phaseCell(p),
      percentCell(p),
    ]));
  }
  $("fleet-empty").hidden = list.length > 0;
}

let firmwareKey = "";

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
      f.valid ? null : el("span", f.error, "bad"),
    ]));
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

function when(unix) {
  return new Date(unix * 1000).toLocaleString();
}

function renderDeployments(list) {
  const box = $("deployments");
  box.replaceChildren();
  for (const d of list) {
    const h = el("h3");
    h.appendChild(el("code", d.id));
    h.appendChild(document.createTextNode(" " + d.firmware + " → " + d.version + " "));
    h.appendChild(stateSpan(d.state));
    box.appendChild(h);
    const counts = {};
    for (const x of d.devices) counts[x.state] = (counts[x.state] || 0) + 1;
    const o = d.options || {};
    const summary = Object.entries(counts).map(([k, v]) => v + " " + k).join(", ");
    box.appendChild(el("p",
      "created " + when(d.created_at) + " · " + d.devices.length + " devices: " + summary +
      (o.auto_rollback ? " · auto-rollback" : ""), "muted"));
    if (d.reason) box.appendChild(el("p", d.reason, "bad"));
    const t = el("table");
    const head = el("thead");
    const hr = el("tr");
    for (const name of ["device", "stage", "from", "result", "error", "phase", "percent"]) hr.appendChild(el("th", name));
    head.appendChild(hr);
    t.appendChild(head);
    const tb = el("tbody");
    for (const x of d.devices) {
      const p = progressOf.get(x.device);
      // Live progress belongs to this deployment only if it carries its job id.
      const live = x.state === "sent" && p && p.job === d.id ? p : null;
      tb.appendChild(row([
        x.device,
        x.stage + 1,
        x.from_version,
        stateSpan(x.state),
        x.error ? el("span", x.error, "bad") : null,
        phaseCell(live),
        percentCell(live),
      ]));
    }
    t.appendChild(tb);
    box.appendChild(t);
  }
  $("deployments-empty").hidden = list.length > 0;
}

let ticks = 0;
let busy = false;

async function tick() {
  if (busy) return;
  busy = true;
  try {
    // The catalogue is a directory scan: every fifth second is plenty.
    const firmware = ticks % 5 === 0 ? getJSON("/api/firmware") : null;
    const [fleetResponse, deployments] = await Promise.all([
      fetch("/api/fleet", { cache: "no-store" }),
      getJSON("/api/deployments"),
    ]);
    if (!fleetResponse.ok) throw new Error("/api/fleet: HTTP " + fleetResponse.status);
    // Why the picture may be incomplete (broker unreachable, replay cut).
    const gaps = fleetResponse.headers.get("x-mqota-fleet-gaps");
    $("fleet-gaps").textContent = gaps ? "The fleet may be incomplete: " + gaps : "";
    $("fleet-gaps").hidden = !gaps;
    const fleet = await fleetResponse.json();
    renderFleet(fleet);
    renderDeployments(deployments);
    if (firmware) renderFirmware(await firmware);
    ticks++;
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
    $("status").className = "muted";
  } catch (e) {
    $("status").textContent = "cannot reach serve: " + e.message;
    $("status").className = "bad";
  } finally {
    busy = false;
  }
}

function amount(text) {
  const t = text.trim();
  return /^\d+$/.test(t) ? Number(t) : t;
}

$("deploy").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("deploy-result");
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
  out.textContent = "starting…";
  out.className = "wide muted";
  try {
    const r = await fetch("/api/deployments", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const j = await r.json();
    if (!r.ok) throw new Error(j.error || "HTTP " + r.status);
    let text = "deployment " + j.id + " of " + j.version + " to " + j.devices.length + " devices in " + j.stages + " stages";
    if (j.current.length) text += "; already on " + j.version + ": " + j.current.join(", ");
    if (j.no_https && j.no_https.length) text += "; https is not enabled on: " + j.no_https.join(", ") + " (left out)";
    out.textContent = text;
    out.className = "wide good";
    ticks = 0;
    tick();
  } catch (e) {
    out.textContent = e.message;
    out.className = "wide bad";
  }
});

tick();
setInterval(tick, 1000);
