// Admin: the models in the store (pull with progress and cancel, copy, delete, details, create from a
// Modelfile), the loaded models (unload), and a live view of the server's own numbers (/api/stats).

import * as api from "./api.js";
import { el, formatBytes } from "./frame.js";

const HISTORY = 60; // samples kept per chart (one a second)

export class Admin {
  constructor(app) {
    this.app = app;
    this.modelList = document.getElementById("model-list");
    this.psList = document.getElementById("ps-list");
    this.details = document.getElementById("model-details");
    this.pullForm = document.getElementById("pull-form");
    this.pullCancel = document.getElementById("pull-cancel");
    this.pullProgress = document.getElementById("pull-progress");
    this.pullController = null;
    this.timer = 0;
    this.history = { tps: [], queue: [], memory: [] };
    this.pullForm.addEventListener("submit", (event) => {
      event.preventDefault();
      this.pull(document.getElementById("pull-name").value.trim());
    });
    this.pullCancel.addEventListener("click", () => this.pullController?.abort());
    document.getElementById("create-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.create();
    });
    this.modelList.addEventListener("click", (event) => this.modelAction(event));
    this.psList.addEventListener("click", (event) => this.unload(event));
  }

  shown() {
    this.refresh();
    clearInterval(this.timer);
    this.timer = setInterval(() => this.tick(), 1000);
    this.tick();
  }

  hidden() {
    clearInterval(this.timer);
  }

  async refresh() {
    await Promise.all([this.listModels(), this.listLoaded()]);
  }

  async listModels() {
    const { models } = await api.get("/api/tags");
    this.modelList.replaceChildren(
      ...models.map((model) =>
        el(
          "tr",
          { "data-name": model.name },
          el("td", { text: model.name }),
          el("td", { text: formatBytes(model.size) }),
          el("td", { text: new Date(model.modified_at).toLocaleString() }),
          el(
            "td",
            { class: "actions" },
            el("button", { type: "button", "data-action": "show" }, "Details"),
            el("button", { type: "button", "data-action": "copy" }, "Copy"),
            el("button", { type: "button", "data-action": "delete" }, "Delete"),
          ),
        ),
      ),
    );
  }

  async listLoaded() {
    const { models } = await api.get("/api/ps");
    this.psList.replaceChildren(
      ...models.map((model) =>
        el(
          "tr",
          { "data-name": model.name },
          el("td", { text: model.name }),
          el("td", { text: formatBytes(model.size) }),
          el("td", { text: String(model.context_length) }),
          el("td", { text: `${model.ember?.slots_in_use ?? 0}/${model.ember?.slots ?? 0}` }),
          el("td", { text: model.expires_at.startsWith("0001") ? "forever" : new Date(model.expires_at).toLocaleTimeString() }),
          el("td", { class: "actions" }, el("button", { type: "button", "data-action": "unload" }, "Unload")),
        ),
      ),
    );
    if (!models.length) this.psList.append(el("tr", {}, el("td", { colspan: 6, class: "muted", text: "No model is loaded" })));
  }

  async modelAction(event) {
    const button = event.target.closest("button[data-action]");
    const name = button?.closest("tr")?.dataset.name;
    if (!name) return;
    try {
      if (button.dataset.action === "show") {
        const info = await api.post("/api/show", { model: name });
        this.details.textContent = JSON.stringify({ details: info.details, model_info: info.model_info, parameters: info.parameters, capabilities: info.capabilities }, null, 2);
        this.details.hidden = false;
      } else if (button.dataset.action === "copy") {
        const destination = prompt(`Copy ${name} as`, `${name.split(":")[0]}-copy`);
        if (!destination) return;
        await api.post("/api/copy", { source: name, destination });
      } else if (button.dataset.action === "delete") {
        if (!confirm(`Delete ${name} from the store?`)) return;
        await api.del("/api/delete", { model: name });
      }
      await this.listModels();
      await this.app.panel.loadModels();
    } catch (error) {
      this.showProgress(error.message);
    }
  }

  async unload(event) {
    const button = event.target.closest("button[data-action=unload]");
    const name = button?.closest("tr")?.dataset.name;
    if (!name) return;
    await api.post("/api/stop", { model: name });
    await this.listLoaded();
  }

  showProgress(text, share = null) {
    this.pullProgress.hidden = false;
    const bar = this.pullProgress.querySelector("progress");
    bar.hidden = share === null;
    if (share !== null) bar.value = share;
    this.pullProgress.querySelector("span").textContent = text;
  }

  async pull(name) {
    if (!name || this.pullController) return;
    this.pullController = new AbortController();
    this.pullCancel.hidden = false;
    this.showProgress("pulling manifest", 0);
    try {
      for await (const line of api.stream("/api/pull", { model: name, stream: true }, { signal: this.pullController.signal })) {
        if (line.total) {
          const share = line.completed / line.total;
          this.showProgress(`${line.status}: ${formatBytes(line.completed)} of ${formatBytes(line.total)} (${(100 * share).toFixed(0)}%)`, share);
        } else this.showProgress(line.status, line.status === "success" ? 1 : null);
      }
      await this.listModels();
      await this.app.panel.loadModels();
    } catch (error) {
      this.showProgress(api.isAbort(error) ? "pull cancelled" : `pull failed: ${error.message}`);
    } finally {
      this.pullController = null;
      this.pullCancel.hidden = true;
    }
  }

  async create() {
    const status = document.getElementById("create-status");
    const model = document.getElementById("create-name").value.trim();
    const modelfile = document.getElementById("create-modelfile").value;
    if (!model) {
      status.textContent = "give the new model a name";
      return;
    }
    try {
      for await (const line of api.stream("/api/create", { model, modelfile, stream: true })) status.textContent = line.status;
      await this.listModels();
      await this.app.panel.loadModels();
    } catch (error) {
      status.textContent = `create failed: ${error.message}`;
    }
  }

  async tick() {
    let stats;
    try {
      stats = await api.get("/api/stats");
    } catch {
      return;
    }
    const used = stats.memory.total ? stats.memory.total - stats.memory.available : 0;
    push(this.history.tps, stats.tokens_per_second);
    push(this.history.queue, stats.queued + stats.slots_in_use);
    push(this.history.memory, used);
    document.getElementById("live-tps").textContent = stats.tokens_per_second.toFixed(1);
    document.getElementById("live-queue").textContent = String(stats.queued);
    document.getElementById("live-slots").textContent = `${stats.slots_in_use}/${stats.slots}`;
    document.getElementById("live-memory").textContent =
      `${formatBytes(used)} of ${formatBytes(stats.memory.total)} (models ${formatBytes(stats.memory.models)})`;
    drawChart(document.getElementById("chart-tps"), this.history.tps);
    drawChart(document.getElementById("chart-queue"), this.history.queue);
    drawChart(document.getElementById("chart-memory"), this.history.memory, stats.memory.total);
    if (stats.models.length !== this.psList.querySelectorAll("tr[data-name]").length) this.listLoaded();
  }
}

function push(series, value) {
  series.push(value);
  if (series.length > HISTORY) series.shift();
}

function drawChart(canvas, series, ceiling = 0) {
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  const top = Math.max(ceiling, ...series, 1);
  const style = getComputedStyle(document.documentElement);
  context.strokeStyle = style.getPropertyValue("--accent").trim() || "#d9480f";
  context.fillStyle = style.getPropertyValue("--accent-soft").trim() || "rgba(217,72,15,0.15)";
  context.lineWidth = 2;
  context.beginPath();
  series.forEach((value, index) => {
    const x = (index / (HISTORY - 1)) * width;
    const y = height - (value / top) * (height - 4) - 2;
    if (index === 0) context.moveTo(x, y);
    else context.lineTo(x, y);
  });
  context.stroke();
  if (series.length > 1) {
    context.lineTo(((series.length - 1) / (HISTORY - 1)) * width, height);
    context.lineTo(0, height);
    context.closePath();
    context.fill();
  }
}
