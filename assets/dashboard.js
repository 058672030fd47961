// proto_tasker dashboard. Plain DOM, no libraries, no build step.
//
// Safety rule: task data (args, results, errors, names) is user input. It is
// only ever put on the page with textContent or as an attribute value through
// the h() helper below; nothing here assigns innerHTML.
"use strict";

(function () {
  const REFRESH_MS = 2000;
  const TOKEN_KEY = "proto_tasker.token";
  const STATES = ["available", "scheduled", "running", "retryable", "blocked",
    "completed", "failed", "cancelled"];
  const FINISHED = new Set(["completed", "failed", "cancelled"]);

  const app = document.getElementById("app");
  const flashBox = document.getElementById("flash");
  const login = document.getElementById("login");
  const loginForm = document.getElementById("login-form");
  const loginError = document.getElementById("login-error");
  const logout = document.getElementById("logout");
  const live = document.getElementById("live");

  // ---------- DOM helpers ----------

  // h("a", {href: "#/x", class: "c", onclick: fn}, "text", child, ...)
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith("on") && typeof v === "function") {
        el.addEventListener(k.slice(2), v);
      } else if (k === "dataset") {
        Object.assign(el.dataset, v);
      } else if (v === true) {
        el.setAttribute(k, "");
      } else {
        el.setAttribute(k, String(v));
      }
    }
    append(el, ...children);
    return el;
  }

  function append(el, ...children) {
    for (const c of children.flat(Infinity)) {
      if (c === undefined || c === null || c === false) continue;
      el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    for (const c of children) {
      el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function replace(el, ...children) {
    el.replaceChildren();
    append(el, ...children);
  }

  function fmtNum(n) {
    return Number(n || 0).toLocaleString("en-US");
  }

  function fmtTime(t) {
    if (!t) return "—";
    const d = new Date(t);
    return isNaN(d) ? String(t) : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }

  function ago(t) {
    if (!t) return "";
    const ms = Date.now() - new Date(t).getTime();
    const abs = Math.abs(ms);
    const u = abs < 1000 ? "now" : abs < 60e3 ? Math.round(abs / 1e3) + " s"
      : abs < 3600e3 ? Math.round(abs / 60e3) + " min" : Math.round(abs / 3600e3) + " h";
    if (u === "now") return "now";
    return ms >= 0 ? u + " ago" : "in " + u;
  }

  function dur(ms) {
    if (ms < 1000) return ms + " ms";
    if (ms < 60e3) return (ms / 1000).toFixed(1) + " s";
    return (ms / 60e3).toFixed(1) + " min";
  }

  function json(v) {
    return JSON.stringify(v, null, 2);
  }

  function preview(v, max) {
    const t = JSON.stringify(v);
    return t.length > max ? t.slice(0, max) + "…" : t;
  }

  // A task's latest progress: a bar when it has a numeric "pct" (0 to 100),
  // with its "message" if any; any other value as JSON text.
  function progressView(p, max) {
    if (p == null) return "";
    const pct = p && typeof p === "object" && typeof p.pct === "number" && isFinite(p.pct)
      ? Math.max(0, Math.min(100, p.pct)) : null;
    if (pct === null) return h("span", { class: "progress-text" }, preview(p, max));
    const label = Math.round(pct) + "%" + (typeof p.message === "string" && p.message ? " " + p.message : "");
    return h("span", { class: "progress", title: preview(p, 200) },
      h("progress", { max: "100", value: String(pct), "aria-label": "progress " + Math.round(pct) + "%" }),
      " ", label.length > max ? label.slice(0, max) + "…" : label);
  }

  function badge(state) {
    return h("span", { class: "badge st-" + state, "data-state": state }, state);
  }

  function flash(msg, kind) {
    flashBox.textContent = msg;
    flashBox.className = kind || "error";
    flashBox.hidden = !msg;
    if (msg) {
      clearTimeout(flash.timer);
      flash.timer = setTimeout(() => { flashBox.hidden = true; }, 6000);
    }
  }

  // ---------- API ----------

  class AuthError extends Error {}

  async function api(path, opts) {
    opts = opts || {};
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch("/api/v1" + path, {
      method: opts.method || "GET",
      headers,
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
      cache: "no-store",
    });
    let body = null;
    try { body = await res.json(); } catch (_) { body = null; }
    if (res.status === 401) {
      showLogin(body && body.error ? body.error.message : "sign in");
      throw new AuthError("unauthorized");
    }
    if (!res.ok) {
      const e = body && body.error;
      throw new Error(e ? e.message + (e.field ? " (" + e.field + ")" : "") : res.status + " " + res.statusText);
    }
    return body;
  }

  function showLogin(reason) {
    const had = sessionStorage.getItem(TOKEN_KEY);
    login.hidden = false;
    app.hidden = true;
    logout.hidden = true;
    if (had) {
      // The first of several concurrent 401s reports; the rest find no token.
      sessionStorage.removeItem(TOKEN_KEY);
      loginError.textContent = "The token was refused: " + reason;
      loginError.hidden = false;
    } else if (!reason) {
      loginError.hidden = true;
    }
    document.getElementById("token").focus();
  }

  loginForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = document.getElementById("token").value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    roleKnown = false;
    document.getElementById("token").value = "";
    login.hidden = true;
    app.hidden = false;
    logout.hidden = false;
    route();
  });

  logout.addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("");
  });

  async function act(label, fn) {
    try {
      const r = await fn();
      flash(label, "ok");
      await refresh();
      return r;
    } catch (e) {
      if (!(e instanceof AuthError)) flash(e.message, "error");
    }
  }

  // ---------- routing and polling ----------

  let current = null; // { name, refresh: async fn }
  let timer = null;

  function parseHash() {
    const raw = location.hash.replace(/^#/, "") || "/";
    const [path, query] = raw.split("?");
    const params = new URLSearchParams(query || "");
    const parts = path.split("/").filter(Boolean);
    return { parts, params };
  }

  function route() {
    const { parts, params } = parseHash();
    const name = parts[0] || "overview";
    for (const a of document.querySelectorAll("#nav a")) {
      a.classList.toggle("active", a.dataset.nav === name || (name === "task" && a.dataset.nav === "tasks"));
    }
    const views = { overview, queues, tasks, task, dead, nodes, schedules, audit };
    const view = views[name] || notFound;
    replace(app);
    current = view(parts.slice(1), params) || null;
    refresh();
  }

  // Each view refreshes at most once at a time; a view left behind may
  // finish its refresh, but it only writes into its own detached elements.
  // The caller's role decides which actions show (read: none). The API
  // checks it on every call anyway; hiding only spares a refused click.
  let roleKnown = false;
  async function learnRole() {
    if (roleKnown) return;
    const who = await api("/whoami");
    document.body.dataset.role = who.role;
    roleKnown = true;
  }

  async function refresh() {
    const view = current;
    if (!view || view.busy || !login.hidden) return;
    view.busy = true;
    try {
      await learnRole();
      await view.refresh();
      live.classList.remove("stale");
      live.title = "Updated " + new Date().toLocaleTimeString();
    } catch (e) {
      live.classList.add("stale");
      if (!(e instanceof AuthError)) {
        live.title = "Last refresh failed: " + e.message;
      }
    } finally {
      view.busy = false;
    }
  }

  function startPolling() {
    clearInterval(timer);
    timer = setInterval(() => {
      if (!document.hidden) refresh();
    }, REFRESH_MS);
  }

  // ---------- views ----------

  function notFound() {
    append(app, h("h2", {}, "Not found"), h("p", {}, h("a", { href: "#/" }, "Back to the overview")));
    return null;
  }

  function overview() {
    const cards = h("div", { class: "cards", id: "overview-cards" });
    const chart = h("div", { class: "chart", id: "throughput-chart" });
    const qbox = h("div", { id: "overview-queues" });
    append(app,
      h("h2", {}, "Overview"),
      cards,
      h("h3", {}, "Throughput and failure rate, last 10 minutes"),
      chart,
      h("h3", {}, "Queues"),
      qbox);
    return {
      async refresh() {
        const [st, qs, ns] = await Promise.all([api("/stats?minutes=10&step=10"), api("/queues"), api("/nodes")]);
        const b = st.buckets;
        const sum = (k) => b.reduce((a, x) => a + x[k], 0);
        const done = sum("completed"), failed = sum("failed"), retried = sum("retried");
        const attempts = done + failed + retried;
        // The last whole bucket gives the current rate.
        const last = b.length > 1 ? b[b.length - 2] : null;
        const rate = last ? (last.completed + last.failed) / st.step_seconds : 0;
        const live = qs.queues.reduce((a, q) => {
          a.available += q.counts.available; a.running += q.counts.running;
          a.scheduled += q.counts.scheduled + q.counts.retryable; a.failed += q.counts.failed;
          return a;
        }, { available: 0, running: 0, scheduled: 0, failed: 0 });
        const leader = ns.nodes.find((n) => n.leader);
        const busyW = ns.nodes.reduce((a, n) => a + n.workers_busy, 0);
        const totalW = ns.nodes.reduce((a, n) => a + n.workers, 0);
        replace(cards,
          card("Tasks/s now", rate.toFixed(1), "completed + failed, last " + st.step_seconds + " s"),
          card("Completed", fmtNum(done), "last 10 min"),
          card("Failure rate", attempts ? (100 * (failed + retried) / attempts).toFixed(1) + " %" : "—",
            fmtNum(failed) + " dead, " + fmtNum(retried) + " retried"),
          card("Available", fmtNum(live.available), fmtNum(live.scheduled) + " scheduled or retrying"),
          card("Running", fmtNum(live.running), busyW + " of " + totalW + " workers busy"),
          card("Dead letters", fmtNum(live.failed), h("a", { href: "#/dead" }, "review")),
          card("Nodes", String(ns.nodes.length), leader ? "leader " + leader.name : "no leader"));
        replace(chart, throughputChart(b, st.step_seconds, chart.clientWidth - 20));
        replace(qbox, queueTable(qs.queues, false));
      },
    };
  }

  function card(title, value, note) {
    return h("div", { class: "card" },
      h("div", { class: "card-title" }, title),
      h("div", { class: "card-value" }, value),
      h("div", { class: "card-note" }, note));
  }

  // Stacked bars (completed, retried, failed) per bucket and a failure-rate line.
  function throughputChart(buckets, step, width) {
    const W = Math.max(360, Math.round(width || 720)), H = 220, L = 56, R = 48, T = 10, B = 24;
    const iw = W - L - R, ih = H - T - B;
    const total = (x) => x.completed + x.failed + x.retried;
    const max = niceCeil(Math.max(2, ...buckets.map(total)));
    const n = Math.max(1, buckets.length);
    const bw = iw / n;
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "throughput chart", class: "chart-svg" });
    svg.appendChild(s("title", {}, "Tasks finished per " + step + " s (bars) and failure rate (line)"));
    for (const f of [0, 0.5, 1]) {
      const y = T + ih - f * ih;
      svg.appendChild(s("line", { x1: L, x2: L + iw, y1: y, y2: y, class: "grid" }));
      svg.appendChild(s("text", { x: L - 6, y: y + 4, class: "axis", "text-anchor": "end" }, (Number.isInteger(f * max) ? fmtNum(f * max) : (f * max).toFixed(1))));
      svg.appendChild(s("text", { x: L + iw + 6, y: y + 4, class: "axis rate" }, Math.round(f * 100) + "%"));
    }
    const pts = [];
    buckets.forEach((x, i) => {
      let y = T + ih;
      for (const [k, cls] of [["completed", "bar-ok"], ["retried", "bar-retry"], ["failed", "bar-fail"]]) {
        const hgt = (x[k] / max) * ih;
        if (hgt > 0) {
          y -= hgt;
          const r = s("rect", { x: L + i * bw + 1, y, width: Math.max(1, bw - 2), height: hgt, class: cls });
          r.appendChild(s("title", {}, fmtTime(x.at) + ": " + x[k] + " " + k));
          svg.appendChild(r);
        }
      }
      const t = total(x);
      if (t > 0) pts.push([L + i * bw + bw / 2, T + ih - ((x.failed + x.retried) / t) * ih]);
    });
    if (pts.length > 1) {
      svg.appendChild(s("polyline", { points: pts.map((p) => p.join(",")).join(" "), class: "rate-line" }));
    }
    if (buckets.length) {
      svg.appendChild(s("text", { x: L, y: H - 6, class: "axis" }, ago(buckets[0].at)));
      svg.appendChild(s("text", { x: L + iw, y: H - 6, class: "axis", "text-anchor": "end" }, "now"));
    }
    const legend = h("div", { class: "legend" },
      h("span", { class: "key bar-ok" }), "completed ",
      h("span", { class: "key bar-retry" }), "retried ",
      h("span", { class: "key bar-fail" }), "failed ",
      h("span", { class: "key rate-line" }), "failure rate");
    return [svg, legend];
  }

  // The smallest 1, 2 or 5 times a power of ten that is >= n.
  function niceCeil(n) {
    const p = Math.pow(10, Math.floor(Math.log10(n)));
    for (const m of [1, 2, 5, 10]) if (m * p >= n) return m * p;
    return 10 * p;
  }

  function count(q, st) {
    const n = fmtNum(q.counts[st]);
    return (q.capped || []).includes(st) ? n + "+" : n;
  }

  function queueTable(list, withButtons) {
    const head = ["Queue", "Status"].concat(withButtons ? ["Workers", "Max depth", "Limits"] : [], STATES, withButtons ? [""] : []);
    return h("table", { class: "data", id: withButtons ? "queues-table" : null },
      h("thead", {}, h("tr", {}, head.map((t) => h("th", {}, t)))),
      h("tbody", {}, list.map((q) => h("tr", { dataset: { queue: q.name } },
        h("td", {}, h("a", { href: "#/tasks?queue=" + encodeURIComponent(q.name) }, q.name)),
        h("td", {}, h("span", { class: q.paused ? "badge paused" : "badge active", "data-paused": String(q.paused) },
          q.paused ? "paused" : "active")),
        withButtons ? h("td", {}, q.concurrency == null ? "—" : String(q.concurrency)) : null,
        withButtons ? h("td", { class: "num max-depth" }, q.max_depth == null ? "—" : String(q.max_depth)) : null,
        withButtons ? h("td", { class: "limits" }, limitsText(q)) : null,
        STATES.map((st) => h("td", { class: "num" },
          q.counts[st] ? h("a", { href: "#/tasks?queue=" + encodeURIComponent(q.name) + "&state=" + st }, count(q, st)) : "0")),
        withButtons ? h("td", {}, h("button", {
          type: "button",
          class: (q.paused ? "resume" : "pause") + " act",
          onclick: () => act((q.paused ? "Resumed " : "Paused ") + q.name,
            () => api("/queues/" + encodeURIComponent(q.name) + (q.paused ? "/resume" : "/pause"), { method: "POST" })),
        }, q.paused ? "Resume" : "Pause")) : null))));
  }

  // A queue's shared limits in a few words.
  function limitsText(q) {
    const parts = [];
    if (q.global_concurrency != null) parts.push("global " + q.global_concurrency);
    if (q.per_key_concurrency != null) parts.push("per key " + q.per_key_concurrency);
    if (q.rate_limit) parts.push(q.rate_limit.max + " per " + dur(q.rate_limit.per_ms));
    if (q.fairness === "round_robin") parts.push("round robin");
    return parts.length ? parts.join(", ") : "—";
  }

  // Settings shared by the cluster (PATCH /queues/{name}); outside the
  // table, which is redrawn every 2 s, so typing is not lost. Naming a
  // queue fills in its current settings (fields not yet typed in); Save
  // sends them all, an empty field removing that limit.
  function queueSettingsForm() {
    const name = h("input", { name: "queue", placeholder: "queue", required: true, size: 16 });
    const num = (n, ph) => h("input", { name: n, type: "number", min: "1", placeholder: ph, size: 8 });
    const fields = {
      max_depth: num("max_depth", "no cap"),
      workers: num("workers", "configured"),
      global_concurrency: num("global_concurrency", "no limit"),
      per_key_concurrency: num("per_key_concurrency", "no limit"),
      rate_max: num("rate_max", "no limit"),
      rate_per_ms: num("rate_per_ms", "ms"),
    };
    const fairness = h("select", { name: "fairness" },
      h("option", { value: "none" }, "none"), h("option", { value: "round_robin" }, "round robin"));
    const typed = new Set();
    for (const [k, el] of Object.entries(fields)) el.addEventListener("input", () => typed.add(k));
    fairness.addEventListener("change", () => typed.add("fairness"));
    name.addEventListener("change", async () => {
      const q = name.value.trim();
      if (!q) return;
      try {
        const cur = await api("/queues/" + encodeURIComponent(q));
        const put = (k, v) => { if (!typed.has(k)) fields[k].value = v == null ? "" : String(v); };
        put("max_depth", cur.max_depth);
        put("workers", cur.workers);
        put("global_concurrency", cur.global_concurrency);
        put("per_key_concurrency", cur.per_key_concurrency);
        put("rate_max", cur.rate_limit ? cur.rate_limit.max : null);
        put("rate_per_ms", cur.rate_limit ? cur.rate_limit.per_ms : null);
        if (!typed.has("fairness")) fairness.value = cur.fairness === "round_robin" ? "round_robin" : "none";
      } catch (_) { /* a new queue: nothing to fill in */ }
    });
    return h("form", {
      class: "filters act", id: "queue-settings",
      onsubmit: (ev) => {
        ev.preventDefault();
        const q = name.value.trim();
        if (!q) { flash("Name a queue", "error"); return; }
        const val = (k) => { const v = fields[k].value.trim(); return v === "" ? null : Number(v); };
        const body = {
          max_depth: val("max_depth"),
          workers: val("workers"),
          global_concurrency: val("global_concurrency"),
          per_key_concurrency: val("per_key_concurrency"),
          rate_limit: val("rate_max") == null ? null : { max: val("rate_max"), per_ms: val("rate_per_ms") || 1000 },
          fairness: fairness.value,
        };
        typed.clear();
        act("Saved " + q + " settings",
          () => api("/queues/" + encodeURIComponent(q), { method: "PATCH", body }));
      },
    },
    h("label", {}, "Queue ", name),
    h("label", {}, "Max depth ", fields.max_depth),
    h("label", {}, "Workers/node ", fields.workers),
    h("label", {}, "Global ", fields.global_concurrency),
    h("label", {}, "Per key ", fields.per_key_concurrency),
    h("label", {}, "Rate ", fields.rate_max, " per ", fields.rate_per_ms, " ms"),
    h("label", {}, "Fairness ", fairness),
    h("button", { type: "submit" }, "Save"));
  }

  function queues() {
    const box = h("div");
    append(app, h("h2", {}, "Queues"),
      h("p", { class: "hint" }, "Counts stop at 100,000 for unfinished and 10,000 for finished states (shown with +). Max depth: at most that many unfinished tasks; enqueues past it are refused. Settings are shared by every node, which applies a change within a poll interval; an empty field removes that limit (workers: back to each node's configured count)."),
      box, queueSettingsForm());
    return {
      async refresh() {
        const qs = await api("/queues");
        replace(box, qs.queues.length ? queueTable(qs.queues, true) : h("p", {}, "No queues yet."));
      },
    };
  }

  function taskActions(t) {
    const out = [];
    if (!FINISHED.has(t.state)) {
      out.push(h("button", {
        type: "button", class: "cancel act",
        onclick: () => act("Cancelled task " + t.id, () => api("/tasks/" + t.id + "/cancel", { method: "POST" })),
      }, "Cancel"));
    }
    if (FINISHED.has(t.state)) {
      out.push(h("button", {
        type: "button", class: "retry act",
        onclick: () => act("Retrying task " + t.id, () => api("/tasks/" + t.id + "/retry", { method: "POST" })),
      }, "Retry"));
    }
    return out;
  }

  // A page of tasks with a cursor stack for Newer/Older.
  function pager(load, render) {
    const stack = [];
    let cursor = null;
    let next = null;
    const body = h("div");
    const newer = h("button", { type: "button", onclick: () => { cursor = stack.pop() || null; refresh(); } }, "← Newer");
    const older = h("button", { type: "button", onclick: () => { stack.push(cursor); cursor = next; refresh(); } }, "Older →");
    const nav = h("div", { class: "pager" }, newer, older);
    return {
      el: [body, nav],
      reset() { stack.length = 0; cursor = null; },
      async refresh() {
        const r = await load(cursor);
        next = r.next_cursor;
        newer.disabled = stack.length === 0 && cursor === null;
        older.disabled = !next;
        replace(body, render(r.tasks));
      },
    };
  }

  function taskRows(list, selectable, selected) {
    if (!list.length) return h("p", { class: "empty" }, "No tasks.");
    return h("table", { class: "data tasks", id: "tasks-table" },
      h("thead", {}, h("tr", {},
        selectable ? h("th", {}, h("input", {
          type: "checkbox", "aria-label": "select all",
          onchange: (ev) => {
            for (const t of list) { if (ev.target.checked) selected.add(t.id); else selected.delete(t.id); }
            for (const c of document.querySelectorAll("input.pick")) c.checked = ev.target.checked;
          },
        })) : null,
        ["ID", "Kind", "Queue", "State", "Progress", "Attempt", "Created", "Args", "Last error", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, list.map((t) => {
        const lastErr = t.errors && t.errors.length ? t.errors[t.errors.length - 1].message : "";
        return h("tr", { dataset: { id: String(t.id) } },
          selectable ? h("td", {}, h("input", {
            type: "checkbox", class: "pick", checked: selected.has(t.id), "aria-label": "select task " + t.id,
            onchange: (ev) => { if (ev.target.checked) selected.add(t.id); else selected.delete(t.id); },
          })) : null,
          h("td", {}, h("a", { href: "#/task/" + t.id }, String(t.id))),
          h("td", {}, t.kind, tagChips(t.tags)),
          h("td", {}, t.queue),
          h("td", {}, badge(t.state)),
          h("td", { class: "prog" }, progressView(t.progress, 40)),
          h("td", { class: "num" }, t.attempt + "/" + t.max_attempts),
          h("td", { title: fmtTime(t.created_at) }, ago(t.created_at)),
          h("td", { class: "args" }, preview(t.args, 80)),
          h("td", { class: "err" }, lastErr.length > 80 ? lastErr.slice(0, 80) + "…" : lastErr),
          h("td", {}, taskActions(t)));
      })));
  }

  // A task's tags, each a link to the list of tasks with that tag.
  function tagChips(tags) {
    if (!tags || !tags.length) return null;
    return h("span", { class: "tags" }, tags.map((t) =>
      h("a", { class: "tag", href: "#/tasks?" + new URLSearchParams({ tag: t }) }, t)));
  }

  function tasks(_parts, params) {
    const f = {
      state: params.get("state") || "",
      queue: params.get("queue") || "",
      kind: params.get("kind") || "",
      tag: params.get("tag") || "",
      args: params.get("args") || "",
    };
    const keys = ["state", "queue", "kind", "tag", "args"];
    const form = h("form", { class: "filters", id: "task-filters" },
      h("label", {}, "State ", h("select", { name: "state" },
        h("option", { value: "" }, "any"),
        STATES.map((st) => h("option", { value: st, selected: st === f.state }, st)))),
      h("label", {}, "Queue ", h("input", { name: "queue", value: f.queue, size: 12 })),
      h("label", {}, "Kind ", h("input", { name: "kind", value: f.kind, size: 12 })),
      h("label", {}, "Tag ", h("input", { name: "tag", value: f.tag, size: 14, placeholder: "customer:42" })),
      h("label", { title: "Tasks whose args contain this JSON object" }, "Args ",
        h("input", { name: "args", value: f.args, size: 18, placeholder: '{"user":{"id":42}}' })),
      h("button", { type: "submit" }, "Filter"));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const p = new URLSearchParams();
      for (const k of keys) {
        const v = form.elements[k].value.trim();
        if (v) p.set(k, v);
      }
      location.hash = "#/tasks" + (p.toString() ? "?" + p : "");
    });
    const pg = pager(
      (cursor) => {
        const p = new URLSearchParams({ limit: "50" });
        for (const k of keys) if (f[k]) p.set(k, f[k]);
        if (cursor) p.set("cursor", cursor);
        return api("/tasks?" + p);
      },
      (list) => taskRows(list, false));
    append(app, h("h2", {}, "Tasks"), form, pg.el);
    return pg;
  }

  function task(parts) {
    const id = parts[0] || "";
    const box = h("div", { id: "task-detail" });
    append(app, h("p", {}, h("a", { href: "#/tasks" }, "← Tasks")), box);
    return {
      async refresh() {
        const t = await api("/tasks/" + encodeURIComponent(id));
        const rows = [
          ["State", badge(t.state)],
          ["Progress", t.progress == null ? "—" : h("span", { id: "task-progress" }, progressView(t.progress, 200))],
          ["Kind", t.kind],
          ["Queue", t.queue],
          ["Priority", String(t.priority)],
          ["Attempt", t.attempt + " of " + t.max_attempts],
          ["Node", t.node || "—"],
          ["Unique key", t.unique_key || "—"],
          ["Concurrency key", t.concurrency_key || "—"],
          ["Tags", tagChips(t.tags) || "—"],
          ["Timeout", t.timeout_ms ? dur(t.timeout_ms) : "—"],
          ["Depends on", t.depends_on && t.depends_on.length
            ? t.depends_on.map((d) => [h("a", { href: "#/task/" + d }, String(d)), " "]) : "—"],
        ];
        // Every attempt's end that left an error, then the current attempt.
        const steps = [["created", t.created_at]]
          .concat((t.errors || []).map((e) => ["attempt " + e.attempt + " failed", e.at]))
          .concat([[t.attempt > 0 ? "due (attempt " + t.attempt + ")" : "due", t.run_at],
            ["started", t.started_at], ["finished", t.finished_at]])
          .filter(([, at]) => at)
          .sort((a, b) => new Date(a[1]) - new Date(b[1]));
        let prev = null;
        const timeline = h("ol", { class: "timeline" }, steps.map(([label, at]) => {
          const d = prev ? " (+" + dur(Math.max(0, new Date(at) - new Date(prev))) + ")" : "";
          prev = at;
          return h("li", {}, h("strong", {}, label), " ", fmtTime(at), d);
        }));
        replace(box,
          h("h2", {}, "Task " + t.id + " ", badge(t.state)),
          h("div", { class: "actions" }, taskActions(t)),
          h("table", { class: "kv" }, h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v))))),
          h("h3", {}, "Timeline"), timeline,
          h("h3", {}, "Args"), h("pre", { class: "json", id: "task-args" }, json(t.args)),
          h("h3", {}, "Result"), h("pre", { class: "json", id: "task-result" }, t.result == null ? "—" : json(t.result)),
          h("h3", {}, "Errors"),
          t.errors && t.errors.length
            ? h("table", { class: "data", id: "task-errors" },
              h("thead", {}, h("tr", {}, h("th", {}, "Attempt"), h("th", {}, "At"), h("th", {}, "Error"))),
              h("tbody", {}, t.errors.map((e) => h("tr", {},
                h("td", { class: "num" }, String(e.attempt)), h("td", {}, fmtTime(e.at)), h("td", {}, h("pre", { class: "err" }, e.message))))))
            : h("p", { class: "empty" }, "No errors."));
      },
    };
  }

  function dead() {
    const selected = new Set();
    const toolbar = h("div", { class: "toolbar" },
      h("button", {
        type: "button", id: "retry-selected", class: "act",
        onclick: () => {
          if (!selected.size) { flash("Select tasks first", "error"); return; }
          const ids = Array.from(selected);
          act("Retried " + ids.length + " tasks", async () => {
            const r = await api("/tasks/retry", { method: "POST", body: { ids } });
            selected.clear();
            if (r.errors.length) throw new Error(r.errors.length + " could not be retried: " + r.errors[0].message);
            return r;
          });
        },
      }, "Retry selected"),
      h("button", {
        type: "button", id: "retry-page", class: "act",
        onclick: () => {
          const ids = Array.from(document.querySelectorAll("#tasks-table tbody tr")).map((r) => r.dataset.id);
          if (!ids.length) return;
          act("Retried " + ids.length + " tasks", () => api("/tasks/retry", { method: "POST", body: { ids } }));
        },
      }, "Retry all on this page"));
    const pg = pager(
      (cursor) => api("/tasks?state=failed&limit=50" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : "")),
      (list) => taskRows(list, true, selected));
    append(app, h("h2", {}, "Dead letters"),
      h("p", { class: "hint" }, "Tasks that failed for good. Retry puts them back with one more attempt."),
      toolbar, pg.el);
    return pg;
  }

  function nodes() {
    const box = h("div");
    append(app, h("h2", {}, "Nodes"), box);
    return {
      async refresh() {
        const r = await api("/nodes");
        replace(box, h("table", { class: "data", id: "nodes-table" },
          h("thead", {}, h("tr", {}, ["Node", "Role", "Version", "Started", "Heartbeat", "Workers", "Queues", "Completed", "Failed"].map((t) => h("th", {}, t)))),
          h("tbody", {}, r.nodes.map((n) => h("tr", { dataset: { node: n.name } },
            h("td", {}, n.name),
            h("td", {}, n.leader ? h("span", { class: "badge leader" }, "leader") : "follower"),
            h("td", {}, n.version),
            h("td", { title: fmtTime(n.started_at) }, ago(n.started_at)),
            h("td", { class: n.heartbeat_age_ms > 10000 ? "err" : "" }, (n.heartbeat_age_ms / 1000).toFixed(1) + " s ago"),
            h("td", {}, h("meter", { min: 0, max: Math.max(1, n.workers), value: n.workers_busy }), " " + n.workers_busy + "/" + n.workers),
            h("td", {}, (n.queues || []).join(", ")),
            h("td", { class: "num" }, fmtNum(n.stats && n.stats.completed)),
            h("td", { class: "num" }, fmtNum(n.stats && n.stats.failed)))))));
      },
    };
  }

  function audit() {
    const box = h("div");
    append(app, h("h2", {}, "Audit trail"),
      h("p", { class: "hint" }, "Operator actions on the cluster, newest first: who, from where, and how it went."),
      box);
    return {
      async refresh() {
        const r = await api("/audit?limit=100");
        replace(box, r.entries.length ? h("table", { class: "data", id: "audit-table" },
          h("thead", {}, h("tr", {}, ["When", "Token", "From", "Action", "Target", "Outcome"].map((t) => h("th", {}, t)))),
          h("tbody", {}, r.entries.map((e) => h("tr", { dataset: { id: String(e.id) } },
            h("td", { title: fmtTime(e.at) }, ago(e.at)),
            h("td", {}, e.token),
            h("td", {}, e.remote),
            h("td", {}, e.action),
            h("td", {}, e.target),
            h("td", { class: e.status >= 400 ? "err" : "" }, e.status + " " + e.outcome))))) : h("p", {}, "No operator actions yet."));
      },
    };
  }

  // Pause or Resume, and Run now (the operate role; hidden for read).
  function scheduleActions(x) {
    const path = "/schedules/" + encodeURIComponent(x.name);
    return [
      x.paused
        ? h("button", { type: "button", class: "resume act", onclick: () => act("Resumed " + x.name, () => api(path + "/resume", { method: "POST" })) }, "Resume")
        : h("button", { type: "button", class: "pause act", onclick: () => act("Paused " + x.name, () => api(path + "/pause", { method: "POST" })) }, "Pause"),
      h("button", {
        type: "button", class: "trigger act",
        onclick: () => act("Started " + x.name, () => api(path + "/trigger", { method: "POST" })),
      }, "Run now"),
    ];
  }

  function schedules() {
    const box = h("div");
    append(app, h("h2", {}, "Schedules"), box);
    return {
      async refresh() {
        const r = await api("/schedules");
        replace(box, r.schedules.length ? h("table", { class: "data", id: "schedules-table" },
          h("thead", {}, h("tr", {}, ["Name", "Cron", "Time zone", "Kind", "Queue", "Next run", "Last tick", "Overlap", "Catch up", "Source", ""].map((t) => h("th", {}, t)))),
          h("tbody", {}, r.schedules.map((x) => h("tr", { dataset: { schedule: x.name } },
            h("td", {}, x.name, x.paused ? [" ", h("span", { class: "badge st-paused", "data-paused": "true" }, "paused")] : null),
            h("td", {}, h("code", {}, x.cron)), h("td", {}, x.timezone || "UTC"),
            h("td", {}, x.kind), h("td", {}, x.queue || "default"),
            h("td", { title: fmtTime(x.next_run) }, x.paused ? "paused" : x.next_run ? ago(x.next_run) : "—"),
            h("td", { title: fmtTime(x.last_tick) }, ago(x.last_tick)),
            h("td", {}, x.overlap || ""), h("td", {}, x.catch_up || ""), h("td", {}, x.source),
            h("td", { class: "actions" }, scheduleActions(x)))))) : h("p", { class: "empty" }, "No schedules."));
      },
    };
  }

  // ---------- start ----------

  // A bug here should say so on the page rather than leave it blank.
  window.addEventListener("error", (ev) => flash("Dashboard error: " + ev.message, "error"));
  window.addEventListener("unhandledrejection", (ev) => {
    if (!(ev.reason instanceof AuthError)) flash("Dashboard error: " + (ev.reason && ev.reason.message), "error");
  });

  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  if (document.body.dataset.auth === "true" && !sessionStorage.getItem(TOKEN_KEY)) {
    showLogin("");
  } else {
    logout.hidden = document.body.dataset.auth !== "true";
    route();
  }
  startPolling();
})();
