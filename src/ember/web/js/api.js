// Calls to the ember server: JSON requests and NDJSON streams, with the API key the page keeps.
// The key (when the server has EMBER_API_KEYS) is asked for once and kept in this browser's localStorage.

const KEY_STORAGE = "ember.apiKey";
let unauthorizedHandler = null;

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

/** `handler()` returns a promise that resolves once a new key is set; the failed call is then retried. */
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

function headers(json) {
  const result = {};
  if (json) result["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    const error = body.error;
    message = typeof error === "string" ? error : error?.message || message;
  } catch {
    /* not JSON: keep the status line */
  }
  return new ApiError(response.status, message);
}

async function send(method, path, body, signal, retried = false) {
  const isForm = body instanceof FormData;
  const response = await fetch(path, {
    method,
    headers: headers(body !== undefined && !isForm),
    body: body === undefined ? undefined : isForm ? body : JSON.stringify(body),
    signal,
  });
  if (response.status === 401 && unauthorizedHandler && !retried) {
    await unauthorizedHandler();
    return send(method, path, body, signal, true);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function call(method, path, body, { signal } = {}) {
  const response = await send(method, path, body, signal);
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

export const get = (path, options) => call("GET", path, undefined, options);
export const post = (path, body, options) => call("POST", path, body, options);
export const patch = (path, body, options) => call("PATCH", path, body, options);
export const del = (path, body, options) => call("DELETE", path, body, options);

/** POST `body` and yield each line of the NDJSON answer as an object; an `{"error"}` line throws. */
export async function* stream(path, body, { signal } = {}) {
  const response = await send("POST", path, body, signal);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline).trim();
        buffered = buffered.slice(newline + 1);
        if (!line) continue;
        const data = JSON.parse(line);
        if (data.error) throw new ApiError(500, data.error);
        yield data;
      }
    }
    if (buffered.trim()) {
      const data = JSON.parse(buffered);
      if (data.error) throw new ApiError(500, data.error);
      yield data;
    }
  } finally {
    reader.releaseLock();
  }
}

export const isAbort = (error) => error?.name === "AbortError";
