// The chat page: every column's answers side by side, streamed over SSE as the worker writes them.
// Model output is text: it is set with textContent, or, with "Render Markdown" on, escaped first and only then
// given a few Markdown forms (code blocks, inline code, bold, italics, headings, lists): no HTML of its own.
(function () {
  "use strict";

  const root = document.getElementById("chat");
  if (!root) return;
  const state = JSON.parse(document.getElementById("chat-state").textContent);
  const turnsBox = root.querySelector(".chat-turns");
  const statusText = root.querySelector(".status-text");
  const statusTimer = root.querySelector(".status-timer");
  const statusBox = root.querySelector(".chat-status");
  const form = root.querySelector(".chat-input");
  const stopButton = root.querySelector(".stop");
  const errorBox = root.querySelector(".chat-error");
  const markdownToggle = root.querySelector(".markdown-toggle");
  let cursor = Number(root.dataset.cursor || 0);
  let source = null;
  let streamJob = null;
  let timer = null;

  function csrf() {
    try { return JSON.parse(document.body.getAttribute("hx-headers"))["X-CSRFToken"]; } catch (e) { return ""; }
  }

  async function post(url, data, accept) {
    const body = new FormData();
    Object.entries(data || {}).forEach(([k, v]) => body.append(k, v));
    const response = await fetch(url, {method: "POST", body, headers: {"X-CSRFToken": csrf(), "Accept": accept || "application/json"}});
    let json = {};
    try { json = await response.json(); } catch (e) { /* not JSON */ }
    return {ok: response.ok, status: response.status, json};
  }

  // --- Markdown, safely -------------------------------------------------------------------------------------
  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function inline(escaped) {
    return escaped
      .replace(/`([^`\n]+)`/g, "<code>$1</code>")
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>");
  }

  function markdown(text) {
    const parts = text.split(/```/);
    let html = "";
    parts.forEach((part, i) => {
      if (i % 2 === 1) {  // a code block: its first line may name the language
        const body = part.replace(/^[^\n]*\n/, "");
        html += "<pre><code>" + escapeHtml(body) + "</code></pre>";
        return;
      }
      const blocks = part.split(/\n{2,}/);
      blocks.forEach((block) => {
        if (!block.trim()) return;
        const lines = block.split("\n");
        if (lines.every((l) => /^\s*([-*]|\d+\.)\s+/.test(l) || !l.trim())) {
          const ordered = /^\s*\d+\./.test(lines[0]);
          const items = lines.filter((l) => l.trim()).map((l) => "<li>" + inline(escapeHtml(l.replace(/^\s*([-*]|\d+\.)\s+/, ""))) + "</li>");
          html += (ordered ? "<ol>" : "<ul>") + items.join("") + (ordered ? "</ol>" : "</ul>");
          return;
        }
        const heading = /^(#{1,4})\s+(.*)$/.exec(lines[0]);
        if (heading && lines.length === 1) {
          const level = heading[1].length + 2;
          html += `<h${level}>` + inline(escapeHtml(heading[2])) + `</h${level}>`;
          return;
        }
        html += "<p>" + lines.map((l) => inline(escapeHtml(l))).join("<br>") + "</p>";
      });
    });
    return html;
  }

  function setText(el, text) {
    if (markdownToggle && markdownToggle.checked) {
      el.classList.add("markdown");
      el.innerHTML = markdown(text);  // escaped above, piece by piece
    } else {
      el.classList.remove("markdown");
      el.textContent = text;
    }
  }

  // --- drawing ------------------------------------------------------------------------------------------------
  function figures(answer) {
    if (!answer.done) return "writing…";
    if (answer.error) return `not answered: ${answer.error}`;
    const parts = [`${answer.tokens} token${answer.tokens === 1 ? "" : "s"}`];
    if (answer.first_token_s != null) parts.push(`first token ${answer.first_token_s.toFixed(2)} s`);
    if (answer.seconds != null && answer.seconds > 0 && answer.tokens) parts.push(`${(answer.tokens / answer.seconds).toFixed(1)} tok/s`);
    if (answer.stopped) parts.push("stopped");
    return parts.join(" · ");
  }

  function turnElement(message) {
    let el = turnsBox.querySelector(`.turn[data-index="${message.index}"]`);
    if (el) return el;
    el = document.createElement("section");
    el.className = "turn";
    el.dataset.index = message.index;
    const user = document.createElement("div");
    user.className = "user-message";
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = "You";
    const text = document.createElement("div");
    text.className = "text";
    user.append(who, text);
    const answers = document.createElement("div");
    answers.className = "answers";
    answers.style.gridTemplateColumns = `repeat(${state.columns.length}, minmax(0, 1fr))`;
    state.columns.forEach((column) => {
      const box = document.createElement("article");
      box.className = "answer";
      box.dataset.column = column.key;
      const head = document.createElement("header");
      head.textContent = column.label;
      const body = document.createElement("div");
      body.className = "text";
      const foot = document.createElement("footer");
      const fig = document.createElement("span");
      fig.className = "figures";
      foot.append(fig);
      const thumbs = document.createElement("span");  // every teammate may judge an answer
      thumbs.className = "thumbs";
      ["up", "down"].forEach((value) => {
        const b = document.createElement("button");
        b.type = "button";
        b.className = "thumb";
        b.dataset.value = value;
        b.setAttribute("aria-label", `thumbs ${value} for ${column.label}`);
        b.addEventListener("click", () => giveThumb(message.index, column.key, b));
        thumbs.append(b);
      });
      foot.append(thumbs);
      box.append(head, body, foot);
      answers.append(box);
    });
    el.append(user, answers);
    turnsBox.append(el);
    return el;
  }

  function drawThumbs(box, tally, done) {
    const thumbs = box.querySelector(".thumbs");
    if (!thumbs) return;
    thumbs.hidden = !done;
    tally = tally || {up: 0, down: 0, mine: null};
    thumbs.querySelectorAll(".thumb").forEach((b) => {
      const value = b.dataset.value;
      b.textContent = (value === "up" ? "▲ " : "▼ ") + tally[value];
      b.classList.toggle("mine", tally.mine === value);
      b.setAttribute("aria-pressed", tally.mine === value ? "true" : "false");
    });
  }

  function drawMessage(message) {
    const known = state.messages.findIndex((m) => m.index === message.index);
    const previous = known >= 0 ? state.messages[known] : null;
    if (previous) {  // thumbs are not in the stream's messages: keep the ones drawn
      message.answers.forEach((a) => {
        const old = previous.answers.find((p) => p.column === a.column);
        if (old && !a.thumbs) a.thumbs = old.thumbs;
      });
      state.messages[known] = message;
    } else {
      state.messages.push(message);
      state.messages.sort((a, b) => a.index - b.index);
    }
    const el = turnElement(message);
    el.querySelector(".user-message .text").textContent = message.content;
    message.answers.forEach((answer) => {
      const box = el.querySelector(`.answer[data-column="${CSS.escape(answer.column)}"]`);
      if (!box) return;
      const body = box.querySelector(".text");
      body.dataset.raw = answer.text;
      setText(body, answer.text);
      box.classList.toggle("writing", !answer.done);
      box.classList.toggle("stopped", answer.stopped);
      box.classList.toggle("refused", Boolean(answer.error));
      box.querySelector(".figures").textContent = figures(answer);
      drawThumbs(box, answer.thumbs, answer.done);
    });
    updateButtons();
  }

  function writing() {
    return state.messages.some((m) => m.answers.some((a) => !a.done));
  }

  function updateButtons() {
    if (stopButton) stopButton.hidden = !writing();
  }

  function drawStatus(status) {
    state.status = status;
    statusText.textContent = status.text;
    statusBox.dataset.state = status.state;
    clearInterval(timer);
    statusTimer.textContent = "";
    if (status.state === "loading" && status.since) {
      const since = Date.parse(status.since);
      const tick = () => { statusTimer.textContent = `${Math.max(0, (Date.now() - since) / 1000).toFixed(0)} s`; };
      tick();
      timer = setInterval(tick, 500);
    }
  }

  // --- the stream ---------------------------------------------------------------------------------------------
  function connect(job, after) {
    if (source) source.close();
    source = null;
    streamJob = job;
    if (!job) return;
    cursor = after;
    const url = `${root.dataset.streamUrl}?job=${job}&after=${after}`;
    source = new EventSource(url);
    source.addEventListener("answers", (e) => {
      cursor = Number(e.lastEventId || cursor);
      JSON.parse(e.data).forEach(drawMessage);
    });
    source.addEventListener("status", (e) => drawStatus(JSON.parse(e.data)));
    source.addEventListener("done", () => {
      source.close();
      source = null;
      refresh();
    });
  }

  async function refresh() {
    const response = await fetch(root.dataset.stateUrl, {headers: {"Accept": "application/json"}});
    if (!response.ok) return;
    const fresh = await response.json();
    fresh.messages.forEach(drawMessage);
    drawStatus(fresh.status);
  }

  async function giveThumb(index, column, button) {
    const mine = button.classList.contains("mine");
    const reply = await post(root.dataset.thumbUrl, {index, column, value: mine ? "none" : button.dataset.value});
    if (!reply.ok) return;
    const message = state.messages.find((m) => m.index === index);
    const answer = message && message.answers.find((a) => a.column === column);
    if (answer) answer.thumbs = reply.json;
    const box = turnsBox.querySelector(`.turn[data-index="${index}"] .answer[data-column="${CSS.escape(column)}"]`);
    if (box) drawThumbs(box, reply.json, true);
  }

  // --- sending --------------------------------------------------------------------------------------------------
  async function send(event) {
    event.preventDefault();
    const area = form.querySelector("textarea");
    const content = area.value;
    if (!content.trim()) return;
    errorBox.hidden = true;
    form.querySelector(".send").disabled = true;
    const reply = await post(root.dataset.sendUrl, {content});
    form.querySelector(".send").disabled = false;
    if (!reply.ok) {
      errorBox.textContent = Object.values((reply.json && reply.json.errors) || {}).join("; ") || `The message was refused (${reply.status}).`;
      errorBox.hidden = false;
      return;
    }
    area.value = "";
    drawMessage(reply.json.message);
    drawStatus(reply.json.status);
    if (!source || streamJob !== reply.json.job) connect(reply.json.job, streamJob === reply.json.job ? cursor : 0);
    turnElement(reply.json.message).scrollIntoView({block: "nearest"});
  }

  if (form) {
    form.addEventListener("submit", send);
    form.querySelector("textarea").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
    });
    stopButton.addEventListener("click", async () => {
      stopButton.disabled = true;
      await post(root.dataset.stopUrl, {});
      stopButton.disabled = false;
    });
  }
  if (markdownToggle) {
    markdownToggle.checked = localStorage.getItem("tunedeck.chat.markdown") === "1";
    markdownToggle.addEventListener("change", () => {
      localStorage.setItem("tunedeck.chat.markdown", markdownToggle.checked ? "1" : "0");
      turnsBox.querySelectorAll(".answer .text").forEach((el) => setText(el, el.dataset.raw || ""));
    });
  }
  const settings = root.querySelector(".settings-form");
  if (settings) {
    settings.addEventListener("submit", async (e) => {
      e.preventDefault();
      const data = Object.fromEntries(new FormData(settings).entries());
      const reply = await post(root.dataset.settingsUrl, data);
      const error = settings.querySelector(".settings-error");
      error.hidden = reply.ok;
      settings.querySelector(".settings-saved").hidden = !reply.ok;
      if (!reply.ok) error.textContent = Object.entries(reply.json.errors || {}).map(([k, v]) => `${k}: ${v}`).join("; ");
    });
  }

  const messages = state.messages;
  state.messages = [];
  turnsBox.replaceChildren();  // the server's drawing (for reading without JavaScript), drawn again live
  messages.forEach(drawMessage);
  drawStatus(state.status);
  const job = state.status.job;
  if (job && !["succeeded", "failed", "cancelled"].includes(state.status.job_state)) connect(job, cursor);
})();
