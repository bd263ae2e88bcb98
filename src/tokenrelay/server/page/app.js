// tokenrelay's chat page: sessions, streaming answers, stop, supersede, reload-and-resume.
//
// Every answer shown live is followed by a `Follow`: the stream of one run, read with fetch
// (so that it can send headers), its events applied to one message's view. Only the page's
// current follow (`state.active`) may touch the view; events of any other, and chunks of any
// other run (each chunk's `id` is its run's id), are dropped. Events are applied at most once:
// each carries its sequence number, which is also where a resume starts (`Last-Event-ID`).

import { renderMarkdown } from "./markdown.js";

const KEY_STORE = "tokenrelay.apiKey";
const MODEL_STORE = "tokenrelay.model";
// The API's paths are relative to the page, so that it works under a prefix too.
const BASE = new URL(".", location.href);
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"),
  scrim: $("scrim"),
  menu: $("menu"),
  title: $("title"),
  model: $("model"),
  transcript: $("transcript"),
  thread: $("thread"),
  empty: $("empty"),
  status: $("status"),
  announce: $("announce"),
  composer: $("composer"),
  prompt: $("prompt"),
  stop: $("stop"),
  send: $("send"),
  sessions: $("session-list"),
  newChat: $("new-chat"),
  keyButton: $("key-button"),
  dialog: $("dialog"),
  dialogForm: $("dialog-form"),
  dialogTitle: $("dialog-title"),
  dialogText: $("dialog-text"),
  dialogInput: $("dialog-input"),
  dialogOk: $("dialog-ok"),
  dialogCancel: $("dialog-cancel"),
};

const state = {
  sessionId: null, // the chat on screen (also in the URL: #session=<id>)
  turns: [], // {role: "user", text} | {role: "assistant", view}
  active: null, // the Follow whose events may touch the view
  opening: 0, // bumped by each openSession(): a slower, older load is dropped
  history: Promise.resolve(), // settled once the chat's stored messages are on screen
  listing: 0, // the same for the session list
  sessions: [],
};

// ---------------------------------------------------------------- small things

const now = () => performance.now();
const seconds = (ms) => (ms / 1000).toFixed(1);
const tokens = (n) => `${n} token${n === 1 ? "" : "s"}`;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function icon(path) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 20 20");
  svg.setAttribute("aria-hidden", "true");
  const shape = document.createElementNS(SVG, "path");
  shape.setAttribute("d", path);
  svg.append(shape);
  return svg;
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(signal.reason);
    });
  });
}

/** A fresh, unguessable session id (also outside secure contexts). */
function newSessionId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function sessionFromHash() {
  const match = /^#session=([A-Za-z0-9._:@%-]{1,400})$/.exec(location.hash);
  if (!match) return null;
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return null;
  }
}

function setHash(id) {
  const url = id ? `#session=${encodeURIComponent(id)}` : location.pathname + location.search;
  if ((id ? url : "") !== location.hash) history.replaceState(null, "", url);
}

function ago(epochSeconds) {
  const s = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(epochSeconds * 1000).toLocaleDateString();
}

// ---------------------------------------------------------------- dialogs and the API key

function ask({ title, text, input = false, ok = "OK", danger = false }) {
  return new Promise((resolve) => {
    ui.dialogTitle.textContent = title;
    ui.dialogText.textContent = text;
    ui.dialogInput.hidden = !input;
    ui.dialogInput.value = input ? apiKey : "";
    ui.dialogOk.textContent = ok;
    ui.dialogOk.classList.toggle("danger", danger);
    const finish = (value) => {
      ui.dialogForm.removeEventListener("submit", onSubmit);
      ui.dialogCancel.removeEventListener("click", onCancel);
      ui.dialog.removeEventListener("cancel", onCancel);
      ui.dialog.close();
      resolve(value);
    };
    const onSubmit = (event) => {
      event.preventDefault();
      finish(input ? ui.dialogInput.value : true);
    };
    const onCancel = (event) => {
      event.preventDefault();
      finish(input ? null : false);
    };
    ui.dialogForm.addEventListener("submit", onSubmit);
    ui.dialogCancel.addEventListener("click", onCancel);
    ui.dialog.addEventListener("cancel", onCancel);
    ui.dialog.showModal();
    (input ? ui.dialogInput : ui.dialogOk).focus();
  });
}

let apiKey = localStorage.getItem(KEY_STORE) ?? "";
let asking = null;

/** Ask for the API key (once, however many requests are waiting for it). */
function askForKey(text) {
  asking ??= ask({ title: "API key", text, input: true, ok: "Save" }).then((value) => {
    asking = null;
    if (value === null) return false;
    apiKey = value.trim();
    localStorage.setItem(KEY_STORE, apiKey);
    return true;
  });
  return asking;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body?.error?.message ?? `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

/** fetch() on the relay's API, with the key; a 401 asks for the key and tries again. */
async function api(path, { method = "GET", json, headers = {}, signal } = {}) {
  for (;;) {
    const sent = new Headers(headers);
    if (apiKey) sent.set("Authorization", `Bearer ${apiKey}`);
    let body;
    if (json !== undefined) {
      sent.set("Content-Type", "application/json");
      body = JSON.stringify(json);
    }
    const response = await fetch(new URL(path, BASE), {
      method,
      headers: sent,
      body,
      signal,
      cache: "no-store",
      credentials: "omit",
    });
    if (response.status === 401) {
      const message = await errorMessage(response);
      const text = apiKey
        ? `The relay refused that key (${message}). Enter a valid one.`
        : "This relay needs an API key. It is kept in this browser's local storage.";
      if (!(await askForKey(text))) throw new ApiError(401, message);
      continue;
    }
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    return response;
  }
}

// ---------------------------------------------------------------- server-sent events

/** Server-sent events from text chunks: calls `onEvent({event, data, id, retry})`. */
class SSEParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.rest = "";
    this.reset();
  }

  reset() {
    this.data = [];
    this.event = "";
    this.id = null;
    this.retry = null;
  }

  feed(text) {
    let buffer = this.rest + text;
    let held = "";
    if (buffer.endsWith("\r")) {
      held = "\r"; // maybe the first half of "\r\n"
      buffer = buffer.slice(0, -1);
    }
    const lines = buffer.split(/\r\n|\r|\n/);
    this.rest = lines.pop() + held;
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") {
      if (this.data.length) {
        const { event, id, retry } = this;
        this.onEvent({ event: event || "message", data: this.data.join("\n"), id, retry });
      }
      this.reset();
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id" && !value.includes("\0")) this.id = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
  }
}

// ---------------------------------------------------------------- views

const BADGES = {
  stopped: "stopped",
  superseded: "superseded",
  error: "error",
  interrupted: "interrupted",
  shutdown: "stopped: server shut down",
};

function scrolledToEnd() {
  const t = ui.transcript;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 80;
}

/** Keep the newest text in view while it grows, unless the reader scrolled up. */
function keepingEnd(change) {
  const stick = scrolledToEnd();
  change();
  if (stick) ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

function showThread() {
  ui.empty.hidden = state.turns.length > 0;
}

function addUser(text) {
  const node = el("article", "msg user");
  node.append(el("div", "bubble", text));
  keepingEnd(() => ui.thread.append(node));
  state.turns.push({ role: "user", text });
  showThread();
  if (state.turns.filter((t) => t.role === "user").length === 1) setTitle(text);
}

/** One assistant message: reasoning (collapsed), tool calls (cards), the answer. */
class AssistantView {
  constructor() {
    this.node = el("article", "msg assistant");
    const avatar = el("div", "avatar");
    const body = el("div", "body");
    this.reasoningBox = el("details", "reasoning");
    this.reasoningLabel = el("summary", "", "Reasoning");
    this.reasoningText = el("div", "reasoning-text");
    this.reasoningBox.append(this.reasoningLabel, this.reasoningText);
    this.reasoningBox.hidden = true;
    this.toolsBox = el("div", "tools");
    this.toolsBox.hidden = true;
    this.answer = el("div", "answer");
    this.answer.dataset.testid = "assistant";
    this.badge = el("span", "badge");
    this.badge.hidden = true;
    body.append(this.reasoningBox, this.toolsBox, this.answer, this.badge);
    this.node.append(avatar, body);
    this.content = "";
    this.reasoning = "";
    this.tools = [];
    this.dirty = false;
    this.setState("waiting");
  }

  addContent(text) {
    this.content += text;
    this.dirty = true;
  }

  addReasoning(text) {
    this.reasoning += text;
    this.dirty = true;
  }

  addToolCalls(deltas) {
    for (const delta of deltas) {
      const call = (this.tools[delta.index ?? 0] ??= { id: "", name: "", arguments: "" });
      if (delta.id) call.id = delta.id;
      if (delta.function?.name) call.name += delta.function.name;
      if (delta.function?.arguments) call.arguments += delta.function.arguments;
    }
    this.dirty = true;
  }

  clear() {
    this.content = "";
    this.reasoning = "";
    this.tools = [];
    this.dirty = true;
    this.flush();
  }

  flush() {
    if (!this.dirty) return;
    this.dirty = false;
    keepingEnd(() => {
      renderMarkdown(this.content, this.answer);
      this.reasoningBox.hidden = this.reasoning === "";
      this.reasoningText.textContent = this.reasoning;
      const words = this.reasoning.split(/\s+/).filter(Boolean).length;
      const thinking = this.node.dataset.status === "streaming" && this.content === "";
      this.reasoningLabel.textContent = thinking ? "Thinking…" : `Reasoning · ${words} words`;
      this.toolsBox.hidden = this.tools.length === 0;
      this.toolsBox.replaceChildren(...this.tools.filter(Boolean).map(toolCard));
    });
  }

  setState(status, reason) {
    this.node.dataset.status = status;
    const label = status === "stopped" ? BADGES[reason] ?? BADGES.stopped : BADGES[status];
    this.badge.hidden = !label;
    this.badge.textContent = label ?? "";
    this.badge.className = `badge ${status}`;
    this.dirty = true;
    this.flush();
  }
}

function toolCard(call) {
  const card = el("div", "tool-card");
  const head = el("div", "tool-head");
  head.append(icon("M11 3 6 10h4l-1 7 5-7h-4z"), el("code", "tool-name", call.name || "tool"));
  let args = call.arguments;
  try {
    args = JSON.stringify(JSON.parse(call.arguments), null, 2);
  } catch {
    // still streaming, or not JSON: shown as it is
  }
  card.append(head, el("pre", "tool-args", args));
  return card;
}

function addAssistant() {
  const view = new AssistantView();
  keepingEnd(() => ui.thread.append(view.node));
  state.turns.push({ role: "assistant", view });
  showThread();
  return view;
}

function setTitle(text) {
  const title = text ? text.replace(/\s+/g, " ").trim() : "";
  ui.title.textContent = title || "New chat";
  document.title = title ? `${title.slice(0, 60)} · tokenrelay` : "tokenrelay";
}

// ---------------------------------------------------------------- the status line

// What a screen reader is told: changes of state only, not every tick of the status line.
const ANNOUNCED = new Set(["waiting", "done", "stopped", "superseded", "error", "reconnecting"]);

function setStatus(kind, text) {
  if (kind !== ui.status.dataset.state && ANNOUNCED.has(kind)) {
    ui.announce.textContent = kind === "waiting" ? "Waiting for the answer" : text;
  }
  ui.status.dataset.state = kind;
  ui.status.textContent = text;
}

/** The status line of the current follow (called often while something runs). */
function tick() {
  const follow = state.active;
  if (follow === null || follow.ended || follow.frozen) return;
  if (follow.phase === "waiting") {
    setStatus("waiting", `Waiting for the first token… ${seconds(now() - follow.started)} s`);
  } else if (follow.phase === "streaming") {
    const elapsed = Math.max(now() - follow.firstAt, 1);
    const rate = follow.tokens > 1 ? ((follow.tokens - 1) * 1000) / elapsed : 0;
    setStatus("streaming", `Streaming · ${tokens(follow.tokens)} · ${rate.toFixed(1)} tokens/s`);
  } else if (follow.phase === "resuming") {
    setStatus("waiting", "Resuming the running answer…");
  } else if (follow.phase === "reconnecting") {
    const left = Math.ceil((follow.reconnectAt - now()) / 1000);
    setStatus(
      "reconnecting",
      left > 0 ? `Connection lost · reconnecting in ${left} s…` : "Connection lost · reconnecting…",
    );
  }
}

function updateButtons() {
  const follow = state.active;
  ui.stop.disabled = follow === null || follow.ended || follow.frozen;
  ui.app.classList.toggle("running", !ui.stop.disabled);
}

// ---------------------------------------------------------------- following a run

class Follow {
  constructor(sessionId, view, { runId = null } = {}) {
    this.sessionId = sessionId;
    this.view = view;
    this.runId = runId;
    this.lastSeq = -1; // the last event applied; a resume asks for the ones after it
    this.controller = new AbortController();
    this.phase = "waiting"; // waiting | resuming | streaming | reconnecting | ended
    this.started = now();
    this.firstAt = null;
    this.tokens = 0;
    this.ended = false;
    this.frozen = false; // stopped by this page: nothing more is shown
    this.error = null;
    this.relay = null;
    this.attempt = 0;
    this.retryMs = 3000;
    this.reconnectAt = 0;
    this.stopping = null; // the POST /stop of this page's Stop, until it has answered
    // Resuming a stored partial answer: its text stays until the first replayed event
    // replaces it (or, if the replay is no longer possible, until the run ends).
    this.replacing = false;
    // Resuming after the stored answer's last event (`last_seq` of /messages): its text stays
    // and grows (or, if the replay is no longer possible, follows the stored answer).
    this.fromStored = false;
    this.storedShape = null; // what followStored last showed
    this.gap = false;
    // Settled once the run has started (its response's headers came) or failed to.
    this.accepted = new Promise((resolve) => {
      this.accept = resolve;
    });
    if (runId !== null) this.accept();
  }

  get current() {
    return state.active === this;
  }

  /** Stop following (the run goes on, on the server). */
  detach() {
    this.controller.abort();
  }

  /** Read a response's event stream until its end; reconnect if it breaks first. */
  async read(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SSEParser((event) => this.onEvent(event));
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.feed(value);
        if (!this.current) break;
        this.view.flush();
        tick();
        if (this.ended) break;
      }
    } catch {
      // the connection broke (or we aborted it)
    } finally {
      reader.cancel().catch(() => {});
    }
    if (this.ended || !this.current || this.controller.signal.aborted) return;
    await this.reconnect();
  }

  onEvent(event) {
    if (!this.current) return; // a stale stream never touches the view
    if (event.retry !== null) this.retryMs = event.retry;
    if (event.id !== null) {
      const seq = Number(event.id);
      if (!(seq > this.lastSeq)) return; // already applied
      this.lastSeq = seq;
      this.attempt = 0;
      if (this.replacing) {
        this.replacing = false; // the replay is here: it shows the text from its start
        this.view.clear();
      }
    }
    if (event.event === "error") {
      try {
        const error = JSON.parse(event.data).error;
        this.error = error.message;
        this.gap = error.type === "replay_gap";
      } catch {
        this.error = event.data;
      }
      return;
    }
    if (event.data === "[DONE]") {
      this.finish();
      return;
    }
    let chunk;
    try {
      chunk = JSON.parse(event.data);
    } catch {
      return;
    }
    if (chunk.id) {
      if (this.runId === null) this.runId = chunk.id;
      else if (chunk.id !== this.runId) return; // another run's chunk
    }
    if (chunk.relay) this.relay = chunk.relay;
    if (this.frozen) return;
    for (const choice of chunk.choices ?? []) {
      if ((choice.index ?? 0) !== 0) continue;
      const delta = choice.delta ?? {};
      const reasoning = delta.reasoning_content ?? delta.reasoning;
      if (typeof reasoning === "string" && reasoning) {
        this.view.addReasoning(reasoning);
        this.counted();
      }
      if (Array.isArray(delta.tool_calls) && delta.tool_calls.length) {
        this.view.addToolCalls(delta.tool_calls);
        this.counted();
      }
      if (typeof delta.content === "string" && delta.content) {
        this.view.addContent(delta.content);
        this.counted();
      }
    }
  }

  counted() {
    this.tokens += 1;
    if (this.firstAt === null) {
      this.firstAt = now();
      this.phase = "streaming";
      this.view.setState("streaming");
    }
  }

  finish() {
    if (this.gap && (this.replacing || this.fromStored)) {
      // Its first events are no longer held: keep the stored text, and follow the stored
      // answer instead until the run ends.
      this.followStored();
      return;
    }
    this.ended = true;
    this.phase = "ended";
    updateButtons();
    refreshSessions();
    const kept = tokens(this.tokens);
    if (this.frozen) {
      this.view.setState("stopped", "stopped");
      setStatus("stopped", `Stopped · ${kept} kept`);
    } else if (this.error !== null) {
      this.view.setState("error");
      setStatus("error", `Error: ${this.error}`);
    } else if (this.relay?.status === "stopped") {
      const reason = this.relay.reason;
      if (reason === "superseded") {
        // Another tab (or client) sent a message in this chat: show its run.
        this.view.setState("superseded");
        setStatus("superseded", "Superseded: a newer message in this chat took over");
        openSession(this.sessionId, { keepStatus: true });
      } else {
        this.view.setState("stopped", reason);
        setStatus("stopped", reason === "stopped" ? `Stopped · ${kept} kept` : `Stopped (${reason})`);
      }
    } else {
      this.view.setState("done");
      setStatus("done", `Done · ${kept} in ${seconds(now() - this.started)} s`);
    }
  }

  fail(message) {
    this.ended = true;
    this.phase = "ended";
    this.view.setState("error");
    setStatus("error", `Error: ${message}`);
    updateButtons();
  }

  /** Show the stored answer of this run as it grows, until it is no longer running. */
  async followStored() {
    this.phase = "streaming";
    tick();
    for (;;) {
      try {
        await sleep(1000, this.controller.signal);
      } catch {
        return;
      }
      if (!this.current) return;
      let messages;
      try {
        messages = await storedMessages(this.sessionId);
      } catch {
        continue;
      }
      const answer = messages.find((m) => m.role === "assistant" && m.run_id === this.runId);
      if (answer === undefined) return;
      const shape = storedShape(answer);
      if (answer.content || answer.reasoning_content || answer.tool_calls?.length) {
        if (shape !== this.storedShape) showStored(this.view, answer);
        this.storedShape = shape;
      }
      if (answer.status !== "running") {
        this.ended = true;
        this.phase = "ended";
        if (answer.status === "stopped") {
          this.view.setState("stopped", answer.reason);
          setStatus("stopped", `Stopped (${answer.reason})`);
        } else if (answer.status === "error") {
          this.view.setState(answer.reason === "interrupted" ? "interrupted" : "error");
          setStatus("error", `Error: ${answer.reason}`);
        } else {
          this.view.setState("done");
          setStatus("done", "Done");
        }
        updateButtons();
        refreshSessions();
        return;
      }
    }
  }

  /** Sending a new message superseded this answer: freeze it, mark it, stop reading. */
  supersede() {
    this.frozen = true;
    this.ended = true;
    this.phase = "ended";
    this.view.setState("superseded");
    this.detach();
  }

  /** Wait (with a countdown on the status line), then resume after the last event. */
  async reconnect() {
    this.attempt += 1;
    const delay =
      this.attempt === 1 ? 1000 : Math.min(this.retryMs * 2 ** (this.attempt - 2), 30000);
    this.phase = "reconnecting";
    this.reconnectAt = now() + delay;
    tick();
    try {
      await sleep(delay, this.controller.signal);
    } catch {
      return;
    }
    if (this.current) await this.resume();
  }

  /** Follow the run again from the event after the last one applied. */
  async resume() {
    // A page that opens a running answer resumes it; a broken stream reconnects.
    this.phase = this.attempt === 0 ? "resuming" : "reconnecting";
    this.reconnectAt = 0;
    tick();
    let response;
    try {
      response = await api(`v1/sessions/${encodeURIComponent(this.sessionId)}/stream`, {
        headers: { "Last-Event-ID": String(this.lastSeq) },
        signal: this.controller.signal,
      });
    } catch (error) {
      if (this.controller.signal.aborted || !this.current) return;
      if (error instanceof ApiError && error.status < 500) {
        this.fail(error.message);
        return;
      }
      await this.reconnect();
      return;
    }
    if (!this.current) return;
    const runId = response.headers.get("X-Run-Id");
    if (this.runId !== null && runId !== null && runId !== this.runId) {
      // The session has moved on to a newer run: show the session as it is now.
      response.body.cancel().catch(() => {});
      this.ended = true;
      openSession(this.sessionId);
      return;
    }
    this.runId ??= runId;
    this.phase = this.firstAt === null ? "waiting" : "streaming";
    tick();
    await this.read(response);
  }
}

// ---------------------------------------------------------------- actions

/** The conversation so far, as OpenAI messages. */
function conversation() {
  const messages = [];
  for (const turn of state.turns) {
    if (turn.role === "user") messages.push({ role: "user", content: turn.text });
    else if (turn.view.content) messages.push({ role: "assistant", content: turn.view.content });
  }
  return messages;
}

async function send() {
  const text = ui.prompt.value;
  if (!text.trim()) return;
  // The chat's stored messages first: they are the conversation this message continues.
  await state.history;
  ui.prompt.value = "";
  autosize();
  if (state.sessionId === null) {
    state.sessionId = newSessionId();
    setHash(state.sessionId);
  }
  const previous = state.active;
  if (previous !== null && !previous.ended) {
    if (previous.frozen) previous.detach();
    else previous.supersede();
  }
  const messages = [...conversation(), { role: "user", content: text }];
  addUser(text);
  const view = addAssistant();
  const follow = new Follow(state.sessionId, view);
  state.active = follow;
  updateButtons();
  tick();
  const body = { model: ui.model.value || undefined, messages, stream: true };
  // A Stop still on its way must not land on this new answer's run.
  await previous?.stopping;
  let response;
  try {
    response = await api("v1/chat/completions", {
      method: "POST",
      json: body,
      headers: { "X-Session-Id": follow.sessionId },
      signal: follow.controller.signal,
    });
  } catch (error) {
    if (follow.current && !follow.controller.signal.aborted) follow.fail(error.message);
    return;
  } finally {
    follow.accept();
  }
  if (!follow.current) {
    response.body.cancel().catch(() => {});
    return;
  }
  follow.runId = response.headers.get("X-Run-Id");
  refreshSessions();
  await follow.read(response);
}

async function stop() {
  const follow = state.active;
  if (follow === null || follow.ended || follow.frozen) return;
  follow.frozen = true; // the text freezes now, whatever is still on its way
  follow.view.setState("stopped", "stopped");
  setStatus("stopped", "Stopping…");
  updateButtons();
  follow.stopping = stopRun(follow).then(
    () => null,
    (error) => error,
  );
  const error = await follow.stopping;
  follow.stopping = null;
  if (!follow.current) return;
  if (error !== null) setStatus("error", `Error: ${error.message}`);
  else setStatus("stopped", `Stopped · ${tokens(follow.tokens)} kept`);
}

/** POST /stop for `follow`'s run. A Stop pressed so soon that the run had not started when
 * the server got it (nothing stopped, or another run) is sent again once it has. */
async function stopRun(follow) {
  const path = `v1/sessions/${encodeURIComponent(follow.sessionId)}/stop`;
  const post = async () => {
    try {
      return await (await api(path, { method: "POST" })).json();
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) return { stopped: false };
      throw error;
    }
  };
  const result = await post();
  if (result.stopped && follow.runId !== null && result.run_id === follow.runId) return;
  await follow.accepted;
  if (!follow.ended && follow.runId !== null && result.run_id !== follow.runId) await post();
}

/** Show session `id` (null: a new chat) as stored, and follow its running answer if any. */
async function openSession(id, { keepStatus = false } = {}) {
  let loaded;
  state.history = new Promise((resolve) => {
    loaded = resolve;
  });
  try {
    await showSession(id, keepStatus, loaded);
  } finally {
    loaded();
  }
}

async function showSession(id, keepStatus, loaded) {
  const opening = ++state.opening;
  state.active?.detach();
  state.active = null;
  state.sessionId = id;
  state.turns = [];
  ui.thread.replaceChildren(ui.empty);
  showThread();
  setHash(id);
  setTitle("");
  markActiveSession();
  updateButtons();
  if (!keepStatus) setStatus("idle", "Ready");
  if (id === null) return;
  let messages;
  try {
    messages = await storedMessages(id);
  } catch (error) {
    if (opening === state.opening) setStatus("error", `Error: ${error.message}`);
    return;
  }
  if (opening !== state.opening) return;
  let last = null;
  for (const message of messages) {
    if (message.role === "user") {
      addUser(message.content ?? "");
      continue;
    }
    const view = addAssistant();
    showStored(view, message);
    if (message.status === "stopped") view.setState("stopped", message.reason);
    else if (message.status === "error") {
      view.setState(message.reason === "interrupted" ? "interrupted" : "error");
    } else view.setState(message.status === "running" ? "waiting" : "done");
    last = { message, view };
  }
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  loaded(); // the history is on screen: a message sent now continues it
  if (last !== null && last.message.status === "running") {
    const follow = new Follow(id, last.view, { runId: last.message.run_id ?? null });
    if (Number.isInteger(last.message.last_seq)) {
      // The answer as it is through event `last_seq` is on screen: resume after it.
      follow.lastSeq = last.message.last_seq;
      follow.fromStored = true;
      if (last.view.content || last.view.reasoning || last.view.tools.length) {
        follow.firstAt = now(); // its first tokens are on screen already
        last.view.setState("streaming");
      }
    } else {
      // Replayed from its first event: the stored text is replaced by the replay's, which
      // appears once, whole, then follows live.
      follow.replacing = true;
    }
    state.active = follow;
    updateButtons();
    await follow.resume();
  }
}

/** Show a stored answer in `view` (content, reasoning and tool calls), in place of what it
 * showed. */
function showStored(view, message) {
  view.clear();
  view.addContent(message.content ?? "");
  view.addReasoning(message.reasoning_content ?? message.reasoning ?? "");
  if (Array.isArray(message.tool_calls)) {
    view.addToolCalls(message.tool_calls.map((call, index) => ({ index, ...call })));
  }
  view.flush();
}

/** A stored answer's text, reasoning and tool calls, to tell whether it has changed. */
function storedShape(message) {
  return JSON.stringify([
    message.content ?? "",
    message.reasoning_content ?? message.reasoning ?? "",
    message.tool_calls ?? [],
  ]);
}

/** A session's stored messages. Without a store (`--db :memory:`) only a running answer is
 * known: its text is replayed when it is followed. Unknown: no messages (a new chat). */
async function storedMessages(id) {
  const path = `v1/sessions/${encodeURIComponent(id)}`;
  try {
    return (await (await api(`${path}/messages`)).json()).data;
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) throw error;
  }
  try {
    const run = await (await api(path)).json();
    if (run.status === "running") {
      return [{ role: "assistant", content: "", status: "running", run_id: run.run_id }];
    }
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) throw error;
  }
  return [];
}

async function refreshSessions() {
  const listing = ++state.listing;
  let data;
  try {
    data = (await (await api("v1/sessions?limit=100")).json()).data;
  } catch {
    return;
  }
  if (listing !== state.listing) return;
  state.sessions = data;
  ui.sessions.replaceChildren(...data.map(sessionItem));
  if (data.length === 0) ui.sessions.append(el("li", "none", "No chats yet"));
  markActiveSession();
}

function sessionItem(session) {
  const item = el("li", "session");
  item.dataset.sessionId = session.id;
  const open = el("button", "open");
  open.type = "button";
  open.append(
    el("span", "session-title", session.title || "Untitled"),
    el("span", "session-time", ago(session.updated_at)),
  );
  open.addEventListener("click", () => {
    closeSidebar();
    if (session.id !== state.sessionId) openSession(session.id);
  });
  const remove = el("button", "delete");
  remove.type = "button";
  remove.title = "Delete chat";
  remove.setAttribute("aria-label", "Delete chat");
  remove.append(icon("M4 6h12M8 6V4h4v2M6 6l1 10h6l1-10"));
  remove.addEventListener("click", () => deleteSession(session));
  item.append(open, remove);
  return item;
}

function markActiveSession() {
  for (const item of ui.sessions.querySelectorAll(".session")) {
    item.classList.toggle("active", item.dataset.sessionId === state.sessionId);
  }
}

async function deleteSession(session) {
  const confirmed = await ask({
    title: "Delete this chat?",
    text: `“${(session.title || "Untitled").slice(0, 80)}” and its answers will be removed from the relay. This cannot be undone.`,
    ok: "Delete",
    danger: true,
  });
  if (!confirmed) return;
  try {
    await api(`v1/sessions/${encodeURIComponent(session.id)}`, { method: "DELETE" });
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 404)) {
      setStatus("error", `Error: ${error.message}`);
      return;
    }
  }
  if (session.id === state.sessionId) openSession(null);
  refreshSessions();
}

async function loadModels() {
  let models = [];
  try {
    models = (await (await api("v1/models")).json()).data ?? [];
  } catch {
    // the upstream is unreachable: requests go out without a model (the server's default)
  }
  const saved = localStorage.getItem(MODEL_STORE);
  const options = models.map((m) => {
    const option = el("option", "", m.id);
    option.value = m.id;
    return option;
  });
  if (options.length === 0) {
    const option = el("option", "", "default model");
    option.value = "";
    options.push(option);
  }
  ui.model.replaceChildren(...options);
  if (saved && models.some((m) => m.id === saved)) ui.model.value = saved;
}

// ---------------------------------------------------------------- wiring

function autosize() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${Math.min(ui.prompt.scrollHeight, 200)}px`;
}

function closeSidebar() {
  ui.app.classList.remove("sidebar-open");
  ui.menu.setAttribute("aria-expanded", "false");
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
ui.prompt.addEventListener("input", autosize);
ui.stop.addEventListener("click", () => stop());
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && !ui.dialog.open) {
    if (ui.app.classList.contains("sidebar-open")) closeSidebar();
    else stop();
  }
});
ui.newChat.addEventListener("click", () => {
  closeSidebar();
  openSession(null);
  ui.prompt.focus();
});
ui.menu.addEventListener("click", () => {
  const open = ui.app.classList.toggle("sidebar-open");
  ui.menu.setAttribute("aria-expanded", String(open));
});
ui.scrim.addEventListener("click", closeSidebar);
ui.model.addEventListener("change", () => localStorage.setItem(MODEL_STORE, ui.model.value));
ui.keyButton.addEventListener("click", async () => {
  if (await askForKey("The key this page sends to the relay (kept in local storage).")) {
    refreshSessions();
    loadModels();
  }
});
window.addEventListener("hashchange", () => {
  const id = sessionFromHash();
  if (id !== state.sessionId) openSession(id);
});
setInterval(tick, 250);

loadModels();
refreshSessions();
openSession(sessionFromHash());
ui.prompt.focus();
