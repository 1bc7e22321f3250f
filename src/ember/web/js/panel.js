// The side panel: model, presets (a named system prompt and options, kept by the server), the system prompt,
// the context strategy, and the sampling and load options. They are the open conversation's own settings,
// saved to it as they change and used from its next message on; a new chat starts with them.

import * as api from "./api.js";
import { debounce, el } from "./frame.js";

const NUMBER_OPTIONS = new Set(["temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "num_predict", "num_ctx", "num_gpu"]);

export class Panel {
  constructor(app) {
    this.app = app;
    this.modelSelect = document.getElementById("model");
    this.presetSelect = document.getElementById("preset");
    this.systemInput = document.getElementById("system");
    this.strategySelect = document.getElementById("strategy");
    this.jsonBox = document.getElementById("json-output");
    this.optionInputs = [...document.querySelectorAll("[data-option]")];
    this.presets = [];
    const save = debounce(() => this.saveToConversation(), 400);
    for (const input of this.optionInputs) input.addEventListener("input", save);
    this.systemInput.addEventListener("input", save);
    this.strategySelect.addEventListener("change", save);
    this.modelSelect.addEventListener("change", save);
    this.presetSelect.addEventListener("change", () => this.applyPreset(this.presetSelect.value));
    document.getElementById("preset-save").addEventListener("click", () => this.savePreset());
    document.getElementById("preset-delete").addEventListener("click", () => this.deletePreset());
  }

  async load() {
    await Promise.all([this.loadModels(), this.loadPresets()]);
  }

  async loadModels() {
    const { models } = await api.get("/api/tags");
    const current = this.modelSelect.value;
    this.modelSelect.replaceChildren(...models.map((model) => el("option", { value: model.name, text: model.name })));
    const fallback = models.find((model) => model.name.startsWith(this.app.defaultModel))?.name || models[0]?.name;
    this.modelSelect.value = models.some((model) => model.name === current) ? current : fallback || "";
    return models;
  }

  async loadPresets() {
    const { presets } = await api.get("/api/presets");
    this.presets = presets;
    const current = this.presetSelect.value;
    this.presetSelect.replaceChildren(
      el("option", { value: "", text: "(none)" }),
      ...presets.map((preset) => el("option", { value: preset.name, text: preset.name })),
    );
    this.presetSelect.value = presets.some((preset) => preset.name === current) ? current : "";
  }

  model() {
    return this.modelSelect.value;
  }

  options() {
    const options = {};
    for (const input of this.optionInputs) {
      const value = input.value.trim();
      if (!value) continue;
      const name = input.dataset.option;
      if (name === "stop") options.stop = value.split(",").map((part) => part.trim()).filter(Boolean);
      else if (NUMBER_OPTIONS.has(name)) options[name] = Number(value);
    }
    return options;
  }

  /** What a turn sends besides its message. */
  turnFields() {
    const fields = {};
    const model = this.model();
    if (model && model !== this.app.chat.conversation?.model) fields.model = model;
    if (this.jsonBox.checked) fields.format = "json";
    return fields;
  }

  /** The settings a new conversation is created with. */
  conversationFields() {
    const fields = { model: this.model() || undefined, options: this.options(), strategy: this.strategySelect.value };
    if (this.systemInput.value.trim()) fields.system = this.systemInput.value;
    return fields;
  }

  show(conversation) {
    if (!conversation) return;
    if (conversation.model && [...this.modelSelect.options].some((option) => option.value === conversation.model)) {
      this.modelSelect.value = conversation.model;
    }
    this.systemInput.value = conversation.system || "";
    this.strategySelect.value = conversation.strategy || "sliding";
    const options = conversation.options || {};
    for (const input of this.optionInputs) {
      const value = options[input.dataset.option];
      input.value = value === undefined ? "" : Array.isArray(value) ? value.join(", ") : String(value);
    }
  }

  async saveToConversation() {
    const conversation = this.app.chat.conversation;
    if (!conversation) return;
    try {
      const { conversation: updated } = await api.patch(`/api/conversations/${conversation.id}`, {
        model: this.model() || undefined,
        system: this.systemInput.value,
        strategy: this.strategySelect.value,
        options: this.options(),
      });
      this.app.chat.conversation = updated;
      this.app.chat.showNotice("");
      this.app.chat.updateMeter();
    } catch (error) {
      this.app.chat.showNotice(error.message);
    }
  }

  applyPreset(name) {
    const preset = this.presets.find((item) => item.name === name);
    if (!preset) return;
    this.systemInput.value = preset.system || "";
    for (const input of this.optionInputs) {
      const value = preset.options?.[input.dataset.option];
      input.value = value === undefined ? "" : Array.isArray(value) ? value.join(", ") : String(value);
    }
    if (preset.model && [...this.modelSelect.options].some((option) => option.value === preset.model)) {
      this.modelSelect.value = preset.model;
    }
    this.saveToConversation();
  }

  async savePreset() {
    const name = prompt("Preset name", this.presetSelect.value || "");
    if (!name) return;
    try {
      await api.call("PUT", `/api/presets/${encodeURIComponent(name)}`, {
        system: this.systemInput.value || null,
        options: this.options(),
        model: this.model() || null,
      });
      await this.loadPresets();
      this.presetSelect.value = name;
    } catch (error) {
      this.app.chat.showNotice(error.message);
    }
  }

  async deletePreset() {
    const name = this.presetSelect.value;
    if (!name) return;
    await api.del(`/api/presets/${encodeURIComponent(name)}`);
    await this.loadPresets();
  }
}
