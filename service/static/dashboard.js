// Compactor's dashboard: the tenant's jobs with live progress, and one job's before/after report.
//
// A plain ES module: no build step, no third-party code, nothing loaded from anywhere but this
// server. Every element is built with DOM calls and every piece of job data goes in through
// textContent or setAttribute — never innerHTML — so no job, file or error text can become markup.
//
// Live state comes from GET /v1/jobs/{id}/events (Server-Sent Events). EventSource cannot send an
// Authorization header, so the stream is read with fetch() and parsed here (SSEParser); a job
// whose stream cannot be read is polled with GET /v1/jobs/{id} instead.

const KEY_STORAGE = "compactor.apiKey";
const LIST_REFRESH_MS = 2000;
const POLL_FALLBACK_MS = 2000;
const DEFAULT_RETRY_MS = 2000;
// Stream failures in a row after which a job is polled instead.
const STREAM_FAILURES_BEFORE_POLLING = 3;
// Browsers open at most 6 HTTP/1.1 connections per host and every open stream holds one: the
// list streams only its newest unfinished jobs (the others follow the list refresh), so the
// page's own requests always find a free connection.
const MAX_LIST_STREAMS = 3;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const SVG_NS = "http://www.w3.org/2000/svg";

// ---------------------------------------------------------------------------------------------
// Server-Sent Events

/** Incremental parser of the text/event-stream format: feed it text as it arrives, in any pieces. */
export class SSEParser {
  /** @param {(event: {type: string, data: string, id: string}) => void} onEvent */
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.lastEventId = "";
    this.retry = null;
    this.data = [];
    this.type = "";
  }

  feed(text) {
    this.buffer += text;
    // A line ends with CRLF, LF or CR. A CR that ends the buffer may be the first half of a CRLF
    // whose LF is still in flight: keep it for the next piece.
    const end = this.buffer.endsWith("\r") ? this.buffer.length - 1 : this.buffer.length;
    const lines = this.buffer.slice(0, end).split(/\r\n|\r|\n/);
    this.buffer = lines.pop() + this.buffer.slice(end);
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return; // a comment: the server's keep-alive
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
  }

  dispatch() {
    const data = this.data;
    const type = this.type || "message";
    this.data = [];
    this.type = "";
    if (data.length === 0) return; // a block with no data (say, only `retry:`) is not an event
    this.onEvent({ type, data: data.join("\n"), id: this.lastEventId });
  }
}

// ---------------------------------------------------------------------------------------------
// The API

class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail);
    this.status = status;
    this.code = code;
  }
}

/** The stream answered, but not as an event stream (a proxy in the way, an older server). */
class StreamUnavailable extends Error {}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

/**
 * The API's absolute paths, resolved against the page so that a proxy's path prefix is kept.
 * Only paths of this origin: a URL taken from a response can never point the page (and the
 * key it sends) anywhere else, nor be a javascript: link.
 */
function apiUrl(path) {
  const url = new URL(String(path).replace(/^\/+/, ""), document.baseURI);
  if (!String(path).startsWith("/") || url.origin !== location.origin) throw new Error(`not an API path: ${path}`);
  return url.toString();
}

function authHeaders(accept) {
  const headers = new Headers({ Accept: accept });
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return headers;
}

async function problemOf(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    // Not problem JSON (a proxy's error page): the status says enough.
  }
  const detail = typeof body.detail === "string" ? body.detail : response.statusText || "request failed";
  return new ApiError(response.status, typeof body.code === "string" ? body.code : `http_${response.status}`, detail);
}

async function api(path, { signal, accept = "application/json" } = {}) {
  const response = await fetch(apiUrl(path), { headers: authHeaders(accept), signal, cache: "no-store" });
  if (!response.ok) throw await problemOf(response);
  return response;
}

async function getJob(id, signal) {
  return (await api(`/v1/jobs/${encodeURIComponent(id)}`, { signal })).json();
}

/** Resolves after ``ms``, or at once when ``signal`` aborts. */
function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal?.aborted) {
      resolve();
      return;
    }
    const wake = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", wake);
      resolve();
    };
    const timer = setTimeout(wake, ms);
    signal?.addEventListener("abort", wake, { once: true });
  });
}

function isAbort(error) {
  return error?.name === "AbortError";
}

// ---------------------------------------------------------------------------------------------
// Following one job: its events stream, or polling when the stream cannot be read

class JobWatch {
  /**
   * @param {string} id
   * @param {{onJob: (job: object, source: string) => void, onGone: () => void, onError: (e: Error) => void}} handlers
   */
  constructor(id, handlers) {
    this.id = id;
    this.handlers = handlers;
    this.controller = new AbortController();
    this.lastEventId = "";
    this.retryMs = DEFAULT_RETRY_MS;
    this.finished = false;
    // True while the job's state arrives (from the stream, or by polling); false until the
    // first answer and after a failure, when the list's refresh keeps the job up to date instead.
    this.delivering = false;
    this.run();
  }

  deliver(job, source) {
    this.delivering = true;
    this.handlers.onJob(job, source);
    if (TERMINAL.has(job.status)) this.finished = true;
  }

  stop() {
    this.controller.abort();
  }

  get stopped() {
    return this.controller.signal.aborted;
  }

  async run() {
    const signal = this.controller.signal;
    let failures = 0;
    try {
      while (!this.stopped && !this.finished && failures < STREAM_FAILURES_BEFORE_POLLING) {
        try {
          if (await this.readStream(signal)) failures = 0;
          else failures += 1;
        } catch (error) {
          if (isAbort(error) || this.stopped) return;
          this.delivering = false;
          if (error instanceof ApiError && error.status === 404) {
            // The job is gone, or this server has no events route: only the job itself can tell.
            await this.getOnce(signal);
            break;
          }
          if (error instanceof ApiError && error.status === 401) throw error;
          if (error instanceof StreamUnavailable) break;
          failures += 1;
        }
        if (!this.finished) await sleep(this.retryMs, signal);
      }
      while (!this.stopped && !this.finished) {
        try {
          await this.getOnce(signal);
        } catch (error) {
          // A lost connection while polling: try again at the next tick. Anything the API
          // answered (401, 404) ends the watch below.
          if (error instanceof ApiError || isAbort(error)) throw error;
          this.delivering = false;
        }
        if (!this.finished) await sleep(POLL_FALLBACK_MS, signal);
      }
    } catch (error) {
      if (isAbort(error) || this.stopped) return;
      if (error instanceof ApiError && error.status === 404) this.handlers.onGone();
      else this.handlers.onError(error);
    }
  }

  /** Reads one connection of the stream to its end; true when it delivered at least one event. */
  async readStream(signal) {
    const headers = authHeaders("text/event-stream");
    if (this.lastEventId) headers.set("Last-Event-ID", this.lastEventId);
    const url = apiUrl(`/v1/jobs/${encodeURIComponent(this.id)}/events`);
    const response = await fetch(url, { headers, signal, cache: "no-store" });
    if (response.status === 204) {
      // "Do not reconnect": the job has finished and the last event seen was its final state.
      this.finished = true;
      return true;
    }
    if (!response.ok) throw await problemOf(response);
    const type = response.headers.get("Content-Type") || "";
    if (!type.startsWith("text/event-stream") || !response.body) throw new StreamUnavailable(type);
    let delivered = false;
    const parser = new SSEParser((event) => {
      if (event.type === "job") {
        const job = JSON.parse(event.data);
        this.lastEventId = event.id;
        delivered = true;
        this.deliver(job, "events");
      } else if (event.type === "deleted") {
        this.finished = true;
        this.handlers.onGone();
      }
    });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.feed(value);
        if (parser.retry !== null) this.retryMs = parser.retry;
        if (this.finished) break;
      }
    } finally {
      reader.cancel().catch(() => {});
    }
    return delivered;
  }

  async getOnce(signal) {
    this.deliver(await getJob(this.id, signal), "poll");
  }
}

// ---------------------------------------------------------------------------------------------
// DOM helpers: elements from data, text only

/** h("td", {class: "num"}, "12") — attributes go through setAttribute, children through text nodes. */
function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  setAttributes(element, attributes);
  append(element, children);
  return element;
}

function svg(tag, attributes = {}, ...children) {
  const element = document.createElementNS(SVG_NS, tag);
  setAttributes(element, attributes);
  append(element, children);
  return element;
}

function setAttributes(element, attributes) {
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
}

function append(element, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

// ---------------------------------------------------------------------------------------------
// Formatting

const COUNT = new Intl.NumberFormat("en-US");

function isNumber(value) {
  return typeof value === "number" && Number.isFinite(value);
}

function fmtCount(value) {
  return isNumber(value) ? COUNT.format(value) : "—";
}

function fmtBytes(value) {
  if (!isNumber(value)) return "—";
  const units = ["B", "KiB", "MiB", "GiB"];
  let size = value;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${size} B` : `${size.toFixed(size < 10 ? 2 : 1)} ${units[unit]}`;
}

function fmtMs(value) {
  if (!isNumber(value)) return "—";
  return `${value < 1 ? value.toPrecision(2) : value.toFixed(value < 100 ? 2 : 0)} ms`;
}

function fmtPercent(value, digits = 1) {
  return isNumber(value) ? `${(value * 100).toFixed(digits)}%` : "—";
}

function fmtTime(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

function fmtSeconds(value) {
  return isNumber(value) ? `${value.toFixed(value < 10 ? 2 : 1)} s` : "—";
}

/** compressed / original as "×0.50 (−50%)". */
function fmtRatio(ratio) {
  if (!isNumber(ratio)) return "";
  const change = (ratio - 1) * 100;
  const sign = change > 0 ? "+" : change < 0 ? "−" : "±";
  return `×${ratio.toFixed(2)} (${sign}${Math.abs(change).toFixed(change !== 0 && Math.abs(change) < 1 ? 1 : 0)}%)`;
}

/** original / compressed latency as "1.8× faster". */
function fmtSpeedup(speedup) {
  if (!isNumber(speedup) || speedup <= 0) return "";
  return speedup >= 1 ? `${speedup.toFixed(2)}× faster` : `${(1 / speedup).toFixed(2)}× slower`;
}

/** The change of an accuracy in percentage points: "−1.2 pts". */
function fmtPoints(before, after) {
  if (!isNumber(before) || !isNumber(after)) return "";
  const points = (after - before) * 100;
  const sign = points > 0.005 ? "+" : points < -0.005 ? "−" : "±";
  return `${sign}${Math.abs(points).toFixed(1)} pts`;
}

function progressBar(job) {
  const value = isNumber(job.progress) ? Math.min(Math.max(job.progress, 0), 1) : 0;
  return h("span", { class: "progress" },
    h("progress", { max: "1", value: String(value), "aria-label": `progress of ${job.id}` }),
    h("span", { class: "progress-text" }, fmtPercent(value, 0)));
}

function statusBadge(status) {
  return h("span", { class: `badge status-${status}`, "data-role": "status" }, status);
}

// ---------------------------------------------------------------------------------------------
// Page state

const state = {
  /** @type {Map<string, object>} id → the job document as last seen */
  jobs: new Map(),
  /**
   * @type {Map<string, string>} id → where that document came from: "list" (the list's refresh),
   * "events" (the job's stream), "poll" (polling when the stream failed), "get" (the job view's first read)
   */
  sources: new Map(),
  /** @type {Map<string, JobWatch>} */
  watches: new Map(),
  /** The view on screen: {update(job, source), gone(id), close()} */
  view: null,
  authFailed: false,
};

function recordJob(job, source) {
  state.jobs.set(job.id, job);
  state.sources.set(job.id, source);
}

function applyJob(job, source) {
  recordJob(job, source);
  state.view?.update(job, source);
}

function forgetJob(id) {
  state.jobs.delete(id);
  state.sources.delete(id);
  state.watches.get(id)?.stop();
  state.watches.delete(id);
  state.view?.gone(id);
}

/** Follows exactly the jobs in ``ids``: starts the missing watches, stops the others. */
function watchOnly(ids) {
  const wanted = new Set(ids);
  for (const [id, watch] of state.watches) {
    if (!wanted.has(id) || watch.finished) {
      watch.stop();
      state.watches.delete(id);
    }
  }
  for (const id of wanted) {
    if (state.watches.has(id) || TERMINAL.has(state.jobs.get(id)?.status)) continue;
    state.watches.set(id, new JobWatch(id, {
      onJob: (job, source) => applyJob(job, source),
      onGone: () => forgetJob(id),
      onError: (error) => reportError(error),
    }));
  }
}

// ---------------------------------------------------------------------------------------------
// Notices and the API key

function showNotice(text, kind = "error") {
  const notice = document.getElementById("notice");
  notice.textContent = text;
  notice.className = `notice notice-${kind}`;
  notice.hidden = false;
}

function clearNotice() {
  const notice = document.getElementById("notice");
  notice.hidden = true;
  notice.textContent = "";
}

function reportError(error) {
  if (isAbort(error)) return;
  if (error instanceof ApiError && error.status === 401) {
    unauthorized();
    return;
  }
  if (error instanceof ApiError) showNotice(`${error.message} (${error.status} ${error.code})`);
  else showNotice(`Cannot reach the Compactor API: ${error.message}`);
}

function unauthorized() {
  state.authFailed = true;
  watchOnly([]);
  state.view?.close();
  state.view = null;
  document.getElementById("view").replaceChildren();
  showNotice(apiKey()
    ? "401 Unauthorized: the API key was not accepted. Check it and enter it again above."
    : "401 Unauthorized: this server needs an API key. Enter it above.");
  document.getElementById("api-key").focus();
  renderKeyState();
}

function renderKeyState() {
  const label = document.getElementById("key-state");
  label.textContent = apiKey() ? "key set for this tab" : "no key (open mode)";
  document.getElementById("forget-key").hidden = !apiKey();
}

/** Takes an API key passed once as #key=… and removes it from the address bar and the history. */
function takeKeyFromFragment() {
  const match = /^#key=([^&]*)$/.exec(location.hash);
  if (!match) return;
  let key = match[1];
  try {
    key = decodeURIComponent(key);
  } catch {
    // Not percent-encoded after all: take it as typed.
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  history.replaceState(null, "", location.pathname + location.search);
}

function setupKeyForm() {
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    input.value = "";
    restart();
  });
  document.getElementById("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    restart();
  });
}

/** Starts over with the current key: a different key is a different tenant, with other jobs. */
function restart() {
  state.authFailed = false;
  watchOnly([]);
  state.jobs.clear();
  state.sources.clear();
  clearNotice();
  renderKeyState();
  route();
}

// ---------------------------------------------------------------------------------------------
// The jobs list

function showList(root) {
  const rows = new Map();
  const tbody = h("tbody");
  const empty = h("p", { class: "muted", id: "jobs-empty", hidden: true },
    "No jobs yet. Submit one with POST /v1/jobs, the CLI (compactor submit) or the Python client.");
  const refreshed = h("span", { class: "muted", id: "jobs-refreshed" });
  const controller = new AbortController();
  root.replaceChildren(
    h("section", {},
      h("div", { class: "section-head" }, h("h1", {}, "Jobs"), refreshed),
      h("table", { id: "jobs", class: "jobs" },
        h("thead", {}, h("tr", {},
          ["Job", "Created", "Status", "Stage", "Progress"].map((name) => h("th", { scope: "col" }, name)))),
        tbody),
      empty));

  function row(job) {
    let tr = rows.get(job.id);
    if (!tr) {
      tr = h("tr", { "data-job-id": job.id },
        h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "job-link" }, job.id)),
        h("td", { "data-role": "created" }, fmtTime(job.created_at)),
        h("td", { "data-role": "status-cell" }),
        h("td", { "data-role": "stage" }),
        h("td", { "data-role": "progress-cell" }));
      rows.set(job.id, tr);
    }
    fillRow(tr, job, state.sources.get(job.id));
    return tr;
  }

  function fillRow(tr, job, source) {
    tr.dataset.status = job.status;
    tr.dataset.progress = String(job.progress);
    tr.dataset.source = source || "";
    tr.querySelector('[data-role="status-cell"]').replaceChildren(statusBadge(job.status));
    tr.querySelector('[data-role="stage"]').textContent = job.stage || "—";
    tr.querySelector('[data-role="progress-cell"]').replaceChildren(progressBar(job));
  }

  async function refresh() {
    const page = await (await api("/v1/jobs?limit=50", { signal: controller.signal })).json();
    for (const job of page.items) {
      // A followed job takes its state from its stream, and a finished job never changes:
      // the list, read at another moment, must not set either back.
      const known = state.jobs.get(job.id);
      if (state.watches.get(job.id)?.delivering || (known && TERMINAL.has(known.status))) continue;
      recordJob(job, "list");
    }
    const listed = new Set(page.items.map((job) => job.id));
    for (const id of [...rows.keys()]) {
      if (!listed.has(id)) {
        rows.get(id).remove();
        rows.delete(id);
      }
    }
    // Newest first, as the API lists them.
    tbody.append(...page.items.map((job) => row(state.jobs.get(job.id))));
    empty.hidden = page.items.length > 0;
    refreshed.textContent = `updated ${new Date().toLocaleTimeString()}`;
    const unfinished = page.items.filter((job) => !TERMINAL.has(state.jobs.get(job.id).status));
    watchOnly(unfinished.slice(0, MAX_LIST_STREAMS).map((job) => job.id));
  }

  async function loop() {
    let failing = false;
    while (!controller.signal.aborted) {
      try {
        await refresh();
        // The server is back: take down the notice its failure put up (and only that one).
        if (failing) clearNotice();
        failing = false;
      } catch (error) {
        if (isAbort(error)) return;
        failing = true;
        reportError(error);
        if (state.authFailed) return;
      }
      await sleep(LIST_REFRESH_MS, controller.signal);
    }
  }

  loop();
  return {
    update(job, source) {
      const tr = rows.get(job.id);
      if (tr) fillRow(tr, job, source);
    },
    gone(id) {
      rows.get(id)?.remove();
      rows.delete(id);
    },
    close() {
      controller.abort();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// One job

function showJob(root, id) {
  const controller = new AbortController();
  const summary = h("section", { id: "job-summary", class: "summary" });
  const report = h("div", { id: "job-report" });
  root.replaceChildren(
    h("p", {}, h("a", { href: "#/", class: "back" }, "← All jobs")),
    h("h1", {}, "Job ", h("code", { id: "job-id" }, id)),
    summary,
    report);
  let shownStatus = null;

  function render(job) {
    summary.replaceChildren(...renderSummary(job, state.sources.get(job.id)));
    // The report changes only when the status does (metrics and artifacts arrive with success).
    if (job.status !== shownStatus) {
      shownStatus = job.status;
      report.replaceChildren(...renderReport(job));
    }
  }

  (async () => {
    try {
      // A finished job never changes: the copy the list or a stream left is the job.
      const known = state.jobs.get(id);
      const finished = known && TERMINAL.has(known.status);
      const job = finished ? known : await getJob(id, controller.signal);
      if (controller.signal.aborted) return;
      if (!finished) recordJob(job, "get");
      render(job);
      watchOnly(TERMINAL.has(job.status) ? [] : [id]);
    } catch (error) {
      if (isAbort(error)) return;
      if (error instanceof ApiError && error.status === 404) {
        summary.replaceChildren(h("p", { class: "notice notice-error" }, `No job ${id} for this API key.`));
      } else {
        reportError(error);
      }
    }
  })();

  return {
    update(job) {
      if (job.id === id) render(job);
    },
    gone(goneId) {
      if (goneId === id) {
        report.replaceChildren();
        summary.replaceChildren(h("p", { class: "notice notice-error" }, `Job ${id} was deleted.`));
      }
    },
    close() {
      controller.abort();
    },
  };
}

function renderSummary(job, source) {
  const facts = [
    ["Status", statusBadge(job.status)],
    ["Stage", job.stage || "—"],
    ["Progress", progressBar(job)],
    ["Attempts", String(job.attempts)],
    ["Created", fmtTime(job.created_at)],
    ["Started", fmtTime(job.started_at)],
    ["Finished", fmtTime(job.finished_at)],
  ];
  const list = h("dl", { class: "facts", "data-status": job.status, "data-source": source || "" },
    facts.map(([name, value]) => h("div", {}, h("dt", {}, name), h("dd", {}, value))));
  const parts = [list];
  if (job.cancel_requested && !TERMINAL.has(job.status)) {
    parts.push(h("p", { class: "notice notice-info" }, "Cancel requested: the job stops at its next batch."));
  }
  if (job.error) {
    parts.push(h("div", { class: "notice notice-error", id: "job-error" },
      h("strong", {}, job.error.code), ": ", job.error.message));
  }
  return parts;
}

function renderReport(job) {
  const metrics = job.metrics;
  const sections = [];
  if (metrics) {
    sections.push(section("Before and after", "metrics-section", metricsTable(metrics)));
    if (metrics.runtimes?.length) {
      sections.push(section("Runtimes: what to deploy", "runtimes-section", recommendationList(metrics), runtimesTable(metrics)));
    }
    if (metrics.fidelity) sections.push(section("Fidelity to the original", "fidelity-section", fidelityList(metrics.fidelity)));
    if (metrics.search?.points?.length) {
      sections.push(section("Accuracy vs. sparsity (target search)", "search-section", searchChart(metrics), searchTable(metrics.search)));
    }
    if (metrics.layers?.length) sections.push(section("Layers", "layers-section", layersTable(metrics.layers)));
    if (metrics.stages?.length) sections.push(section("Stages", "stages-section", stagesTable(metrics.stages)));
    const remarks = [...(metrics.warnings || []), ...(metrics.notes || [])];
    if (remarks.length) sections.push(section("Notes", "notes-section", h("ul", {}, remarks.map((text) => h("li", {}, text)))));
  }
  if (job.artifacts?.length) sections.push(section("Downloads", "artifacts-section", artifactList(job.artifacts)));
  if (!metrics && !TERMINAL.has(job.status)) {
    sections.push(h("p", { class: "muted" }, "The report appears here when the job succeeds."));
  }
  return sections;
}

/** A <thead> from [name, numeric] pairs; numeric columns align right, as their cells do. */
function tableHead(...columns) {
  return h("thead", {}, h("tr", {}, columns.map(([name, numeric]) => h("th", { scope: "col", class: numeric ? "num" : null }, name))));
}

function section(title, id, ...content) {
  return h("section", { id, class: "card" }, h("h2", {}, title), ...content);
}

const METRIC_ROWS = [
  { name: "Parameters", value: (m) => m.params, format: fmtCount, change: (o, c, r) => fmtRatio(r.params) },
  { name: "Non-zero parameters", value: (m) => m.nonzero_params, format: fmtCount, change: (o, c, r) => fmtRatio(r.nonzero_params) },
  { name: "Size (TorchScript file)", value: (m) => m.size_bytes, format: fmtBytes, change: (o, c, r) => fmtRatio(r.size) },
  { name: "MACs per sample", value: (m) => m.macs, format: fmtCount, change: (o, c, r) => fmtRatio(r.macs) },
  // Both TorchScript (model.ts against the original compiled alike); the runtime table has the rest.
  { name: "CPU latency, batch 1 (p50, TorchScript)", value: (m) => m.latency_ms?.cpu?.batch_1?.p50, format: fmtMs, change: (o, c) => fmtSpeedup(o / c) },
  { name: "CPU latency, batch 32 (p50, TorchScript)", value: (m) => m.latency_ms?.cpu?.batch_32?.p50, format: fmtMs, change: (o, c) => fmtSpeedup(o / c) },
  { name: "GPU latency, batch 1 (p50)", value: (m) => m.latency_ms?.cuda?.batch_1?.p50, format: fmtMs, change: (o, c) => fmtSpeedup(o / c) },
  { name: "GPU latency, batch 32 (p50)", value: (m) => m.latency_ms?.cuda?.batch_32?.p50, format: fmtMs, change: (o, c) => fmtSpeedup(o / c) },
  { name: "Top-1 accuracy", value: (m) => m.accuracy?.top1, format: (v) => fmtPercent(v), change: fmtPoints },
  { name: "Top-5 accuracy", value: (m) => m.accuracy?.top5, format: (v) => fmtPercent(v), change: fmtPoints },
];

function metricsTable(metrics) {
  const original = metrics.original || {};
  const compressed = metrics.compressed || {};
  const ratios = metrics.ratios || {};
  const rows = [];
  for (const spec of METRIC_ROWS) {
    const before = spec.value(original);
    const after = spec.value(compressed);
    if (!isNumber(before) && !isNumber(after)) continue;
    rows.push(h("tr", {},
      h("th", { scope: "row" }, spec.name),
      h("td", { class: "num" }, spec.format(before)),
      h("td", { class: "num" }, spec.format(after)),
      h("td", { class: "num change" }, isNumber(before) && isNumber(after) ? spec.change(before, after, ratios) : "")));
  }
  const table = h("table", { id: "metrics", class: "metrics" },
    tableHead(["", false], ["Original", true], ["Compressed", true], ["Change", true]),
    h("tbody", {}, rows));
  if (!original.accuracy) {
    return [table, h("p", { class: "muted" }, "No accuracy: the job had no dataset with targets.")];
  }
  return table;
}

/** "batch_32" → "32"; the batch sizes the report's runtime rows were timed at, in order. */
function batchSizes(metrics) {
  const keys = new Set();
  for (const row of metrics.runtimes) for (const key of Object.keys(row.latency_ms || {})) keys.add(key);
  return [...keys].sort((a, b) => Number(a.slice(6)) - Number(b.slice(6)));
}

/** Per batch size: the recommended artifact and its speedup over the original deployed as well as it can be. */
function recommendationList(metrics) {
  const recommended = metrics.recommended || {};
  const items = Object.entries(recommended).map(([key, choice]) => {
    const batch = key.replace("batch_", "");
    const speedup = isNumber(choice.speedup) ? fmtSpeedup(choice.speedup) : "no speedup measured";
    return h("div", { "data-batch": batch },
      h("dt", {}, `Batch ${batch}`),
      h("dd", { class: isNumber(choice.speedup) && choice.speedup < 1 ? "slower" : null },
        h("code", {}, choice.artifact), ` in ${choice.runtime}`, choice.precision ? ` (${choice.precision})` : "",
        ` · ${fmtMs(choice.p50_ms)} · ${speedup} than the original in its fastest runtime`));
  });
  if (!items.length) return h("p", { class: "muted" }, "No artifact was timed.");
  return h("dl", { id: "recommended", class: "facts" }, items);
}

/** The original and every artifact, each in its runtime, timed in one process; recommended rows marked. */
function runtimesTable(metrics) {
  const batches = batchSizes(metrics);
  const recommended = metrics.recommended || {};
  const accuracy = metrics.runtimes.some((row) => isNumber(row.accuracy?.top1));
  const head = [["Model", false], ["Runtime", false], ["Size", true],
    ...batches.map((key) => [`Batch ${key.slice(6)} p50`, true]),
    ...(accuracy ? [["Top-1", true]] : []), ["Agreement", true],
    ...batches.map((key) => [`vs. best original, batch ${key.slice(6)}`, true])];
  return h("table", { id: "runtimes", class: "compact" },
    tableHead(...head),
    h("tbody", {}, metrics.runtimes.map((row) => {
      const name = row.artifact || "original";
      const chosenAt = Object.entries(recommended)
        .filter(([, choice]) => choice.artifact === row.artifact && choice.runtime === row.runtime)
        .map(([key]) => key.slice(6));
      return h("tr", { "data-artifact": name, "data-runtime": row.runtime, class: chosenAt.length ? "recommended" : null },
        h("td", {}, row.artifact ? h("code", {}, row.artifact) : "original (uploaded)",
          chosenAt.length ? [" ", h("span", { class: "badge status-succeeded" }, `recommended at batch ${chosenAt.join(", ")}`)] : null),
        h("td", {}, `${row.runtime} ${row.precision}`),
        h("td", { class: "num" }, fmtBytes(row.size_bytes)),
        ...batches.map((key) => h("td", { class: "num", title: row.latency_ms?.[key] ? `p90 ${fmtMs(row.latency_ms[key].p90)}` : null },
          fmtMs(row.latency_ms?.[key]?.p50))),
        accuracy ? h("td", { class: "num" }, fmtPercent(row.accuracy?.top1)) : null,
        h("td", { class: "num" }, row.artifact ? fmtPercent(row.top1_agreement) : "—"),
        ...batches.map((key) => h("td", { class: "num change" },
          row.artifact ? fmtSpeedup(row.speedup_vs_best_original?.[key]) : "")));
    })));
}

function fidelityList(fidelity) {
  return h("dl", { class: "facts" },
    h("div", {}, h("dt", {}, "Top-1 agreement with the original"), h("dd", {}, fmtPercent(fidelity.top1_agreement, 2))),
    h("div", {}, h("dt", {}, "Output cosine similarity"), h("dd", {}, isNumber(fidelity.output_cosine) ? fidelity.output_cosine.toFixed(4) : "—")));
}

/**
 * Accuracy against prune amount for every point the target search tried, hand-drawn as SVG:
 * points within the accuracy budget filled, the others hollow, the chosen one ringed, and
 * the original accuracy and the budget's floor as horizontal lines.
 */
export function searchChart(metrics) {
  const search = metrics.search;
  const points = search.points.filter((p) => isNumber(p.amount) && isNumber(p.top1));
  const original = metrics.original?.accuracy?.top1;
  const floor = isNumber(original) && isNumber(search.max_accuracy_drop) ? original - search.max_accuracy_drop : null;
  const width = 640;
  const height = 320;
  const margin = { top: 16, right: 150, bottom: 44, left: 56 };
  const plotWidth = width - margin.left - margin.right;
  const plotHeight = height - margin.top - margin.bottom;

  // y: everything drawn, on round ticks within [0, 1]; x: the prune amount, 0 to 1.
  const values = [...points.map((p) => p.top1), original, floor].filter(isNumber);
  const { low, high, step } = niceRange(Math.min(...values), Math.max(...values));
  const x = (amount) => margin.left + amount * plotWidth;
  const y = (top1) => margin.top + (1 - (top1 - low) / (high - low)) * plotHeight;

  const chart = svg("svg", {
    id: "search-chart", class: "chart", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    "aria-label": "Validation top-1 accuracy against prune amount for each point of the target search",
  });
  const grid = svg("g", { class: "grid" });
  const ticks = Math.round((high - low) / step);
  for (let i = 0; i <= ticks; i += 1) {
    const value = low + step * i;
    grid.append(
      svg("line", { x1: margin.left, x2: margin.left + plotWidth, y1: y(value), y2: y(value) }),
      svg("text", { x: margin.left - 8, y: y(value) + 4, "text-anchor": "end", class: "tick" }, fmtPercent(value, step < 0.01 ? 1 : 0)));
  }
  for (let i = 0; i <= 10; i += 2) {
    const amount = i / 10;
    grid.append(
      svg("line", { x1: x(amount), x2: x(amount), y1: margin.top, y2: margin.top + plotHeight }),
      svg("text", { x: x(amount), y: margin.top + plotHeight + 18, "text-anchor": "middle", class: "tick" }, fmtPercent(amount, 0)));
  }
  chart.append(grid,
    svg("rect", { class: "frame", x: margin.left, y: margin.top, width: plotWidth, height: plotHeight }),
    svg("text", { class: "axis-label", x: margin.left + plotWidth / 2, y: height - 6, "text-anchor": "middle" }, "prune amount"),
    svg("text", {
      class: "axis-label", x: 14, y: margin.top + plotHeight / 2, "text-anchor": "middle",
      transform: `rotate(-90 14 ${margin.top + plotHeight / 2})`,
    }, "top-1 accuracy"));

  // The original accuracy and the budget's floor, labelled at the right; the floor's label moves
  // below the original's when the two lines are too close for both.
  const legendX = margin.left + plotWidth + 12;
  const reference = (value, className, label, labelY) => {
    chart.append(
      svg("line", { class: className, x1: margin.left, x2: margin.left + plotWidth, y1: y(value), y2: y(value) }),
      svg("text", { class: `${className}-label`, x: legendX, y: labelY + 4 }, label));
  };
  if (isNumber(original)) reference(original, "reference-original", `original ${fmtPercent(original)}`, y(original));
  if (isNumber(floor)) {
    const labelY = isNumber(original) ? Math.max(y(floor), y(original) + 16) : y(floor);
    reference(floor, "reference-floor", `budget floor ${fmtPercent(floor)}`, labelY);
  }

  // The search's path through the amounts, in the order tried.
  const path = points.map((p, i) => `${i === 0 ? "M" : "L"}${x(p.amount).toFixed(1)},${y(p.top1).toFixed(1)}`).join(" ");
  if (points.length > 1) chart.append(svg("path", { class: "search-path", d: path }));
  points.forEach((point, index) => {
    const chosen = point.amount === search.chosen_amount;
    const label = `trial ${index + 1}: prune ${fmtPercent(point.amount)} → top-1 ${fmtPercent(point.top1)}`
      + ` (${point.within_budget ? "within" : "outside"} the budget)${chosen ? ", chosen" : ""}`;
    const group = svg("g", { class: `point ${point.within_budget ? "within" : "outside"}${chosen ? " chosen" : ""}`, "data-amount": point.amount },
      svg("title", {}, label));
    if (chosen) group.append(svg("circle", { class: "chosen-ring", cx: x(point.amount), cy: y(point.top1), r: 10 }));
    group.append(
      svg("circle", { class: "dot", cx: x(point.amount), cy: y(point.top1), r: 5 }),
      svg("text", { class: "point-label", x: x(point.amount) + 8, y: y(point.top1) - 8 }, String(index + 1)));
    chart.append(group);
  });
  return chart;
}

/** A y range around [low, high] that starts and ends on a round step, with 4 to 10 steps, within [0, 1]. */
function niceRange(low, high) {
  const span = Math.max(high - low, 0.01);
  const step = [0.002, 0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.2, 0.25].find((s) => span / s <= 8) ?? 0.25;
  // Room below the lowest point for its marker; epsilon so 0.3/0.1 does not floor to 2.
  let niceLow = Math.max(0, Math.floor((low - step / 2) / step + 1e-9) * step);
  let niceHigh = Math.min(1, Math.ceil(high / step - 1e-9) * step);
  if (niceHigh - niceLow < step * 4) niceLow = Math.max(0, niceHigh - step * 4);
  if (niceHigh - niceLow < step * 4) niceHigh = Math.min(1, niceLow + step * 4);
  return { low: niceLow, high: niceHigh, step };
}

function searchTable(search) {
  const verdict = search.budget_met
    ? `Budget met: prune amount ${fmtPercent(search.chosen_amount)} was chosen (accuracy drop ${fmtPoints(0, search.accuracy_drop).replace(/^[+±]/, "")}).`
    : `No point met the budget of ${fmtPercent(search.max_accuracy_drop)}; the most accurate one (${fmtPercent(search.chosen_amount)}) was kept, missing it by ${fmtPercent(search.missed_by, 2)}.`;
  return [
    h("p", { id: "search-verdict" }, verdict),
    h("table", { id: "search-points", class: "compact" },
      tableHead(["Trial", true], ["Prune amount", true], ["Top-1", true], ["Drop", true], ["Within budget", false]),
      h("tbody", {}, search.points.map((point, index) => h("tr", { class: point.amount === search.chosen_amount ? "chosen" : "" },
        h("td", { class: "num" }, String(index + 1)),
        h("td", { class: "num" }, fmtPercent(point.amount)),
        h("td", { class: "num" }, fmtPercent(point.top1)),
        h("td", { class: "num" }, fmtPercent(point.accuracy_drop, 2)),
        h("td", {}, point.within_budget ? "yes" : "no"))))),
  ];
}

function layersTable(layers) {
  const channels = layers.some((layer) => isNumber(layer.channels_before));
  const head = [["Layer", false], ["Type", false], ["Parameters", true], ["Sparsity", true], ...(channels ? [["Channels", true]] : [])];
  return h("table", { id: "layers", class: "compact" },
    tableHead(...head),
    h("tbody", {}, layers.map((layer) => h("tr", { "data-layer": layer.name },
      h("td", {}, h("code", {}, layer.name)),
      h("td", {}, layer.type),
      h("td", { class: "num" }, fmtCount(layer.params)),
      h("td", { class: "num" },
        h("meter", { min: "0", max: "1", value: String(isNumber(layer.sparsity) ? layer.sparsity : 0) }),
        " ", fmtPercent(layer.sparsity)),
      channels ? h("td", { class: "num" },
        isNumber(layer.channels_before) ? `${layer.channels_before} → ${layer.channels_after}` : "—") : null))));
}

function stagesTable(stages) {
  return h("table", { id: "stages", class: "compact" },
    tableHead(["Stage", false], ["Time", true]),
    h("tbody", {}, stages.map((stage) => h("tr", {},
      h("td", {}, stage.name),
      h("td", { class: "num" }, fmtSeconds(stage.seconds))))));
}

function artifactList(artifacts) {
  return h("ul", { id: "artifacts", class: "artifacts" }, artifacts.map((artifact) => h("li", {},
    h("a", {
      href: apiUrl(artifact.url), download: artifact.name, class: "download", "data-artifact": artifact.name,
      onclick: (event) => {
        event.preventDefault();
        download(artifact).catch(reportError);
      },
    }, artifact.name),
    h("span", { class: "muted" }, ` ${fmtBytes(artifact.size_bytes)} · sha256 `, h("code", { title: artifact.sha256 }, artifact.sha256.slice(0, 12))))));
}

/** A download needs the Authorization header, which a plain link cannot send: fetch, then save the blob. */
async function download(artifact) {
  const response = await api(artifact.url, { accept: "*/*" });
  const blob = await response.blob();
  const objectUrl = URL.createObjectURL(blob);
  const link = h("a", { href: objectUrl, download: artifact.name, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  // The click has handed the blob to the download; free it once that has started.
  setTimeout(() => URL.revokeObjectURL(objectUrl), 60_000);
}

// ---------------------------------------------------------------------------------------------
// Routing: #/ is the list, #/jobs/<id> a job

function route() {
  state.view?.close();
  state.view = null;
  const root = document.getElementById("view");
  if (state.authFailed) return;
  const match = /^#\/jobs\/([^/]+)$/.exec(location.hash);
  if (match) {
    const id = decodeURIComponent(match[1]);
    watchOnly([]);
    state.view = showJob(root, id);
    document.title = `${id} · Compactor`;
  } else {
    state.view = showList(root);
    document.title = "Jobs · Compactor";
  }
}

function main() {
  takeKeyFromFragment();
  setupKeyForm();
  renderKeyState();
  window.addEventListener("hashchange", () => {
    if (location.hash.startsWith("#key=")) {
      takeKeyFromFragment();
      restart();
    } else {
      route();
    }
  });
  route();
}

main();
