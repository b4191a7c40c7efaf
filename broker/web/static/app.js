// The taskbroker dashboard: polls the JSON API (README, "Dashboard") and renders it.
// Every piece of data reaches the page through textContent or DOM properties, never as HTML.
"use strict";

const POLL_MS = 2500; // the server refreshes its stats snapshot at most every 2 s
const DEAD_PAGE_SIZE = 20;

const AUDIT_PAGE_SIZE = 50;
const KEYS_PAGE_SIZE = 20;
const SCHEDULES_SHOWN = 100;

const state = {
  admin: false,
  csrf: "", // the session's CSRF token (with a policy file), sent on every POST
  audit: false,
  queues: new Map(), // queue name -> latest queue JSON
  rows: new Map(), // queue name -> <tr>
  historySince: 0,
  history: { t: [], enq: [], done: [], mean: [], p95: [] },
  charts: { throughput: null, wait: null },
  dead: { queue: "", tokens: [""], count: null },
  keys: { queue: "", tokens: [""], next: "" },
};

// --- small helpers ----------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "class") node.className = value;
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : String(child));
    }
  }
  return node;
}

function fmtRate(value) {
  if (value === null || value === undefined) return "—";
  return value >= 100 ? value.toFixed(0) : value.toFixed(value >= 10 ? 1 : 2);
}

function fmtAge(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const m = Math.floor(seconds / 60);
  if (m < 60) return `${m} m ${Math.floor(seconds % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} m`;
}

function fmtTime(ms) {
  return ms ? new Date(ms).toLocaleString() : "—";
}

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

let noticeTimer = null;

function notice(text) {
  const box = $("notice");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => {
    box.hidden = true;
  }, 5000);
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  if (response.status === 401 && path !== "/api/logout") {
    window.location.assign("/login"); // the session ended (expired, logged out, token revoked)
  }
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return body;
}

function post(path, body = {}) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": state.csrf },
    body: JSON.stringify(body),
  });
}

function confirmAction(text, okLabel) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  $("confirm-ok").textContent = okLabel;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

async function adminAction(action) {
  try {
    await action();
    showMessage("");
  } catch (error) {
    showMessage(error.message);
  }
  await refresh();
  await loadDead();
}

function adminButton(label, title, onClick, extraClass = "") {
  const button = el("button", { type: "button", class: `admin ${extraClass}`.trim() }, label);
  button.title = title;
  button.addEventListener("click", onClick);
  applyAdmin(button);
  return button;
}

const DISABLED_TITLE = "Admin actions are disabled: start the broker with TASKBROKER_DASHBOARD_ADMIN=1";

function applyAdmin(button) {
  button.disabled = !state.admin;
  if (!state.admin) button.title = DISABLED_TITLE;
}

// --- queues ---------------------------------------------------------------------------------

function queueRow(name) {
  const cells = {};
  const row = el("tr", { dataset: { queue: name } });
  const nameCell = el("td", { class: "name" }, name);
  row.append(nameCell);
  for (const field of ["pending", "waiting", "scheduled", "leased", "dead", "enq", "done", "oldest"]) {
    cells[field] = el("td", { class: "num", dataset: { field } });
    row.append(cells[field]);
  }
  cells.limits = el("td", { class: "limits", dataset: { field: "limits" } });
  row.append(cells.limits);
  cells.state = el("td", { dataset: { field: "state" } });
  row.append(cells.state);
  const toggle = adminButton("Pause", "", () =>
    adminAction(() => {
      const paused = state.queues.get(name).paused;
      return post(`/api/queues/${encodeURIComponent(name)}/${paused ? "resume" : "pause"}`);
    }),
  );
  toggle.dataset.action = "toggle-pause";
  const deadLink = el("button", { type: "button", class: "link" }, "dead letters");
  deadLink.addEventListener("click", () => {
    $("dead-queue").value = name;
    selectDeadQueue(name);
    $("dead-section").scrollIntoView({ behavior: "smooth" });
  });
  const keysLink = el("button", { type: "button", class: "link" }, "keys");
  keysLink.addEventListener("click", () => {
    $("keys-queue").value = name;
    selectKeysQueue(name);
    $("keys-section").scrollIntoView({ behavior: "smooth" });
  });
  row.append(el("td", { class: "actions" }, toggle, deadLink, keysLink));
  row.cells_ = cells;
  row.toggle_ = toggle;
  return row;
}

function renderQueues(queues) {
  const body = $("queues").tBodies[0];
  const seen = new Set();
  for (const q of queues) {
    seen.add(q.queue);
    state.queues.set(q.queue, q);
    let row = state.rows.get(q.queue);
    if (!row) {
      row = queueRow(q.queue);
      state.rows.set(q.queue, row);
      body.append(row);
    }
    const c = row.cells_;
    c.pending.textContent = q.counts.pending;
    c.waiting.textContent = q.counts.waiting;
    c.scheduled.textContent = q.counts.scheduled;
    c.leased.textContent = q.counts.leased;
    c.dead.textContent = q.counts.dead;
    c.enq.textContent = fmtRate(q.rates.enqueued_per_s);
    c.done.textContent = fmtRate(q.rates.completed_per_s);
    c.oldest.textContent = fmtAge(q.oldest_pending_age_s);
    c.limits.textContent = fmtLimits(q.limits);
    c.state.textContent = q.paused ? "paused" : "active";
    c.state.className = q.paused ? "paused" : "";
    row.toggle_.textContent = q.paused ? "Resume" : "Pause";
    if (state.admin) row.toggle_.title = q.paused ? "Resume leasing" : "Stop leasing (tasks stay queued)";
  }
  for (const [name, row] of state.rows) {
    if (!seen.has(name)) {
      row.remove();
      state.rows.delete(name);
      state.queues.delete(name);
    }
  }
  $("no-queues").hidden = queues.length > 0;
  renderDeadQueueOptions();
  renderKeysQueueOptions();
}

function fmtPerSecond(limit) {
  return `${fmtRate(limit.per_second)}/s burst ${limit.burst}`;
}

// One line per queue: only the limits that are set (docs/limits.md).
function fmtLimits(l) {
  const parts = [];
  if (l.max_concurrency) parts.push(`max ${l.max_concurrency} leased`);
  if (l.rate_limit) parts.push(`rate ${fmtPerSecond(l.rate_limit)} (${l.rate_limit_tokens.toFixed(1)} tokens)`);
  if (l.enqueue_rate_limit) parts.push(`enqueue ${fmtPerSecond(l.enqueue_rate_limit)}`);
  if (l.per_key_max_concurrency) parts.push(`per key ${l.per_key_max_concurrency} leased`);
  if (l.per_key_rate_limit) parts.push(`per key ${fmtPerSecond(l.per_key_rate_limit)}`);
  if (l.group_keys_pending) parts.push(`${l.group_keys_pending} keys waiting, ${l.group_keys_parked} parked`);
  return parts.length ? parts.join(" · ") : "—";
}

// --- group keys -----------------------------------------------------------------------------

function renderKeysQueueOptions() {
  const select = $("keys-queue");
  const names = [...state.queues.keys()].sort();
  if ([...select.options].map((o) => o.value).join("\n") !== names.join("\n")) {
    const chosen = select.value;
    select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    if (names.includes(chosen)) select.value = chosen;
  }
  if (!state.keys.queue && names.length) {
    const grouped = names.find((n) => state.queues.get(n).limits.group_keys_pending > 0) || names[0];
    select.value = grouped;
    selectKeysQueue(grouped);
  }
}

function selectKeysQueue(name) {
  state.keys.queue = name;
  state.keys.tokens = [""];
  loadKeys();
}

async function loadKeys() {
  const queue = state.keys.queue;
  if (!queue) return;
  const token = state.keys.tokens[state.keys.tokens.length - 1];
  const query = new URLSearchParams({ page_size: KEYS_PAGE_SIZE, page_token: token });
  const page = await api(`/api/queues/${encodeURIComponent(queue)}/keys?${query}`);
  if (queue !== state.keys.queue) return; // another queue was chosen meanwhile
  state.keys.next = page.next_page_token;
  $("keys").tBodies[0].replaceChildren(
    ...page.keys.map((k) =>
      el(
        "tr",
        { dataset: { key: k.group_key } },
        el("td", { class: "mono" }, k.group_key),
        el("td", {}, k.state.toLowerCase().replace("_", " ")),
        el("td", { class: "num" }, k.pending),
        el("td", { class: "num" }, k.leased),
        el("td", { class: "num" }, fmtAge(k.oldest_pending_age_s)),
      ),
    ),
  );
  const waiting = page.ready_keys + page.parked_keys + page.rate_limited_keys;
  let totals = `${waiting} keys with pending tasks: ${page.parked_keys} parked, ` +
    `${page.rate_limited_keys} rate limited; ${page.keys_with_leases} with leases`;
  if (page.scanned_keys >= 10000) totals += ` (ranked over the first ${page.scanned_keys} read)`;
  $("keys-totals").textContent = totals;
  $("no-keys").hidden = page.keys.length > 0;
  $("keys-next").disabled = !page.next_page_token;
  $("keys-first").disabled = state.keys.tokens.length === 1;
}

// --- schedules ------------------------------------------------------------------------------

async function loadSchedules() {
  const page = await api(`/api/schedules?page_size=${SCHEDULES_SHOWN}`);
  $("schedules").tBodies[0].replaceChildren(
    ...page.schedules.map((s) =>
      el(
        "tr",
        { dataset: { schedule: s.name } },
        el("td", {}, s.name),
        el("td", {}, s.queue),
        el("td", { class: "mono" }, s.cron),
        el("td", {}, s.time_zone),
        el("td", {}, s.paused ? "—" : fmtTime(s.next_fire_time_ms)),
        el("td", {}, s.last_task_id ? taskLink(s.last_task_id) : "—"),
        el("td", { class: s.paused ? "paused" : "" }, s.paused ? "paused" : "active"),
      ),
    ),
  );
  $("no-schedules").hidden = page.schedules.length > 0;
  $("schedules-capped").hidden = !page.next_page_token;
  $("schedules-capped").textContent = `The first ${SCHEDULES_SHOWN} schedules by name are shown.`;
}

// --- workers --------------------------------------------------------------------------------

function renderWorkers(workers) {
  const body = $("workers").tBodies[0];
  body.replaceChildren(
    ...workers.map((w) =>
      el(
        "tr",
        { dataset: { stream: w.stream_id } },
        el("td", {}, w.worker_id || "(no id)"),
        el("td", { class: "mono" }, w.stream_id),
        el("td", {}, w.queues.join(", ")),
        el("td", { class: "num" }, w.credits),
        el("td", { class: "num" }, w.in_flight),
        el("td", {}, fmtTime(w.connected_since_ms)),
      ),
    ),
  );
  $("no-workers").hidden = workers.length > 0;
}

// --- charts ---------------------------------------------------------------------------------

// The charts show the last HISTORY_S seconds, as the broker keeps (broker/web/sampler.py).
const HISTORY_S = 15 * 60;

// The time axis always spans the last HISTORY_S seconds, ending now (or at the newest point,
// should the broker's clock run ahead of the browser's). Left to itself, uPlot picks a range
// from the data, and with none yet it shows a meaningless span of years.
function timeRange(_u, _min, max) {
  const end = Math.max(Date.now() / 1000, Number.isFinite(max) ? max : 0);
  return [end - HISTORY_S, end];
}

// Rates and waits are never negative: start at 0, with 0 to 1 before there is any data.
function valueRange(_u, _min, max) {
  return [0, Number.isFinite(max) && max > 0 ? max * 1.1 : 1];
}

function makeChart(id, series) {
  const container = $(id);
  const options = {
    width: Math.max(container.clientWidth, 300),
    height: 180,
    scales: { x: { time: true, range: timeRange }, y: { range: valueRange } },
    axes: [{}, { size: 56 }],
    series: [{}, ...series],
  };
  const data = [[], ...series.map(() => [])];
  const chart = new uPlot(options, data, container);
  container.append(
    el("p", { class: "muted chart-empty", hidden: true }, "No data yet: the chart fills in as tasks flow."),
  );
  return chart;
}

function renderCharts(points) {
  const h = state.history;
  for (const p of points) {
    h.t.push(p.time_ms / 1000);
    h.enq.push(p.enqueued_per_s);
    h.done.push(p.completed_per_s);
    h.mean.push(p.wait_mean_s);
    h.p95.push(p.wait_p95_s);
    state.historySince = Math.max(state.historySince, p.time_ms);
  }
  const cutoff = Date.now() / 1000 - HISTORY_S;
  while (h.t.length && h.t[0] < cutoff) {
    for (const key of Object.keys(h)) h[key].shift();
  }
  if (typeof uPlot === "undefined") return;
  if (!state.charts.throughput) {
    state.charts.throughput = makeChart("chart-throughput", [
      { label: "enqueued/s", stroke: "#2f6fde", width: 2 },
      { label: "completed/s", stroke: "#1a9a5b", width: 2 },
    ]);
    state.charts.wait = makeChart("chart-wait", [
      { label: "mean", stroke: "#8a4fd8", width: 2 },
      { label: "p95", stroke: "#d8731f", width: 2 },
    ]);
  }
  state.charts.throughput.setData([h.t, h.enq, h.done]);
  state.charts.wait.setData([h.t, h.mean, h.p95]);
  for (const chart of Object.values(state.charts)) {
    chart.root.parentElement.querySelector(".chart-empty").hidden = h.t.length > 0;
  }
}

window.addEventListener("resize", () => {
  for (const [key, chart] of Object.entries(state.charts)) {
    if (chart) {
      const width = Math.max($(`chart-${key}`).clientWidth, 300);
      chart.setSize({ width, height: 180 });
    }
  }
});

// --- dead letters ---------------------------------------------------------------------------

function renderDeadQueueOptions() {
  const select = $("dead-queue");
  const names = [...state.queues.keys()].sort();
  const current = [...select.options].map((o) => o.value);
  if (current.join("\n") !== names.join("\n")) {
    const chosen = select.value;
    select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    if (names.includes(chosen)) select.value = chosen;
  }
  if (!state.dead.queue && names.length) {
    const withDead = names.find((n) => state.queues.get(n).counts.dead > 0) || names[0];
    select.value = withDead;
    selectDeadQueue(withDead);
  } else if (state.dead.queue && state.queues.has(state.dead.queue)) {
    const count = state.queues.get(state.dead.queue).counts.dead;
    if (count !== state.dead.count) loadDead(); // new dead letters, or some left
  }
}

function selectDeadQueue(name) {
  state.dead.queue = name;
  state.dead.tokens = [""];
  loadDead();
}

function errorList(errors) {
  return el(
    "ol",
    { class: "errors" },
    ...errors.map((e) =>
      el(
        "li",
        { value: e.attempt },
        el("span", { class: "muted" }, `attempt ${e.attempt}, ${fmtTime(e.time_ms)}: `),
        e.message,
      ),
    ),
  );
}

function taskLink(taskId) {
  const link = el("button", { type: "button", class: "link mono" }, taskId);
  link.addEventListener("click", () => showTask(taskId));
  return link;
}

async function loadDead() {
  const queue = state.dead.queue;
  if (!queue) return;
  const token = state.dead.tokens[state.dead.tokens.length - 1];
  const query = new URLSearchParams({ page_size: DEAD_PAGE_SIZE, page_token: token });
  let page;
  try {
    page = await api(`/api/queues/${encodeURIComponent(queue)}/dead?${query}`);
  } catch (error) {
    showMessage(error.message);
    return;
  }
  if (queue !== state.dead.queue) return; // another queue was picked meanwhile
  const stats = state.queues.get(queue);
  state.dead.count = stats ? stats.counts.dead : null;
  state.dead.next = page.next_page_token;
  const base = `/api/queues/${encodeURIComponent(queue)}/dead`;
  $("dead").tBodies[0].replaceChildren(
    ...page.tasks.map((t) =>
      el(
        "tr",
        { dataset: { task: t.task_id } },
        el("td", {}, taskLink(t.task_id)),
        el("td", {}, t.type),
        el("td", { class: "num" }, `${t.attempt} / ${t.max_attempts}`),
        el("td", {}, fmtTime(t.finish_time_ms)),
        el("td", {}, errorList(t.errors)),
        el(
          "td",
          { class: "actions" },
          adminButton("Redrive", "Back to pending with fresh attempts", () =>
            adminAction(() => post(`${base}/redrive`, { task_ids: [t.task_id] })),
          ),
          adminButton(
            "Delete",
            "Delete this dead letter",
            async () => {
              if (await confirmAction(`Delete dead letter ${t.task_id}?`, "Delete")) {
                await adminAction(() => post(`${base}/delete`, { task_ids: [t.task_id] }));
              }
            },
            "danger",
          ),
        ),
      ),
    ),
  );
  $("no-dead").hidden = page.tasks.length > 0;
  $("dead-next").disabled = !page.next_page_token;
  $("dead-first").disabled = state.dead.tokens.length <= 1;
  const total = state.dead.count || 0;
  $("dead-redrive-all").textContent = `Redrive all (${total})`;
  $("dead-delete-all").textContent = `Delete all (${total})`;
  for (const id of ["dead-redrive-all", "dead-delete-all"]) {
    applyAdmin($(id));
    if (state.admin) $(id).disabled = total === 0;
  }
}

async function onAll(verb) {
  const queue = state.dead.queue;
  const total = state.queues.has(queue) ? state.queues.get(queue).counts.dead : 0;
  const label = verb === "redrive" ? "Redrive" : "Delete";
  const text =
    verb === "redrive"
      ? `Redrive all ${total} dead letters of ${queue}? They go back to pending with fresh attempts.`
      : `Delete all ${total} dead letters of ${queue}? This cannot be undone.`;
  if (!(await confirmAction(text, `${label} ${total}`))) return;
  await adminAction(async () => {
    const result = await post(`/api/queues/${encodeURIComponent(queue)}/dead/${verb}`, { all: true });
    const count = verb === "redrive" ? result.redriven : result.deleted;
    state.dead.tokens = [""];
    notice(`${verb === "redrive" ? "Redrove" : "Deleted"} ${count} dead letters of ${queue}.`);
  });
}

// --- task detail ----------------------------------------------------------------------------

async function showTask(taskId) {
  $("task-id").value = taskId;
  let body;
  try {
    body = await api(`/api/tasks/${encodeURIComponent(taskId)}`);
  } catch (error) {
    showMessage(error.message);
    $("task-detail").hidden = true;
    return;
  }
  showMessage("");
  const t = body.task;
  const rows = [
    ["id", t.task_id],
    ["queue", t.queue],
    ["type", t.type],
    ["state", t.state],
    ["attempts", `${t.attempt} / ${t.max_attempts}`],
    ["priority", t.priority],
    ["created", fmtTime(t.create_time_ms)],
    ["ready / due", fmtTime(t.schedule_time_ms)],
    ["lease expires", fmtTime(t.lease_expire_time_ms)],
    ["finished", fmtTime(t.finish_time_ms)],
    ["payload", sizeText(t.payload_size, t.payload_key_id)],
    ["result", sizeText(t.result_size, t.result_key_id)],
  ];
  for (const [name, value] of Object.entries(t.headers || {})) rows.push([`header ${name}`, value]);
  $("task-fields").replaceChildren(
    ...rows.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]),
  );
  renderWorkflow(t.workflow);
  $("task-errors").replaceChildren(...errorList(t.errors).childNodes);
  const preview = t.result_preview; // null for an encrypted result
  $("task-result").textContent = preview ? preview.text : "";
  $("task-result").hidden = t.result_size === 0 || !preview;
  const notes = [];
  if (t.result_size === 0) notes.push("(empty)");
  if (!preview) notes.push(`(encrypted with key ${t.result_key_id}: the broker cannot read it)`);
  if (preview && preview.encoding === "hex") notes.push("(binary, as hex)");
  if (preview && preview.truncated) notes.push("(first 1 KiB)");
  $("task-result-note").textContent = notes.join(" ");
  $("task-detail").hidden = false;
  $("task-section").scrollIntoView({ behavior: "smooth" });
}

// A task's parents and children (task dependencies), each id a link to its own view, so a
// workflow can be walked. Only tasks of queues the caller may read are listed; results by size.
function renderWorkflow(w) {
  $("task-workflow").hidden = !w;
  if (!w) return;
  const parents = w.parents.map((p) =>
    el(
      "tr",
      { dataset: { task: p.task_id } },
      el("td", {}, taskLink(p.task_id)),
      el("td", {}, p.state || "gone"),
      el("td", { class: "num" }, p.result_size === null ? "—" : bytesText(p.result_size)),
      el("td", { class: "muted" }, p.awaited ? "awaited" : ""),
    ),
  );
  $("task-parents").tBodies[0].replaceChildren(...parents);
  $("task-parents").hidden = parents.length === 0;
  $("no-parents").hidden = parents.length > 0;
  const notes = [];
  if (w.parent_count) notes.push(`${w.parent_count}, ${w.waiting_for_count} awaited`);
  if (w.parent_count > w.parents.length) notes.push(`first ${w.parents.length} shown`);
  if (w.parent_failure_policy) notes.push(`if one fails: ${w.parent_failure_policy}`);
  $("task-parents-note").textContent = notes.length ? `(${notes.join("; ")})` : "";
  const children = w.children.map((c) =>
    el(
      "tr",
      { dataset: { task: c.task_id } },
      el("td", {}, taskLink(c.task_id)),
      el("td", {}, c.state || "gone"),
    ),
  );
  $("task-children").tBodies[0].replaceChildren(...children);
  $("task-children").hidden = children.length === 0;
  $("no-children").hidden = children.length > 0;
  $("task-children-note").textContent =
    w.child_count > w.children.length
      ? `(${w.child_count}, first ${w.children.length} shown)`
      : w.child_count
        ? `(${w.child_count})`
        : "";
}

function bytesText(size) {
  return size === 1 ? "1 byte" : `${size} bytes`;
}

// An SDK codec's envelope names its key in clear; the contents stay sealed.
function sizeText(size, keyId) {
  return keyId ? `encrypted, key ${keyId}, ${bytesText(size)}` : bytesText(size);
}

// Past the cap, the table holds the queues with the largest backlog; say so, with the totals.
function renderCap(reply) {
  const capped = reply.queue_count > reply.queues.length;
  $("queues-capped").hidden = !capped;
  if (capped) {
    const all = reply.all_queues.counts;
    $("queues-capped").textContent =
      `Showing the ${reply.queues.length} of ${reply.queue_count} queues with the largest ` +
      `backlog. All queues: ${all.pending} pending, ${all.waiting} waiting, ` +
      `${all.scheduled} scheduled, ` +
      `${all.leased} leased, ${all.dead} dead.`;
  }
}

// --- audit trail ------------------------------------------------------------------------------

async function loadAudit() {
  if (!state.audit) return;
  let page;
  try {
    page = await api(`/api/audit?page_size=${AUDIT_PAGE_SIZE}`);
  } catch (error) {
    showMessage(error.message);
    return;
  }
  $("audit").tBodies[0].replaceChildren(
    ...page.records.map((r) =>
      el(
        "tr",
        {},
        el("td", {}, fmtTime(r.time_ms)),
        el("td", {}, r.principal),
        el("td", {}, r.action),
        el("td", {}, r.target),
        el("td", { class: r.outcome === "ok" ? "" : "paused" }, r.outcome),
        el("td", {}, r.detail),
      ),
    ),
  );
  $("no-audit").hidden = page.records.length > 0;
}

// --- polling --------------------------------------------------------------------------------

async function refresh() {
  try {
    const [queues, workers, history] = await Promise.all([
      api("/api/queues"),
      api("/api/workers"),
      api(`/api/history?since_ms=${state.historySince}`),
    ]);
    renderQueues(queues.queues);
    renderCap(queues);
    renderWorkers(workers.workers);
    renderCharts(history.points);
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    await Promise.all([loadAudit(), loadKeys(), loadSchedules()]);
  } catch (error) {
    $("updated").textContent = `update failed: ${error.message}`;
  }
  try {
    const response = await fetch("/healthz");
    const health = await response.json();
    $("health").textContent = health.status === "serving" ? "serving" : `${health.status} (redis ${health.redis})`;
    $("health").className = `pill ${response.ok ? "ok" : "bad"}`;
  } catch (_) {
    $("health").textContent = "unreachable";
    $("health").className = "pill bad";
  }
}

async function main() {
  try {
    const info = await api("/api/info");
    state.admin = info.admin_enabled;
    state.csrf = info.csrf_token || "";
    state.audit = info.audit_visible !== false;
    if (info.principal) {
      $("principal").textContent = info.principal;
      $("whoami").hidden = false;
    }
  } catch (_) {
    state.admin = false;
  }
  $("audit-section").hidden = !state.audit;
  $("logout").addEventListener("click", async () => {
    try {
      await post("/api/logout");
    } finally {
      window.location.assign("/login");
    }
  });
  $("readonly").hidden = state.admin;
  document.body.classList.toggle("readonly", !state.admin);
  for (const button of document.querySelectorAll("button.admin")) applyAdmin(button);
  $("dead-queue").addEventListener("change", (event) => selectDeadQueue(event.target.value));
  $("dead-next").addEventListener("click", () => {
    if (state.dead.next) {
      state.dead.tokens.push(state.dead.next);
      loadDead();
    }
  });
  $("dead-first").addEventListener("click", () => {
    state.dead.tokens = [""];
    loadDead();
  });
  $("keys-queue").addEventListener("change", (event) => selectKeysQueue(event.target.value));
  $("keys-next").addEventListener("click", () => {
    if (state.keys.next) {
      state.keys.tokens.push(state.keys.next);
      loadKeys();
    }
  });
  $("keys-first").addEventListener("click", () => {
    state.keys.tokens = [""];
    loadKeys();
  });
  $("dead-redrive-all").addEventListener("click", () => onAll("redrive"));
  $("dead-delete-all").addEventListener("click", () => onAll("delete"));
  $("task-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("task-id").value.trim();
    if (id) showTask(id);
  });
  await refresh();
  setInterval(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", main);
