// lmedit web console: plain JS against the REST API (no build step, no dependencies).
// Every value from the server goes into the page as text (textContent), never as HTML.
"use strict";

const KEY = "lmedit.key"; // the pasted API key, in this tab's session storage only
const BRANCH = "lmedit.branch";
const POLL_MS = 400;
const TIMELINE_LIMIT = 100; // versions shown, head first

const $ = (id) => document.getElementById(id);
const state = { branch: sessionStorage.getItem(BRANCH) || "main", refs: null, versions: [], job: null };

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// One API call: JSON in and out, the key as a bearer token when one is set; errors are the API's
// {error: {code, message}} turned into an ApiError.
async function api(path, { method = "GET", body, params } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  const headers = { Accept: "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, "network", "the server did not answer (" + e.message + ")");
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null; // not JSON (a proxy's error page): the status line says enough
  }
  if (!response.ok) {
    const err = (data && data.error) || {};
    throw new ApiError(response.status, err.code || "http_" + response.status, err.message || response.statusText);
  }
  return data;
}

// el("td", {class: "x"}, "text", child): an element with attributes and text or element children.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const short = (id) => (id ? String(id).slice(0, 8) : "");
const isBase = (id) => state.refs && id === state.refs.base;
const label = (id) => (isBase(id) ? "base" : short(id));

function describe(err) {
  if (err.status === 401) return "This server needs an API key: paste one above. (" + err.message + ")";
  if (err.status === 403) return "Your key lacks the scope for this: " + err.message;
  return err.message + (err.code ? " [" + err.code + "]" : "");
}

function notice(message, kind = "error") {
  const box = $("notice");
  box.textContent = message;
  box.className = kind;
  box.hidden = !message;
}

function when(iso) {
  if (!iso) return "";
  const t = new Date(iso);
  if (isNaN(t)) return iso;
  const s = Math.max(0, (Date.now() - t.getTime()) / 1000);
  const ago = s < 10 ? "just now" : s < 60 ? Math.round(s) + " s ago" : s < 3600 ? Math.round(s / 60) + " min ago"
    : s < 86400 ? Math.round(s / 3600) + " h ago" : Math.round(s / 86400) + " d ago";
  return ago;
}

// Quality metrics (means in [0, 1]) to two decimals; the edit's cost (steps, seconds) after them, quieter.
// JSON's 1.0 arrives as 1, so the format follows the metric's name, not the value.
function metricChips(metrics) {
  const quality = [];
  const cost = [];
  for (const [name, value] of Object.entries(metrics || {})) {
    if (typeof value !== "number") continue;
    if (name === "steps") cost.push(el("span", { class: "chip cost", title: "training steps" }, value + " steps"));
    else if (name.endsWith("_seconds")) {
      cost.push(el("span", { class: "chip cost", title: name }, value.toFixed(2) + " s"));
    } else quality.push(el("span", { class: "chip metric", title: name }, name + " " + value.toFixed(2)));
  }
  return [...quality, ...cost];
}

function factText(f) {
  return (f.prompt || "") + " → " + (f.target_new || "");
}

// ---- key -------------------------------------------------------------------------------------

function showKey() {
  const key = sessionStorage.getItem(KEY);
  // Keys look like lme_<id>_<secret>: show only the id part.
  $("key-state").textContent = key ? "using key " + key.split("_").slice(0, 2).join("_") + "…" : "no key";
}

// ---- refs, timeline --------------------------------------------------------------------------

async function loadRefs() {
  state.refs = await api("/branches");
  const names = state.refs.branches.map((b) => b.name);
  if (!names.includes(state.branch)) state.branch = names.includes("main") ? "main" : names[0];
  const select = $("branch");
  select.replaceChildren(...names.map((n) => el("option", { value: n, selected: n === state.branch }, n)));
}

function refsAt(id) {
  const chips = [];
  for (const b of state.refs.branches) {
    if (b.version === id) chips.push(el("span", { class: "chip branch", title: "branch head" }, b.name));
  }
  for (const t of state.refs.tags) {
    if (t.version === id) chips.push(el("span", { class: "chip tag", title: "tag" }, "#" + t.name));
  }
  if (isBase(id)) chips.push(el("span", { class: "chip base" }, "base"));
  return chips;
}

async function loadTimeline() {
  state.versions = await api("/versions", { params: { branch: state.branch, limit: TIMELINE_LIMIT } });
  const head = state.versions[0];
  $("head").textContent = head ? state.branch + " at " + label(head.id) : "";
  const rows = state.versions.map((v, i) => {
    const facts = v.facts || [];
    const factCell = facts.length
      ? el("td", { class: "facts", title: facts.map(factText).join("\n") }, factText(facts[0]),
        facts.length > 1 ? el("span", { class: "muted" }, " +" + (facts.length - 1)) : null)
      : el("td", { class: "muted" }, isBase(v.id) ? "the base model" : "no facts");
    const actions = el("td", { class: "actions" },
      el("button", { type: "button", class: "quiet compare", title: "generate from this version on the right",
        onclick: () => compareWith(v.id) }, "compare"),
      i > 0 ? el("button", { type: "button", class: "danger rollback", onclick: () => rollback(v.id) },
        "roll back here") : el("span", { class: "chip head" }, "head"));
    return el("tr", { "data-version": v.id, class: i === 0 ? "is-head" : null },
      el("td", {}, el("code", { title: v.id }, label(v.id))),
      el("td", {}, refsAt(v.id)),
      factCell,
      el("td", { class: "nowrap" }, v.method ? v.method + (v.objective ? " / " + v.objective : "") : ""),
      el("td", { class: "nowrap" }, v.key_id || ""),
      el("td", { class: "nowrap", title: v.created_at || "" }, when(v.created_at)),
      el("td", { class: "metrics" }, metricChips(v.metrics)),
      actions);
  });
  $("timeline").tBodies[0].replaceChildren(...rows);
}

// ---- facts (the ledger) ----------------------------------------------------------------------

function factTable(facts, extra) {
  return el("table", { class: "fact-table" },
    el("thead", {}, el("tr", {}, el("th", {}, "subject"), el("th", {}, "prompt"), el("th", {}, "answer"),
      el("th", {}, extra))),
    el("tbody", {}, facts.map((f) => el("tr", { "data-fact": f.fact_id || "" },
      el("td", {}, f.subject || el("span", { class: "muted" }, "—")),
      el("td", {}, f.prompt || ""),
      el("td", {}, el("strong", {}, f.target_new || "")),
      el("td", {}, el("code", { title: f.version || "" }, label(f.version || f.superseded_by || f.reverted_by)))))));
}

async function loadFacts() {
  const box = $("facts");
  let ledger;
  try {
    ledger = await api("/branches/" + encodeURIComponent(state.branch) + "/facts");
  } catch (err) {
    if (err.status === 404) {
      // No ledger: list what the branch's versions wrote instead (a later fact may override an earlier one).
      const written = state.versions.flatMap((v) => (v.facts || []).map((f) => ({ ...f, version: v.id })));
      box.replaceChildren(el("p", { class: "muted", id: "no-ledger" }, "No ledger on this server. " +
        (written.length ? "Facts written by the versions of " + state.branch + ", newest first:" : "")),
      written.length ? factTable(written, "version") : "");
      return;
    }
    throw err;
  }
  const facts = ledger.facts || [];
  const parts = [facts.length ? factTable(facts, "version")
    : el("p", { class: "muted" }, "No facts in effect on " + state.branch + ".")];
  for (const kind of ["superseded", "reverted"]) {
    const list = ledger[kind] || [];
    if (list.length) parts.push(el("details", {}, el("summary", {}, list.length + " " + kind), factTable(list, "by")));
  }
  box.replaceChildren(...parts);
}

// ---- generation ------------------------------------------------------------------------------

function fillVersionSelects() {
  const options = [["base", "base"]];
  for (const b of state.refs.branches) options.push([b.name, "branch " + b.name]);
  for (const t of state.refs.tags) options.push([t.name, "tag " + t.name]);
  for (const v of state.versions) {
    if (!isBase(v.id)) options.push([v.id, short(v.id) + (v.facts && v.facts.length ? " " + factText(v.facts[0]) : "")]);
  }
  for (const [id, fallback] of [["gen-left", "base"], ["gen-right", state.branch]]) {
    const select = $(id);
    const keep = select.value || fallback;
    const values = options.map(([value]) => value);
    select.replaceChildren(...options.map(([value, text]) => el("option", { value }, text)));
    select.value = values.includes(keep) ? keep : fallback;
  }
}

function compareWith(version) {
  $("gen-right").value = version;
  $("gen-prompt").focus();
  $("generate-panel").scrollIntoView({ behavior: "smooth", block: "nearest" });
}

async function generate(event) {
  event.preventDefault();
  const prompt = $("gen-prompt").value;
  const tokens = $("gen-tokens").value || "12";
  const sides = ["left", "right"];
  $("gen-submit").disabled = true;
  for (const side of sides) {
    $("gen-" + side + "-text").textContent = "";
    $("gen-" + side + "-text").className = "gen pending";
    $("gen-" + side + "-meta").textContent = "generating…";
  }
  const results = await Promise.allSettled(sides.map((side) => api("/generate", {
    params: { prompt, version: $("gen-" + side).value, max_new_tokens: tokens },
  })));
  const texts = [];
  results.forEach((r, i) => {
    const side = sides[i];
    const out = $("gen-" + side + "-text");
    out.className = "gen";
    if (r.status === "fulfilled") {
      texts.push(r.value.text);
      out.replaceChildren(el("span", { class: "prompt" }, prompt), el("span", { class: "completion" }, r.value.text));
      $("gen-" + side + "-meta").textContent = "version " + label(r.value.version) + " · " + r.value.tokens +
        " tokens · " + r.value.seconds.toFixed(2) + " s";
    } else {
      out.classList.add("failed");
      out.textContent = describe(r.reason);
      $("gen-" + side + "-meta").textContent = "";
    }
  });
  if (texts.length === 2) {
    const same = texts[0] === texts[1];
    for (const side of sides) $("gen-" + side + "-text").classList.toggle("differs", !same);
  }
  $("gen-submit").disabled = false;
}

// ---- edits -----------------------------------------------------------------------------------

function editStatus(text, kind = "") {
  const box = $("edit-status");
  box.className = "status " + kind;
  box.replaceChildren(...[text].flat(Infinity));
}

async function submitEdit(event) {
  event.preventDefault();
  const fact = { prompt: $("edit-prompt").value, target_new: $("edit-target").value };
  if ($("edit-subject").value.trim()) fact.subject = $("edit-subject").value.trim();
  const body = { facts: [fact], branch: state.branch };
  if ($("edit-method").value) body.method = $("edit-method").value;
  const raw = $("edit-hparams").value.trim();
  if (raw) {
    try {
      body.hparams = JSON.parse(raw);
    } catch (e) {
      editStatus("hparams is not valid JSON: " + e.message, "failed");
      return;
    }
  }
  $("edit-submit").disabled = true;
  try {
    const accepted = await api("/edits", { method: "POST", body });
    state.job = accepted.job_id;
    editStatus("queued on " + accepted.branch + " (#" + accepted.seq + ")", "queued");
    pollEdit(accepted.job_id);
  } catch (err) {
    editStatus(describe(err), "failed");
    $("edit-submit").disabled = false;
  }
}

async function cancelEdit(jobId) {
  try {
    await api("/edits/" + jobId, { method: "DELETE" });
  } catch (err) {
    notice(describe(err));
  }
}

async function pollEdit(jobId) {
  const bar = $("edit-progress");
  let s;
  try {
    s = await api("/edits/" + jobId);
  } catch (err) {
    editStatus(describe(err), "failed");
    $("edit-submit").disabled = false;
    return;
  }
  const cancel = el("button", { type: "button", class: "quiet", onclick: () => cancelEdit(jobId) }, "cancel");
  if (s.status === "queued") {
    editStatus(["queued" + (s.position !== undefined ? ", " + s.position + " ahead" : "") + " ", cancel], "queued");
  } else if (s.status === "running") {
    const p = s.progress;
    bar.hidden = !p;
    if (p) {
      bar.max = p.steps;
      bar.value = p.step;
    }
    editStatus(["running" + (p ? ": step " + p.step + " of " + p.steps : "") +
      (p && typeof p.loss === "number" ? ", loss " + p.loss.toFixed(3) : "") +
      (s.cancel_requested ? " (cancel requested)" : "") + " ", cancel], "running");
  } else {
    bar.hidden = true;
    $("edit-submit").disabled = false;
    state.job = null;
    if (s.status === "succeeded") {
      showSucceeded(s);
      if (s.branch && s.branch !== state.branch) state.branch = s.branch;
      await refresh();
      if (s.metrics_pending) setTimeout(() => pollMetrics(jobId), POLL_MS);
    } else {
      editStatus(s.status + (s.error ? ": " + s.error : ""), "failed");
    }
    return;
  }
  setTimeout(() => pollEdit(jobId), POLL_MS);
}

function showSucceeded(s) {
  editStatus(["succeeded: version ", el("code", { id: "edit-version", title: s.version }, short(s.version)), " ",
    metricChips(s.metrics), s.metrics_pending ? " measuring…" : ""], "succeeded");
}

// The version is live as soon as the edit succeeds; its metrics are measured after it.
async function pollMetrics(jobId) {
  if (state.job) return;  // another edit is being followed now
  let s;
  try {
    s = await api("/edits/" + jobId);
  } catch (err) {
    return;
  }
  if (state.job) return;
  showSucceeded(s);
  if (s.metrics_pending) {
    setTimeout(() => pollMetrics(jobId), POLL_MS);
  } else {
    await refresh();
  }
}

// ---- rollback --------------------------------------------------------------------------------

async function rollback(version) {
  const ok = window.confirm("Move branch \"" + state.branch + "\" back to " + label(version) + "?\n\n" +
    "The versions after it are kept: they can still be tagged or branched from.");
  if (!ok) return;
  try {
    const moved = await api("/branches/" + encodeURIComponent(state.branch) + "/rollback",
      { method: "POST", body: { version } });
    notice("Branch " + moved.name + " now at " + label(moved.version) + ".", "info");
    await refresh();
  } catch (err) {
    notice(describe(err));
  }
}

// ---- wiring ----------------------------------------------------------------------------------

// The edit methods and the default, as the API documents them (one list: editing/hparams.py).
async function loadMethods() {
  const spec = await (await fetch("/openapi.json")).json();
  const field = spec.components.schemas.EditRequest.properties.method;
  const methods = (field.anyOf || [field]).flatMap((s) => s.enum || []);
  const select = $("edit-method");
  const fallback = (field.description || "").match(/default ([\w-]+)/);
  if (fallback) select.options[0].textContent = "default (" + fallback[1] + ")";
  for (const m of methods) select.append(el("option", { value: m }, m));
}

async function refresh() {
  try {
    await loadRefs();
    await loadTimeline();
    fillVersionSelects();
    await loadFacts();
    if ($("notice").className === "error") notice("");
  } catch (err) {
    notice(describe(err));
  }
  document.body.dataset.ready = "true"; // the first load finished (tests and screenshots wait for it)
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    if (key) sessionStorage.setItem(KEY, key);
    $("key").value = "";
    showKey();
    refresh();
  });
  $("key-clear").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showKey();
    refresh();
  });
  $("branch").addEventListener("change", (event) => {
    state.branch = event.target.value;
    sessionStorage.setItem(BRANCH, state.branch);
    refresh();
  });
  $("edit-form").addEventListener("submit", submitEdit);
  $("gen-form").addEventListener("submit", generate);
  showKey();
  loadMethods().catch((err) => notice(describe(err))).finally(refresh);
});
