// The chat: the active branch of the open conversation, streamed answers, stop, regenerate, continue, edit,
// branches (‹ 2/3 ›), pins, per-message numbers, the prefill progress bar and the context meter.

import * as api from "./api.js";
import { el, inFrame } from "./frame.js";
import { copyText, renderMarkdown } from "./render.js";
import { VirtualList } from "./vlist.js";

export class Chat {
  constructor(app) {
    this.app = app;
    this.conversation = null;
    this.byId = new Map(); // message id -> message (the whole tree)
    this.children = new Map(); // parent id ("" for the roots) -> child messages, oldest first
    this.path = []; // the active branch's messages
    this.live = null; // the answer streaming now: {key, content, ...}
    this.controller = null;
    this.messagesBox = document.getElementById("messages");
    this.list = new VirtualList(this.messagesBox, this.messagesBox.firstElementChild, (item) => this.renderItem(item));
    this.input = document.getElementById("input");
    this.sendButton = document.getElementById("send");
    this.stopButton = document.getElementById("stop");
    this.notice = document.getElementById("notice");
    this.meter = document.getElementById("meter");
    document.getElementById("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    this.input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.send();
      }
    });
    this.stopButton.addEventListener("click", () => this.stop());
    this.messagesBox.addEventListener("click", (event) => this.clicked(event));
  }

  get busy() {
    return this.controller !== null;
  }

  // --- loading ---------------------------------------------------------------------------------------

  async open(conversationId) {
    const data = await api.get(`/api/conversations/${conversationId}?view=tree`);
    this.conversation = data.conversation;
    this.byId = new Map(data.messages.map((message) => [message.id, message]));
    this.children = new Map();
    for (const message of data.messages) {
      const key = message.parent_id || "";
      if (!this.children.has(key)) this.children.set(key, []);
      this.children.get(key).push(message);
    }
    for (const siblings of this.children.values()) siblings.sort((a, b) => a.created_at - b.created_at);
    this.path = data.active_path.map((id) => this.byId.get(id)).filter(Boolean);
    this.live = null;
    this.showItems();
    this.list.scrollToBottom();
    this.app.conversationOpened(this.conversation);
    this.updateMeter();
    return this.conversation;
  }

  clear() {
    this.conversation = null;
    this.byId.clear();
    this.children.clear();
    this.path = [];
    this.live = null;
    this.showItems();
    this.meter.hidden = true;
    this.app.conversationOpened(null);
  }

  showItems(path = this.path) {
    const items = path.filter((message) => message.role !== "system").map((message) => ({ key: message.id, message }));
    if (this.live && !items.some((item) => item.key === this.live.key)) items.push({ key: this.live.key, live: true });
    for (const item of items) this.list.refresh(item.key);
    this.list.setItems(items);
  }

  async updateMeter() {
    if (!this.conversation) return;
    try {
      const { context } = await api.get(`/api/conversations/${this.conversation.id}/context`);
      this.showMeter(context);
    } catch (error) {
      this.showNotice(error.message);
    }
  }

  showMeter(context) {
    this.meter.hidden = false;
    const fill = this.meter.querySelector(".meter-fill");
    const text = this.meter.querySelector(".meter-text");
    const used = context.used ?? context.limit;
    fill.style.width = `${Math.min(100, (100 * used) / context.limit)}%`;
    const parts = [`${context.used ?? "?"} / ${context.limit} tokens`, context.strategy];
    if (context.dropped) parts.push(`${context.dropped} dropped`);
    if (context.summarized) parts.push(`${context.summarized} summarized`);
    const warning = context.error || context.warning;
    this.meter.classList.toggle("warn", Boolean(warning));
    text.textContent = parts.join(" · ") + (warning ? ` — ${warning}` : "");
  }

  showNotice(message) {
    this.notice.textContent = message;
    this.notice.hidden = !message;
  }

  // --- rendering ---------------------------------------------------------------------------------------

  renderItem(item) {
    if (item.live) return this.renderLive();
    const message = item.message;
    const node = el("article", { class: `msg ${message.role}${message.pinned ? " pinned" : ""}`, "data-id": message.id });
    node.append(this.head(message));
    const body = el("div", { class: "msg-body" });
    if (message.role === "assistant") renderMarkdown(body, message.content, message.info?.sources);
    else body.textContent = message.content;
    node.append(body);
    if (message.info?.sources?.length) node.append(sourcesLine(message.info));
    if (message.role === "assistant") node.append(el("div", { class: "msg-stats", text: statsText(message) }));
    node.append(this.actions(message));
    return node;
  }

  head(message) {
    const head = el("div", { class: "msg-head" });
    head.append(el("span", { class: "role", text: message.role === "user" ? "You" : message.info?.model || message.role }));
    const siblings = this.children.get(message.parent_id || "") || [message];
    if (siblings.length > 1) {
      const index = siblings.findIndex((sibling) => sibling.id === message.id);
      head.append(
        el(
          "span",
          { class: "branch" },
          el("button", { type: "button", "data-action": "branch-prev", title: "Previous branch", disabled: index === 0 }, "‹"),
          el("span", { class: "branch-index", text: `${index + 1}/${siblings.length}` }),
          el("button", {
            type: "button",
            "data-action": "branch-next",
            title: "Next branch",
            disabled: index === siblings.length - 1,
          }, "›"),
        ),
      );
    }
    if (message.partial) head.append(el("span", { class: "badge", text: message.status === "in_progress" ? "writing" : "stopped" }));
    if (message.pinned) head.append(el("span", { class: "badge pin", text: "pinned" }));
    return head;
  }

  actions(message) {
    const bar = el("div", { class: "msg-actions" });
    const button = (action, label, title) => el("button", { type: "button", "data-action": action, title }, label);
    bar.append(button("copy", "Copy", "Copy the text"));
    bar.append(button("edit", "Edit", "Edit (a new branch)"));
    if (message.role === "assistant") {
      bar.append(button("regenerate", "Regenerate", "Answer again (a new branch)"));
      if (this.path.at(-1)?.id === message.id) bar.append(button("continue", "Continue", "Write more of this answer"));
    }
    bar.append(button("pin", message.pinned ? "Unpin" : "Pin", "Always keep in the context"));
    return bar;
  }

  renderLive() {
    const live = this.live;
    const node = el("article", { class: "msg assistant live", "data-id": live.key });
    node.append(el("div", { class: "msg-head" }, el("span", { class: "role", text: live.model })));
    const progress = el("div", { class: "prefill", hidden: true }, el("div", { class: "prefill-bar" }), el("span"));
    node.append(progress);
    const body = el("div", { class: "msg-body" });
    node.append(body);
    node.append(el("div", { class: "msg-stats" }));
    this.paintLive(node);
    return node;
  }

  paintLive(node = this.list.element(this.live?.key)) {
    const live = this.live;
    if (!node || !live) return;
    const body = node.querySelector(".msg-body");
    if (live.content) renderMarkdown(body, live.content);
    else body.replaceChildren(el("span", { class: "typing", text: live.waiting || "…" }));
    const progress = node.querySelector(".prefill");
    progress.hidden = !live.prefill;
    if (live.prefill) {
      const share = live.prefill.total ? live.prefill.done / live.prefill.total : 0;
      progress.firstElementChild.style.width = `${(100 * share).toFixed(1)}%`;
      progress.lastElementChild.textContent = `reading the prompt: ${live.prefill.done} / ${live.prefill.total} tokens`;
    }
    const seconds = (performance.now() - live.started) / 1000;
    const parts = [`${live.tokens} tokens`];
    if (live.firstTokenAt) {
      const decoding = (performance.now() - live.firstTokenAt) / 1000;
      if (decoding > 0.2) parts.push(`${(live.tokens / decoding).toFixed(1)} tokens/s`);
      parts.push(`first token ${((live.firstTokenAt - live.started) / 1000).toFixed(2)} s`);
    } else parts.push(`${seconds.toFixed(1)} s`);
    parts.push(live.model);
    node.querySelector(".msg-stats").textContent = parts.join(" · ");
    this.list.schedule();
  }

  // --- actions ---------------------------------------------------------------------------------------

  clicked(event) {
    const citation = event.target.closest(".citation");
    if (citation) {
      const message = this.byId.get(citation.closest(".msg")?.dataset.id);
      const source = message?.info?.sources?.find((item) => String(item.n) === citation.dataset.source);
      if (source) this.app.showSource(source);
      return;
    }
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const message = this.byId.get(button.closest(".msg")?.dataset.id);
    if (!message) return;
    const action = button.dataset.action;
    if (action === "copy") copyText(message.content, button);
    else if (action === "edit") this.startEdit(message);
    else if (action === "regenerate") this.regenerate(message);
    else if (action === "continue") this.continueAnswer(message);
    else if (action === "pin") this.pin(message);
    else if (action === "branch-prev") this.switchBranch(message, -1);
    else if (action === "branch-next") this.switchBranch(message, 1);
  }

  async send() {
    const text = this.input.value;
    if (this.busy || !text.trim()) return;
    this.input.value = "";
    try {
      if (!this.conversation) await this.app.startConversation(text);
      const userItem = { id: "pending-user", role: "user", content: text, parent_id: null };
      await this.answer(`/api/conversations/${this.conversation.id}/chat`, { content: text }, [...this.path, userItem]);
    } catch (error) {
      if (!this.conversation || !this.path.length) this.input.value = text; // nothing was stored: keep the text
      this.showNotice(error.message);
    }
  }

  regenerate(message) {
    const cut = this.path.findIndex((item) => item.id === message.id);
    const path = cut >= 0 ? this.path.slice(0, cut) : this.path;
    return this.answer(`/api/conversations/${this.conversation.id}/messages/${message.id}/regenerate`, {}, path);
  }

  continueAnswer(message) {
    const cut = this.path.findIndex((item) => item.id === message.id);
    const path = cut >= 0 ? this.path.slice(0, cut) : this.path;
    return this.answer(
      `/api/conversations/${this.conversation.id}/messages/${message.id}/continue`,
      {},
      path,
      message.content,
    );
  }

  startEdit(message) {
    const node = this.list.element(message.id);
    if (!node || node.querySelector(".edit-box")) return;
    const area = el("textarea", { class: "edit-box", rows: Math.min(12, message.content.split("\n").length + 1) });
    area.value = message.content;
    const save = el("button", { type: "button", class: "primary" }, message.role === "user" ? "Save and send" : "Save");
    const cancel = el("button", { type: "button" }, "Cancel");
    const box = el("div", { class: "edit" }, area, el("div", { class: "row" }, save, cancel));
    node.querySelector(".msg-body").replaceWith(box);
    area.focus();
    cancel.addEventListener("click", () => this.list.refresh(message.id));
    save.addEventListener("click", () => this.saveEdit(message, area.value));
    area.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        this.saveEdit(message, area.value);
      } else if (event.key === "Escape") this.list.refresh(message.id);
    });
    this.list.schedule();
  }

  async saveEdit(message, content) {
    if (!content.trim() || this.busy) return;
    const route = `/api/conversations/${this.conversation.id}/messages/${message.id}/edit`;
    if (message.role !== "user") {
      try {
        await api.post(route, { content, stream: false });
        await this.open(this.conversation.id);
      } catch (error) {
        this.showNotice(error.message);
      }
      return;
    }
    const cut = this.path.findIndex((item) => item.id === message.id);
    const path = [...this.path.slice(0, Math.max(0, cut)), { id: "pending-user", role: "user", content, parent_id: message.parent_id }];
    await this.answer(route, { content }, path);
  }

  async pin(message) {
    try {
      await api.patch(`/api/conversations/${this.conversation.id}/messages/${message.id}`, { pinned: !message.pinned });
      message.pinned = !message.pinned;
      this.list.refresh(message.id);
      this.updateMeter();
    } catch (error) {
      this.showNotice(error.message);
    }
  }

  async switchBranch(message, step) {
    if (this.busy) return;
    const siblings = this.children.get(message.parent_id || "") || [];
    const target = siblings[siblings.findIndex((item) => item.id === message.id) + step];
    if (!target) return;
    let leaf = target; // the newest branch below it, as the user left it
    for (let below = this.children.get(leaf.id); below?.length; below = this.children.get(leaf.id)) leaf = below.at(-1);
    try {
      await api.post(`/api/conversations/${this.conversation.id}/fork`, { message_id: leaf.id });
      await this.open(this.conversation.id);
    } catch (error) {
      this.showNotice(error.message);
    }
  }

  /** POST a streamed turn to `route` and show it: `path` is what stays above the new answer. */
  async answer(route, body, path, base = "") {
    this.showNotice("");
    const model = this.app.panel.model() || this.conversation.model;
    this.live = {
      key: `live-${Date.now()}`,
      model,
      content: base,
      tokens: 0,
      started: performance.now(),
      firstTokenAt: 0,
      prefill: null,
    };
    this.controller = new AbortController();
    this.setBusy(true);
    const displayed = path.map((message) => (message.id === "pending-user" ? { ...message } : message));
    this.byId.set("pending-user", displayed.find((message) => message.id === "pending-user"));
    this.showItems(displayed);
    this.list.scrollToBottom();
    const conversationId = this.conversation.id;
    let failure = null;
    try {
      const request = { ...body, ...this.app.panel.turnFields(), progress: true };
      for await (const line of api.stream(route, request, { signal: this.controller.signal })) {
        if (line.prefill) {
          this.live.prefill = line.prefill;
        } else if (line.message?.content) {
          if (!this.live.firstTokenAt) this.live.firstTokenAt = performance.now();
          this.live.prefill = null;
          this.live.content += line.message.content;
          this.live.tokens += line.tokens ?? 1;
        }
        if (line.context) this.showMeter(line.context);
        inFrame("live-answer", () => this.paintLive());
      }
    } catch (error) {
      if (!api.isAbort(error)) failure = error;
    } finally {
      this.controller = null;
      this.setBusy(false);
    }
    this.byId.delete("pending-user");
    await this.reloadAfterTurn(conversationId);
    if (failure) this.showNotice(failure.message);
    this.app.sidebar.refresh();
  }

  async reloadAfterTurn(conversationId) {
    // A stopped answer is written by the server as the stream closes: wait until it is no longer "writing".
    for (let attempt = 0; attempt < 20; attempt++) {
      await this.open(conversationId);
      if (!this.path.some((message) => message.status === "in_progress")) return;
      await new Promise((resolve) => setTimeout(resolve, 150));
    }
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  setBusy(busy) {
    this.sendButton.hidden = busy;
    this.stopButton.hidden = !busy;
    document.body.classList.toggle("answering", busy);
  }
}

export function statsText(message) {
  const info = message.info || {};
  const parts = [];
  if (info.eval_count !== undefined) parts.push(`${info.eval_count} tokens`);
  if (info.eval_duration) parts.push(`${(info.eval_count / (info.eval_duration / 1e9)).toFixed(1)} tokens/s`);
  if (info.total_duration && info.eval_duration !== undefined) {
    // Everything before the first token: queueing, loading, reading the prompt.
    parts.push(`first token ${((info.total_duration - info.eval_duration) / 1e9).toFixed(2)} s`);
  }
  if (info.prompt_eval_count !== undefined) {
    const cached = info.prompt_cached_count ? ` (+${info.prompt_cached_count} cached)` : "";
    parts.push(`prompt ${info.prompt_eval_count}${cached}`);
  }
  if (info.model) parts.push(info.model);
  if (message.status === "incomplete") parts.push("stopped");
  return parts.join(" · ");
}

function sourcesLine(info) {
  const line = el("div", { class: "msg-sources" }, el("span", { class: "muted", text: "Sources:" }));
  for (const source of info.sources) {
    line.append(el("button", { type: "button", class: "citation", "data-source": String(source.n), title: source.text.slice(0, 200) }, `[${source.n}] ${source.name}`));
  }
  if (info.documents?.mode === "retrieval") line.append(el("span", { class: "muted note", text: info.documents.reason }));
  return line;
}
