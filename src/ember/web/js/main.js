// The page's start: views (chat, notebook, documents, admin), theme, keyboard shortcuts, the API key, and the
// address (#/c/<conversation id>) so that a reload opens the same conversation.

import * as api from "./api.js";
import { Admin } from "./admin.js";
import { Chat } from "./chat.js";
import { Documents } from "./documents.js";
import { Notebook } from "./notebook.js";
import { Panel } from "./panel.js";
import { Sidebar } from "./sidebar.js";

class App {
  constructor() {
    this.defaultModel = "smollm2";
    this.view = "chat";
    this.chat = new Chat(this);
    this.sidebar = new Sidebar(this);
    this.panel = new Panel(this);
    this.notebook = new Notebook(this);
    this.documents = new Documents(this);
    this.admin = new Admin(this);
    this.views = { notebook: this.notebook, documents: this.documents, admin: this.admin };
    for (const button of document.querySelectorAll("nav.views button")) {
      button.addEventListener("click", () => this.showView(button.dataset.view));
    }
    document.getElementById("toggle-theme").addEventListener("click", () => this.toggleTheme());
    document.getElementById("toggle-panel").addEventListener("click", () => document.body.classList.toggle("panel-open"));
    document.getElementById("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
    document.addEventListener("keydown", (event) => this.keydown(event));
    window.addEventListener("hashchange", () => this.followAddress());
    api.onUnauthorized(() => this.askForKey());
    if (innerWidth > 760) document.body.classList.add("panel-open");
    this.applyTheme(localStorage.getItem("ember.theme") || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light"));
  }

  async start() {
    try {
      const ready = await api.get("/ready");
      this.defaultModel = ready.default_model || this.defaultModel;
    } catch {
      /* the page still works with what it can reach */
    }
    await this.panel.load();
    await this.sidebar.refresh();
    await this.followAddress();
    document.body.dataset.ready = "true";
  }

  async followAddress() {
    const match = location.hash.match(/^#\/c\/(conv_[0-9a-f]{24})$/);
    if (match && match[1] !== this.chat.conversation?.id) {
      try {
        await this.chat.open(match[1]);
      } catch (error) {
        this.chat.showNotice(error.message);
      }
    }
  }

  keydown(event) {
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "k") {
      event.preventDefault();
      document.body.classList.add("sidebar-open");
      const search = document.getElementById("search");
      search.focus();
      search.select();
    } else if (event.key === "Escape") {
      if (this.chat.busy) this.chat.stop();
      this.notebook.stop();
    }
  }

  showView(name) {
    if (this.view !== name) this.views[this.view]?.hidden?.();
    this.view = name;
    for (const button of document.querySelectorAll("nav.views button")) button.classList.toggle("active", button.dataset.view === name);
    for (const section of document.querySelectorAll("main > .view")) section.hidden = section.id !== `view-${name}`;
    this.views[name]?.shown?.();
    if (name === "chat") this.chat.list.schedule();
  }

  applyTheme(theme) {
    document.documentElement.dataset.theme = theme;
    document.getElementById("hljs-light").disabled = theme === "dark";
    document.getElementById("hljs-dark").disabled = theme !== "dark";
  }

  toggleTheme() {
    const theme = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    localStorage.setItem("ember.theme", theme);
    this.applyTheme(theme);
  }

  askForKey() {
    const dialog = document.getElementById("key-dialog");
    const input = document.getElementById("key-input");
    if (this.keyRequest) return this.keyRequest;
    this.keyRequest = new Promise((resolve) => {
      const done = () => {
        dialog.removeEventListener("close", done);
        api.setApiKey(input.value.trim());
        this.keyRequest = null;
        resolve();
      };
      dialog.addEventListener("close", done);
      input.value = "";
      dialog.showModal();
    });
    return this.keyRequest;
  }

  // --- conversations -------------------------------------------------------------------------------

  async startConversation(firstMessage) {
    const title = firstMessage.trim().split("\n")[0].slice(0, 60);
    const { conversation } = await api.post("/api/conversations", { title, ...this.panel.conversationFields() });
    this.chat.conversation = conversation;
    history.replaceState(null, "", `#/c/${conversation.id}`);
    this.sidebar.refresh();
    return conversation;
  }

  async openConversation(id) {
    document.body.classList.remove("sidebar-open");
    this.showView("chat");
    await this.chat.open(id);
    history.replaceState(null, "", `#/c/${id}`);
    this.sidebar.refresh();
  }

  conversationOpened(conversation) {
    this.panel.show(conversation);
    for (const row of document.querySelectorAll("li.conversation")) row.classList.toggle("current", row.dataset.id === conversation?.id);
  }

  newChat() {
    if (this.chat.busy) this.chat.stop();
    this.chat.clear();
    history.replaceState(null, "", location.pathname);
    this.showView("chat");
    document.getElementById("input").focus();
  }

  showSource(source) {
    document.getElementById("source-title").textContent = `[${source.n}] ${source.name}`;
    document.getElementById("source-text").textContent = source.text;
    document.getElementById("source-dialog").showModal();
  }
}

const app = new App();
window.ember = app; // for the browser's console, and the page's own tests
app.start();
