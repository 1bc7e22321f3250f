// Documents: upload text, Markdown, HTML and PDF files into the open conversation or a named collection,
// attach collections to the conversation, list and delete them. The server chunks and indexes them; answers
// cite the passages they were given.

import * as api from "./api.js";
import { el, formatBytes } from "./frame.js";

export class Documents {
  constructor(app) {
    this.app = app;
    this.list = document.getElementById("doc-list");
    this.target = document.getElementById("doc-target");
    this.collectionInput = document.getElementById("doc-collection");
    this.attach = document.getElementById("doc-attach");
    this.collections = [];
    document.getElementById("doc-upload").addEventListener("submit", (event) => {
      event.preventDefault();
      this.upload();
    });
    this.target.addEventListener("change", () => this.showTarget());
    this.list.addEventListener("click", (event) => this.remove(event));
    this.attach.addEventListener("change", (event) => this.attachCollection(event.target));
  }

  shown() {
    this.refresh();
  }

  showTarget() {
    this.collectionInput.hidden = this.target.value !== "collection";
  }

  async refresh() {
    const conversation = this.app.chat.conversation;
    this.target.replaceChildren(
      ...(conversation ? [el("option", { value: "conversation", text: `this conversation (${conversation.title || "Untitled"})` })] : []),
      el("option", { value: "collection", text: "a collection" }),
    );
    this.showTarget();
    const { documents, collections } = await api.get("/api/documents");
    this.collections = collections;
    const mine = documents.filter((doc) => !doc.conversation_id || doc.conversation_id === conversation?.id);
    this.list.replaceChildren(
      ...mine.map((doc) =>
        el(
          "tr",
          { "data-id": doc.id },
          el("td", { text: doc.name }),
          el("td", { text: doc.collection ? `collection ${doc.collection}` : "this conversation" }),
          el("td", { text: `${formatBytes(doc.size)} · ${doc.tokens ?? "?"} tokens` }),
          el("td", { text: String(doc.chunks) }),
          el("td", { class: "actions" }, el("button", { type: "button", "data-action": "delete" }, "Delete")),
        ),
      ),
    );
    if (!mine.length) this.list.append(el("tr", {}, el("td", { colspan: 5, class: "muted", text: "No documents yet" })));
    const attached = new Set(conversation?.metadata?.collections || []);
    this.attach.replaceChildren(
      ...(conversation && collections.length
        ? [el("span", { text: "Use in this conversation:" }), ...collections.map((name) =>
            el("label", { class: "check" }, el("input", { type: "checkbox", value: name, checked: attached.has(name) }), ` ${name}`))]
        : []),
    );
  }

  async upload() {
    const files = document.getElementById("doc-file").files;
    if (!files.length) return;
    const form = new FormData();
    for (const file of files) form.append("file", file, file.name);
    const conversation = this.app.chat.conversation;
    if (this.target.value === "conversation" && conversation) form.append("conversation_id", conversation.id);
    else form.append("collection", this.collectionInput.value.trim() || "default");
    try {
      await api.post("/api/documents", form);
      document.getElementById("doc-file").value = "";
      if (this.target.value === "collection" && conversation) {
        await this.setCollections([...new Set([...(conversation.metadata?.collections || []), this.collectionInput.value.trim() || "default"])]);
      }
      await this.refresh();
    } catch (error) {
      this.app.chat.showNotice(`upload failed: ${error.message}`);
      this.app.showView("chat");
    }
  }

  async setCollections(names) {
    const conversation = this.app.chat.conversation;
    const metadata = { ...(conversation.metadata || {}), collections: names };
    const { conversation: updated } = await api.patch(`/api/conversations/${conversation.id}`, { metadata });
    this.app.chat.conversation = updated;
  }

  async attachCollection(box) {
    if (box.type !== "checkbox" || !this.app.chat.conversation) return;
    const names = [...this.attach.querySelectorAll("input:checked")].map((input) => input.value);
    await this.setCollections(names);
  }

  async remove(event) {
    const id = event.target.closest("button[data-action=delete]")?.closest("tr")?.dataset.id;
    if (!id) return;
    await api.del(`/api/documents/${id}`);
    await this.refresh();
  }
}
