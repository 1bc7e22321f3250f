// A list that renders only the items in (and near) view: a long conversation keeps a few dozen elements in the
// page, not thousands. Heights are measured once an item has been shown and estimated before; updates are
// batched per animation frame. When the reader is at the bottom, new content keeps the view at the bottom.

import { inFrame } from "./frame.js";

const ESTIMATE = 96; // px, an item not yet measured
const OVERSCAN = 800; // px rendered above and below the view

export class VirtualList {
  constructor(scroller, inner, renderItem) {
    this.scroller = scroller;
    this.inner = inner;
    this.renderItem = renderItem;
    this.items = [];
    this.heights = new Map(); // key -> measured px
    this.elements = new Map(); // key -> element (kept while its item is unchanged)
    this.stickToBottom = true;
    this.key = `vlist-${Math.random()}`;
    scroller.addEventListener("scroll", () => {
      const { scrollTop, scrollHeight, clientHeight } = scroller;
      this.stickToBottom = scrollHeight - scrollTop - clientHeight < 40;
      this.schedule();
    });
    new ResizeObserver(() => this.schedule()).observe(scroller);
  }

  setItems(items) {
    this.items = items;
    const keys = new Set(items.map((item) => item.key));
    for (const key of this.elements.keys()) if (!keys.has(key)) this.elements.delete(key);
    this.schedule();
  }

  /** The item's element is rendered again (its content changed). */
  refresh(key) {
    this.elements.delete(key);
    this.schedule();
  }

  element(key) {
    return this.elements.get(key);
  }

  scrollToBottom() {
    this.stickToBottom = true;
    this.schedule();
  }

  schedule() {
    inFrame(this.key, () => this.update());
  }

  heightOf(item) {
    return this.heights.get(item.key) ?? ESTIMATE;
  }

  update() {
    const { items } = this;
    const total = items.reduce((sum, item) => sum + this.heightOf(item), 0);
    const viewTop = this.stickToBottom ? Math.max(0, total - this.scroller.clientHeight) : this.scroller.scrollTop;
    const low = viewTop - OVERSCAN;
    const high = viewTop + this.scroller.clientHeight + OVERSCAN;
    let offset = 0;
    let start = 0;
    while (start < items.length && offset + this.heightOf(items[start]) < low) offset += this.heightOf(items[start++]);
    const before = offset;
    let end = start;
    while (end < items.length && offset < high) offset += this.heightOf(items[end++]);
    const after = total - offset;

    const wanted = [];
    for (let index = start; index < end; index++) {
      const item = items[index];
      let node = this.elements.get(item.key);
      if (!node) {
        node = this.renderItem(item);
        node.dataset.key = item.key;
        this.elements.set(item.key, node);
      }
      wanted.push(node);
    }
    this.inner.style.paddingTop = `${before}px`;
    this.inner.style.paddingBottom = `${after}px`;
    const current = [...this.inner.children];
    if (current.length !== wanted.length || current.some((node, index) => node !== wanted[index])) {
      this.inner.replaceChildren(...wanted);
    }
    let changed = false;
    for (let index = start; index < end; index++) {
      const height = wanted[index - start].offsetHeight;
      if (height && height !== this.heights.get(items[index].key)) {
        this.heights.set(items[index].key, height);
        changed = true;
      }
    }
    if (this.stickToBottom) this.scroller.scrollTop = this.scroller.scrollHeight;
    if (changed) this.schedule(); // estimates were replaced by measurements: place the window again
  }
}
