// The conversations kept by the server: list, search, rename, delete, export, import, new chat.

import * as api from "./api.js";
import { debounce, el } from "./frame.js";

export class Sidebar {
  constructor(app) {
    this.app = app;
    this.list = document.getElementById("conversations");
    this.search = document.getElementById("search");
    this.search.addEventListener("input", debounce(() => this.refresh(), 200));
    document.getElementById("new-chat").addEventListener("click", () => app.newChat());
    document.getElementById("import-file").addEventListener("change", (event) => this.importFile(event.target));
    this.list.addEventListener("click", (event) => this.clicked(event));
  }

  async refresh() {
    const query = this.search.value.trim();
    const path = `/api/conversations?limit=100${query ? `&q=${encodeURIComponent(query)}` : ""}`;
    try {
      const { conversations } = await api.get(path);
      this.list.replaceChildren(...conversations.map((row) => this.row(row)));
      if (!conversations.length) this.list.append(el("li", { class: "muted empty", text: query ? "Nothing found" : "No conversations yet" }));
    } catch (error) {
      this.list.replaceChildren(el("li", { class: "error", text: error.message }));
    }
  }

  row(conversation) {
    const current = this.app.chat.conversation?.id === conversation.id;
    return el(
      "li",
      { class: `conversation${current ? " current" : ""}`, "data-id": conversation.id },
      el("button", { type: "button", class: "open", "data-action": "open" },
        el("span", { class: "title", text: conversation.title || "Untitled" }),
        el("span", { class: "sub", text: conversation.snippet ? stripMarks(conversation.snippet) : `${conversation.model} · ${conversation.message_count} messages` }),
      ),
      el("span", { class: "row-actions" },
        el("button", { type: "button", "data-action": "rename", title: "Rename" }, "✎"),
        el("button", { type: "button", "data-action": "export", title: "Export as JSON" }, "⤓"),
        el("button", { type: "button", "data-action": "delete", title: "Delete" }, "✕"),
      ),
    );
  }

  async clicked(event) {
    const button = event.target.closest("button[data-action]");
    const row = event.target.closest("li.conversation");
    if (!button || !row) return;
    const id = row.dataset.id;
    try {
      if (button.dataset.action === "open") await this.app.openConversation(id);
      else if (button.dataset.action === "rename") await this.rename(row, id);
      else if (button.dataset.action === "export") await this.exportConversation(id);
      else if (button.dataset.action === "delete") {
        if (!confirm("Delete this conversation for good?")) return;
        await api.del(`/api/conversations/${id}`);
        if (this.app.chat.conversation?.id === id) this.app.newChat();
        await this.refresh();
      }
    } catch (error) {
      this.app.chat.showNotice(error.message);
    }
  }

  rename(row, id) {
    const title = row.querySelector(".title");
    const input = el("input", { class: "rename", value: title.textContent, "aria-label": "New title" });
    title.replaceWith(input);
    input.focus();
    input.select();
    const done = async (save) => {
      input.onblur = null;
      if (save && input.value.trim()) await api.patch(`/api/conversations/${id}`, { title: input.value.trim() });
      await this.refresh();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") done(true);
      else if (event.key === "Escape") done(false);
    });
    input.onblur = () => done(true);
    input.addEventListener("click", (event) => event.stopPropagation());
  }

  async exportConversation(id) {
    const document_ = await api.get(`/api/conversations/${id}/export`);
    const blob = new Blob([JSON.stringify(document_, null, 2)], { type: "application/json" });
    const link = el("a", { href: URL.createObjectURL(blob), download: `${id}.json` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  }

  async importFile(input) {
    const file = input.files[0];
    input.value = "";
    if (!file) return;
    try {
      const data = await api.post("/api/conversations/import", JSON.parse(await file.text()));
      await this.refresh();
      await this.app.openConversation(data.conversation.id);
    } catch (error) {
      this.app.chat.showNotice(`import failed: ${error.message}`);
    }
  }
}

function stripMarks(snippet) {
  return snippet.replace(/<\/?b>|\[|\]/g, "");
}
