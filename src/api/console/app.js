// diskless web console: plain JavaScript, no build step. Every value from the server is put
// into the page with textContent (initiator names come from the network).
"use strict";

const API = "/api/v1";
const state = { clients: new Map(), events: [], token: sessionStorage.getItem("diskless-token") || "" };

// ---- helpers ---------------------------------------------------------------------------------
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
const $ = (sel) => document.querySelector(sel);
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
const rate = (n) => bytes(n) + "/s";
function when(ms) { return ms ? new Date(ms).toLocaleString() : "–"; }
function ago(ms) {
  if (!ms) return "–";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
function toast(text, error) {
  const t = $("#toast");
  t.textContent = text;
  t.className = error ? "error" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
}
function headers(json) {
  const hd = {};
  if (state.token) hd["Authorization"] = "Bearer " + state.token;
  if (json) hd["Content-Type"] = "application/json";
  return hd;
}
async function login() {
  const dlg = $("#login");
  if (dlg.open) return new Promise((r) => dlg.addEventListener("close", r, { once: true }));
  $("#login-token").value = "";
  dlg.showModal();
  await new Promise((r) => dlg.addEventListener("close", r, { once: true }));
  state.token = $("#login-token").value.trim();
  sessionStorage.setItem("diskless-token", state.token);
  startStream();
}
async function api(path, opts = {}) {
  for (let attempt = 0; attempt < 3; attempt++) {
    const r = await fetch(API + path, {
      method: opts.method || "GET",
      headers: headers(opts.method === "POST"),
      body: opts.method === "POST" ? JSON.stringify(opts.body || {}) : undefined,
    });
    if (r.status === 401) { await login(); continue; }
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || r.status + " " + r.statusText);
    return body;
  }
  throw new Error("not signed in");
}

// ---- confirmation ----------------------------------------------------------------------------
function confirmAction(title, text, opts = {}) {
  const dlg = $("#confirm");
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = opts.ok || "Confirm";
  $("#confirm-input-label").hidden = !opts.input;
  $("#confirm-input").value = opts.input || "";
  dlg.returnValue = "";
  dlg.showModal();
  return new Promise((resolve) => dlg.addEventListener("close", () => {
    resolve(dlg.returnValue === "ok" ? ($("#confirm-input").value || true) : null);
  }, { once: true }));
}
// The next-boot form: resolves to {image, mode}, {clear: true}, or null (cancelled).
async function nextBootForm(c) {
  const dlg = $("#nextboot");
  $("#nextboot-title").textContent = "Next boot of " + c.initiator;
  const nb = c.next_boot || {};
  $("#nextboot-image").value = nb.image || "";
  $("#nextboot-mode").value = nb.mode || "";
  const list = $("#nextboot-images");
  list.replaceChildren();
  try {
    const { images } = await api("/images");
    for (const i of images) if (i.kind === "golden") list.append(h("option", { value: i.name }));
  } catch (e) { /* the field still takes any name */ }
  dlg.returnValue = "";
  dlg.showModal();
  return new Promise((resolve) => dlg.addEventListener("close", () => {
    const image = $("#nextboot-image").value.trim(), mode = $("#nextboot-mode").value;
    if (dlg.returnValue === "clear") resolve({ clear: true });
    else if (dlg.returnValue === "ok" && (image || mode)) {
      const body = {};
      if (image) body.image = image;
      if (mode) body.mode = mode;
      resolve(body);
    } else resolve(null);
  }, { once: true }));
}
async function act(path, body, okText) {
  try {
    const r = await api(path, { method: "POST", body });
    toast(okText(r));
    render();
    return r;
  } catch (e) {
    toast(e.message, true);
    return null;
  }
}

// ---- pages -----------------------------------------------------------------------------------
const pages = {
  async clients() {
    // In a cluster: every node's clients (each with its owning node) and the nodes.
    const [{ clients, cluster }, nodes] = await Promise.all([api("/clients"), clusterNodes()]);
    state.cluster = cluster || null;
    state.clients = new Map(clients.map((c) => [c.target + "|" + c.initiator, c]));
    const grid = h("div", { class: "matrix", id: "matrix" });
    for (const c of clients) grid.append(card(c));
    const out = [];
    if (nodes) out.push(nodesTable(nodes));
    out.push(h("h2", {}, "Clients ", h("span", { class: "muted" }, "(" + clients.length + ")")),
      clients.length ? grid : h("p", { class: "muted" }, "No boot clients configured."));
    return out;
  },
  async client(id) {
    const c = await api("/clients/" + encodeURIComponent(id));
    const eid = encodeURIComponent(c.initiator);
    const info = h("dl", { class: "kv", id: "client-info" },
      h("dt", {}, "State"), h("dd", {}, h("span", { class: "state " + c.state, id: "client-state" }, c.state),
        c.since_ms ? " since " + when(c.since_ms) : ""),
      h("dt", {}, "Target"), h("dd", {}, c.target),
      c.node ? [h("dt", {}, "Node"), h("dd", { id: "client-node" }, c.node + (c.stale ? " — stale: " + (c.stale_reason || "") : ""))] : null,
      h("dt", {}, "Image / mode"), h("dd", {}, c.image + " / " + c.mode),
      h("dt", {}, "Next boot"), h("dd", { id: "client-next-boot" }, c.next_boot
        ? (c.next_boot.image || "binding's image") + " / " + (c.next_boot.mode || "binding's mode") +
          " (set by " + c.next_boot.by + ", " + when(c.next_boot.since_ms) + ")" +
          (c.next_disk ? " – pending: " + c.next_disk.image + " " + c.next_disk.mode : " – in use")
        : (c.next_disk ? c.next_disk.image + " " + c.next_disk.mode + " (binding)" : "as now")),
      h("dt", {}, "MAC"), h("dd", {}, c.mac || "–"),
      h("dt", {}, "IP"), h("dd", {}, c.ip || "–"),
      h("dt", {}, "Sessions"), h("dd", { id: "client-sessions" }, c.sessions),
      h("dt", {}, "Boots"), h("dd", { id: "client-boots" }, c.boots),
      // An operator's reset of disks in Ceph RBD, applied when the client next logs in.
      (c.rbd_recreate_pending || []).length ? [h("dt", {}, "Reset pending"), h("dd", { id: "client-rbd-recreate" },
        "at next login (LUN " + c.rbd_recreate_pending.join(", ") + "): the RBD disk is cloned again from its image")] : null,
      h("dt", {}, "Read / written"), h("dd", {}, bytes(c.read_bytes) + " / " + bytes(c.write_bytes)),
      h("dt", {}, "Now"), h("dd", {}, rate(c.read_bps) + " read, " + rate(c.write_bps) + " write, " + (c.iops ?? "–") + " IOPS"),
      h("dt", {}, "Overlay"), h("dd", {}, c.overlay ? bytes(c.overlay.bytes_written) + " written" : "none"),
      h("dt", {}, "Overlay dir"), h("dd", {}, c.overlay_dir || "–"));
    const actions = h("div", { class: "actions" },
      h("button", { class: "danger", id: "action-reset", onclick: async () => {
        if (await confirmAction("Reset " + c.initiator + "?",
          "Its sessions are closed and its overlay is discarded: everything it wrote since its last boot is lost.",
          { ok: "Reset" })) {
          await act("/clients/" + eid + "/reset", {}, () => "reset " + c.initiator);
        }
      } }, "Reset disk…"),
      h("button", { id: "action-commit", onclick: async () => {
        const file = await confirmAction("Commit " + c.initiator,
          "Write the golden image plus this client's overlay into a new image file beside " + c.image + ".",
          { ok: "Commit", input: c.image + "-" + new Date().toISOString().slice(0, 10) + ".img" });
        if (file) await act("/clients/" + eid + "/commit", { file }, (r) => "committed to " + r.path);
      } }, "Commit to new image…"),
      h("button", { id: "action-next-boot", onclick: async () => {
        const body = await nextBootForm(c);
        if (body) await act("/clients/" + eid + "/next-boot", body,
          (r) => r.result === "cleared" ? "next-boot override cleared" : "next boot set: " + r.note);
      } }, "Change next boot…"));
    const sess = table(["TSIH", "ISID", "Kind", "Peer", "Since", "Read", "Written", ""],
      (c.session_list || []).map((s) => [s.tsih, s.isid, s.firmware ? "firmware" : "OS", s.peer, when(s.since_ms),
        bytes(s.read_bytes), bytes(s.write_bytes), closeButton(s)]));
    c.timeline = c.timeline || [];
    const tl = h("ul", { class: "timeline", id: "timeline" },
      c.timeline.slice().reverse().map((e) => h("li", { class: e.kind },
        h("span", { class: "kind" }, e.kind), " ", h("span", { class: "muted" }, when(e.time_ms)), h("br"), e.detail)));
    return [h("h2", {}, "Client ", c.initiator), actions,
      h("div", { class: "cols" }, h("div", {}, info, h("h2", {}, "Sessions"), sess),
        h("div", {}, h("h2", {}, "Boot timeline"), c.timeline.length ? tl : h("p", { class: "muted" }, "No events since the server started.")))];
  },
  async images() {
    const { images, catalogue } = await api("/images");
    const out = [h("h2", {}, "Images"), table(["Name", "Kind", "Path", "Size", "Block", "Used by"],
      images.map((i) => [i.name, i.kind, i.path, bytes(i.size), i.block_size, i.used_by.join(", ")]))];
    if (catalogue) {
      // The cluster's catalogue (read-only): versions, pointers, clients on each version.
      out.push(h("h2", {}, "Catalogue"), table(["Image", "Version", "Pointers", "Recorded", "By", "Message", "Size", "Clients"],
        catalogue.images.flatMap((i) => i.versions.slice().reverse().map((v) => [i.name, v.version,
          Object.entries(i.pointers).filter(([, p]) => p.version === v.version).map(([n]) => n).join(", "),
          when(v.time_ms), v.author, v.message, bytes(v.size), v.clients]))));
    }
    return out;
  },
  async targets() {
    const { targets } = await api("/targets");
    return [h("h2", {}, "Targets"), table(["Name", "Kind", "Initiators", "Auth", "LUNs / bindings", "Clients", "Sessions"],
      targets.map((t) => [t.name + (t.alias ? " (" + t.alias + ")" : ""), t.kind, t.initiators.join(", "), t.auth,
        t.kind === "boot"
          ? t.bindings.map((b) => (b.initiator || b.mac) + " → " + b.image + " " + b.mode).concat(t.default ? ["* → " + t.default.image + " " + t.default.mode] : []).join("; ")
          : t.luns.map((l) => "LUN " + l.lun + ": " + l.image + " (" + bytes(l.size) + (l.read_only ? ", ro" : "") + ")").join("; "),
        t.clients, t.sessions]))];
  },
  async sessions() {
    const { sessions } = await api("/sessions");
    return [h("h2", {}, "Sessions"), table(["TSIH", "Initiator", "Target", "ISID", "Kind", "Peer", "Since", "Read", "Written", ""],
      sessions.map((s) => [s.tsih, s.initiator, s.target, s.isid, s.firmware ? "firmware" : "OS", s.peer,
        when(s.since_ms), bytes(s.read_bytes), bytes(s.write_bytes), closeButton(s)]))];
  },
  async events() {
    const { events } = await api("/events/recent");
    state.events = events;
    return [h("h2", {}, "Events"), eventTable(events)];
  },
  async audit() {
    const { entries } = await api("/audit");
    return [h("h2", {}, "Audit log"), table(["Time", "Who", "Action", "Result"],
      entries.slice().reverse().map((e) => [e.time, e.who, e.action, e.result + (e.error ? ": " + e.error : "")]))];
  },
};

function closeButton(s) {
  return h("button", { onclick: async () => {
    if (await confirmAction("Close session " + s.tsih + "?", s.initiator + " from " + s.peer + " loses this connection.", { ok: "Close" })) {
      await act("/sessions/" + s.tsih + "/close", {}, () => "closed session " + s.tsih);
    }
  } }, "Close…");
}
function table(head, rows) {
  return h("table", {}, h("thead", {}, h("tr", {}, head.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.length ? rows.map((r) => h("tr", {}, r.map((x) => h("td", {}, x))))
      : h("tr", {}, h("td", { colspan: head.length, class: "muted" }, "none"))));
}
function eventTable(events) {
  return table(["Time", "Event", "Initiator", "Target", "Peer", "Detail"],
    events.slice().reverse().map((e) => [when(e.time_ms), e.kind, e.initiator || "", e.target || "", e.peer || "", e.detail]));
}
// The cluster's nodes (null outside a cluster: /cluster answers 404).
async function clusterNodes() {
  try { return await api("/cluster"); } catch (e) { return null; }
}
function nodesTable(cl) {
  return h("section", { id: "nodes" }, h("h2", {}, "Nodes ", h("span", { class: "muted" }, "(cluster " + cl.name + ", this is " + cl.node + ")")),
    table(["Node", "Portal", "API", "Sessions", "Clients", "Drained", "Lease", "Answers"],
      cl.nodes.map((n) => [n.id + (n.me ? " (this node)" : ""), n.portal, n.api || "–", n.load, n.clients,
        n.draining ? "draining" : "no", n.lease_alive ? "alive " + (n.lease || "") : "lost",
        n.answering ? (n.answer_ms ?? 0) + " ms" : "no: " + (n.error || "?")])));
}
function card(c) {
  const href = "#/client/" + encodeURIComponent(c.initiator);
  return h("div", { class: "card " + c.state + (c.stale ? " stale" : ""), "data-initiator": c.initiator, "data-node": c.node || null,
      title: c.stale ? "stale: " + (c.stale_reason || "") : null, onclick: () => { location.hash = href; } },
    h("div", { class: "row" }, h("span", { class: "state " + c.state }, c.state), h("span", {}, c.image + " · " + c.mode)),
    h("div", { class: "name" }, c.initiator),
    c.node || c.stale ? h("div", { class: "row" }, h("span", { class: "node" }, c.node ? "on " + c.node : "no node"),
      c.stale ? h("span", { class: "stale-mark" }, "stale") : null) : null,
    h("div", { class: "row" }, h("span", { class: "rates" }, "↓ " + rate(c.read_bps) + "  ↑ " + rate(c.write_bps)), h("span", {}, (c.iops ?? "–") + " IOPS")),
    h("div", { class: "row" }, h("span", {}, "boots " + c.boots), h("span", {}, c.overlay ? bytes(c.overlay.bytes_written) + " written" : "")));
}

// ---- routing ---------------------------------------------------------------------------------
async function render() {
  const [page, ...rest] = (location.hash.replace(/^#\//, "") || "clients").split("/");
  const arg = rest.length ? decodeURIComponent(rest.join("/")) : undefined;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page || (page === "client" && a.dataset.page === "clients"));
  const fn = pages[page] || pages.clients;
  try {
    const content = await fn(arg);
    $("#main").replaceChildren(...content);
    $("#main").dataset.page = page;
  } catch (e) {
    $("#main").replaceChildren(h("p", { class: "muted" }, "Error: " + e.message));
  }
}
window.addEventListener("hashchange", render);

// ---- live updates (Server-Sent Events over fetch, so the token goes in a header) -------------
let streamAbort = null;
async function startStream() {
  if (streamAbort) streamAbort.abort();
  const ctl = new AbortController();
  streamAbort = ctl;
  let lastId = null;
  while (!ctl.signal.aborted) {
    try {
      const hd = headers(false);
      if (lastId !== null) hd["Last-Event-ID"] = lastId;
      const r = await fetch(API + "/events", { headers: hd, signal: ctl.signal });
      if (r.status === 401) { setLive(false); await login(); return; }
      if (!r.ok || !r.body) throw new Error(String(r.status));
      setLive(true);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          let ev = "message", data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) ev = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
            else if (line.startsWith("id: ")) lastId = line.slice(4);
          }
          if (data) onEvent(ev, JSON.parse(data));
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    setLive(false);
    await new Promise((r) => setTimeout(r, 2000));
  }
}
function setLive(on) {
  const l = $("#live");
  l.className = "live " + (on ? "on" : "off");
  l.textContent = on ? "live" : "offline";
}
function onEvent(kind, data) {
  const page = $("#main").dataset.page;
  if (kind === "stats") {
    $("#health").textContent = data.sessions + " sessions";
    if (page === "clients") updateMatrix(data.clients);
    return;
  }
  state.events.push(data);
  if (kind === "login_failed") toast("login failed: " + (data.initiator || "?") + " — " + data.detail, true);
  if (page === "events") $("#main").replaceChildren(h("h2", {}, "Events"), eventTable(state.events));
  if (page === "client" && data.initiator && location.hash.includes(encodeURIComponent(data.initiator))) render();
  if (page === "sessions") render();
}
function updateMatrix(rows) {
  const grid = $("#matrix");
  if (!grid) return;
  const known = new Set(Array.from(grid.children).map((el) => el.dataset.initiator));
  if (rows.some((r) => !known.has(r.initiator))) {
    // In a cluster the view is built from every node: a new client shows at most every 5 s.
    if (!state.cluster || Date.now() - (updateMatrix.last || 0) > 5000) { updateMatrix.last = Date.now(); render(); }
    return;
  }
  if (state.cluster) rows = rows.filter((r) => { const c = state.clients.get(r.target + "|" + r.initiator); return !c || !c.node || c.node === state.cluster.node; });
  for (const r of rows) {
    const old = Array.from(grid.children).find((el) => el.dataset.initiator === r.initiator);
    const c = Object.assign({}, state.clients.get(r.target + "|" + r.initiator) || {}, r);
    if (r.overlay_bytes !== undefined && r.overlay_bytes !== null) c.overlay = { bytes_written: r.overlay_bytes };
    state.clients.set(r.target + "|" + r.initiator, c);
    if (old) old.replaceWith(card(c));
  }
}

render();
startStream();
