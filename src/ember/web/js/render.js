// Model output is untrusted: Markdown is parsed by marked and the HTML it makes goes through DOMPurify before it
// reaches the page (no script, no event handler, no style attribute); the page's Content-Security-Policy stops
// anything that would slip through. Code blocks get highlight.js and a copy button; [1], [2] become citations.

import { Marked } from "/web/vendor/marked.esm.js";
import DOMPurify from "/web/vendor/purify.es.js";
import hljs from "/web/vendor/highlight.min.js";

const marked = new Marked({ gfm: true, breaks: false, async: false });
const PURIFY = {
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "object", "embed"],
  FORBID_ATTR: ["style", "srcset"],
  RETURN_DOM_FRAGMENT: true,
};
const CITATION = /\[(\d{1,3})\]/g;
const HAS_CITATION = /\[\d{1,3}\]/;

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
  if (node.tagName === "IMG") {
    // Only pictures the page itself serves: a remote one would be a request the user never made.
    const source = node.getAttribute("src") || "";
    if (!source.startsWith("/") || source.startsWith("//")) node.removeAttribute("src");
  }
});

/** Fill `target` with `text` rendered as sanitized Markdown. `sources` (an answer's citations) links [n]. */
export function renderMarkdown(target, text, sources = null) {
  const fragment = DOMPurify.sanitize(marked.parse(text || ""), PURIFY);
  for (const block of fragment.querySelectorAll("pre > code")) {
    highlight(block);
    block.parentElement.prepend(copyButton(block));
  }
  if (sources && sources.length) linkCitations(fragment, sources);
  target.replaceChildren(fragment);
}

function highlight(block) {
  const language = [...block.classList].find((name) => name.startsWith("language-"))?.slice(9);
  try {
    if (language && hljs.getLanguage(language)) hljs.highlightElement(block);
    else {
      const result = hljs.highlightAuto(block.textContent);
      block.innerHTML = result.value; // highlight.js escapes the text it wraps in spans
      block.classList.add("hljs");
    }
  } catch {
    /* left plain */
  }
}

function copyButton(block) {
  const button = document.createElement("button");
  button.className = "copy";
  button.type = "button";
  button.textContent = "Copy";
  button.addEventListener("click", () => copyText(block.textContent, button));
  return button;
}

export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = document.createElement("textarea"); // without clipboard permission (plain http)
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  if (button) {
    const label = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = label), 1200);
  }
}

function linkCitations(fragment, sources) {
  const byNumber = new Map(sources.map((source) => [String(source.n), source]));
  const walker = document.createTreeWalker(fragment, NodeFilter.SHOW_TEXT, {
    acceptNode: (node) =>
      node.parentElement?.closest("code, pre, a") ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT,
  });
  const nodes = [];
  while (walker.nextNode()) if (HAS_CITATION.test(walker.currentNode.data)) nodes.push(walker.currentNode);
  for (const node of nodes) {
    const parts = [];
    let last = 0;
    for (const match of node.data.matchAll(CITATION)) {
      const source = byNumber.get(match[1]);
      if (!source) continue;
      parts.push(node.data.slice(last, match.index));
      const link = document.createElement("button");
      link.type = "button";
      link.className = "citation";
      link.textContent = match[0];
      link.title = source.name;
      link.dataset.source = match[1];
      parts.push(link);
      last = match.index + match[0].length;
    }
    parts.push(node.data.slice(last));
    node.replaceWith(...parts);
  }
}
