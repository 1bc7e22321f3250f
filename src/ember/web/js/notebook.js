// Notebook mode: one text the model continues as it is (raw completion, no chat template), a live token count,
// and on request the most likely next tokens at the cursor (click one to insert it).

import * as api from "./api.js";
import { debounce, el, inFrame } from "./frame.js";

export class Notebook {
  constructor(app) {
    this.app = app;
    this.text = document.getElementById("nb-text");
    this.count = document.getElementById("nb-count");
    this.generateButton = document.getElementById("nb-generate");
    this.stopButton = document.getElementById("nb-stop");
    this.probabilities = document.getElementById("nb-probs-list");
    this.controller = null;
    this.text.value = localStorage.getItem("ember.notebook") || "";
    const count = debounce(() => this.countTokens(), 250);
    this.text.addEventListener("input", () => {
      localStorage.setItem("ember.notebook", this.text.value);
      count();
    });
    this.generateButton.addEventListener("click", () => this.generate());
    this.stopButton.addEventListener("click", () => this.stop());
    document.getElementById("nb-probs").addEventListener("click", () => this.nextTokens());
    this.probabilities.addEventListener("click", (event) => {
      const item = event.target.closest("li[data-token]");
      if (item) this.insertAtCursor(item.dataset.token);
    });
  }

  shown() {
    this.countTokens();
  }

  async countTokens() {
    const model = this.app.panel.model();
    if (!model) return;
    try {
      const { tokens } = await api.post("/api/tokenize", { model, content: this.text.value });
      this.count.textContent = `${tokens.length} tokens`;
    } catch (error) {
      this.count.textContent = error.message;
    }
  }

  async generate() {
    if (this.controller) return;
    this.controller = new AbortController();
    this.generateButton.hidden = true;
    this.stopButton.hidden = false;
    this.probabilities.hidden = true;
    let added = "";
    try {
      const body = {
        model: this.app.panel.model(),
        prompt: this.text.value,
        raw: true,
        stream: true,
        options: this.app.panel.options(),
      };
      for await (const chunk of api.stream("/api/generate", body, { signal: this.controller.signal })) {
        if (!chunk.response) continue;
        added += chunk.response;
        const text = added;
        added = "";
        inFrame("notebook", () => {
          this.text.value += text;
          this.text.scrollTop = this.text.scrollHeight;
          localStorage.setItem("ember.notebook", this.text.value);
        });
      }
    } catch (error) {
      if (!api.isAbort(error)) this.count.textContent = error.message;
    } finally {
      this.controller = null;
      this.generateButton.hidden = false;
      this.stopButton.hidden = true;
      setTimeout(() => this.countTokens(), 50);
    }
  }

  stop() {
    this.controller?.abort();
  }

  async nextTokens() {
    const cursor = this.text.selectionStart ?? this.text.value.length;
    const body = {
      model: this.app.panel.model(),
      prompt: this.text.value.slice(0, cursor),
      raw: true,
      stream: false,
      logprobs: true,
      top_logprobs: 10,
      options: { ...this.app.panel.options(), num_predict: 1, temperature: 0 },
    };
    try {
      const answer = await api.post("/api/generate", body);
      const top = answer.logprobs?.[0]?.top_logprobs || [];
      this.probabilities.replaceChildren(
        ...top.map((entry) =>
          el(
            "li",
            { "data-token": entry.token, title: "Insert at the cursor" },
            el("code", { text: JSON.stringify(entry.token) }),
            el("span", { class: "bar", style: undefined }),
            el("span", { class: "probability", text: `${(100 * Math.exp(entry.logprob)).toFixed(1)}%` }),
          ),
        ),
      );
      for (const [index, item] of [...this.probabilities.children].entries()) {
        item.querySelector(".bar").style.width = `${(100 * Math.exp(top[index].logprob)).toFixed(1)}%`;
      }
      this.probabilities.hidden = false;
    } catch (error) {
      this.count.textContent = error.message;
    }
  }

  insertAtCursor(token) {
    const cursor = this.text.selectionStart ?? this.text.value.length;
    this.text.setRangeText(token, cursor, this.text.selectionEnd ?? cursor, "end");
    this.text.focus();
    this.text.dispatchEvent(new Event("input"));
    this.nextTokens();
  }
}
