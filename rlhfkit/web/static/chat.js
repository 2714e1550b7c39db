// Chat: posts the conversation to /api/chat and shows the streamed tokens as they arrive.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const log = document.getElementById("log");
  const form = document.getElementById("chat-form");
  const input = document.getElementById("message");
  const status = document.getElementById("chat-status");
  let messages = [];

  function bubble(role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    const who = document.createElement("span");
    who.className = "role";
    who.textContent = role === "user" ? "you" : document.getElementById("model").value;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;  // always text, never markup
    div.append(who, body);
    log.append(div);
    return body;
  }

  async function send() {
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    messages.push({ role: "user", content: text });
    bubble("user", text);
    const out = bubble("assistant", "");
    out.classList.add("streaming");
    status.textContent = "";
    let reply = "";
    try {
      const r = await fetch("/api/chat", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ model: document.getElementById("model").value, messages, stream: true }),
      });
      if (!r.ok) {
        const data = await r.json().catch(() => ({}));
        throw new Error((data.error && data.error.message) || ("error " + r.status));
      }
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const line = buf.slice(0, cut).trim();
          buf = buf.slice(cut + 2);
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          const delta = chunk.choices[0].delta.content || "";
          reply += delta;
          out.textContent = reply;
        }
      }
      messages.push({ role: "assistant", content: reply });
    } catch (err) {
      status.textContent = err.message;
      messages.pop();
    }
    out.classList.remove("streaming");
    out.classList.add("done");
  }

  form.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
  });
  document.getElementById("reset").addEventListener("click", () => { messages = []; log.textContent = ""; });
})();
