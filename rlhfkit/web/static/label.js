// The ranking page: order answers by drag and drop or keyboard, mark ties, flag, submit as JSON.
"use strict";
(function () {
  const list = document.getElementById("ranking");
  if (!list) return;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const status = document.getElementById("status");
  const started = Date.now();
  let dragged = null;

  const cards = () => Array.from(list.querySelectorAll("li.answer"));

  function renumber() {
    // ranks: dense, best first; a card marked "tie" shares the rank of the card above it
    let rank = -1;
    cards().forEach((li, pos) => {
      const box = li.querySelector(".tie-box");
      if (pos === 0) box.checked = false;
      box.disabled = pos === 0;
      if (!(pos > 0 && box.checked)) rank += 1;
      li.dataset.rank = rank;
      li.querySelector(".place").textContent = "#" + (rank + 1) + (pos > 0 && box.checked ? " (tie)" : "");
    });
  }

  function move(li, delta) {
    if (delta < 0 && li.previousElementSibling) list.insertBefore(li, li.previousElementSibling);
    if (delta > 0 && li.nextElementSibling) list.insertBefore(li.nextElementSibling, li);
    li.focus();
    renumber();
  }

  cards().forEach((li) => {
    li.addEventListener("dragstart", (e) => {
      dragged = li;
      li.classList.add("dragging");
      e.dataTransfer.effectAllowed = "move";
      e.dataTransfer.setData("text/plain", li.dataset.index);
    });
    li.addEventListener("dragend", () => { li.classList.remove("dragging"); dragged = null; renumber(); });
    li.addEventListener("dragover", (e) => {
      e.preventDefault();
      if (!dragged || dragged === li) return;
      const box = li.getBoundingClientRect();
      const after = e.clientY > box.top + box.height / 2;
      list.insertBefore(dragged, after ? li.nextElementSibling : li);
    });
    li.addEventListener("drop", (e) => { e.preventDefault(); renumber(); });
    li.addEventListener("keydown", (e) => {
      if (e.target !== li) return;  // typing in a checkbox or textarea is not a command
      if (e.key === "ArrowUp" || e.key === "ArrowDown") {
        e.preventDefault();
        const d = e.key === "ArrowUp" ? -1 : 1;
        if (e.shiftKey || e.altKey) move(li, d);
        else (d < 0 ? li.previousElementSibling : li.nextElementSibling)?.focus();
      } else if (e.key === "t" || e.key === "T") {
        const box = li.querySelector(".tie-box");
        if (!box.disabled) { box.checked = !box.checked; renumber(); }
      }
    });
    li.querySelector(".up").addEventListener("click", () => move(li, -1));
    li.querySelector(".down").addEventListener("click", () => move(li, 1));
    li.querySelector(".tie-box").addEventListener("change", renumber);
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submit(); }
  });

  async function post(url, body) {
    const r = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body),
    });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error((data.error && data.error.message) || ("error " + r.status));
    return data;
  }

  let sending = false;
  async function submit() {
    if (sending) return;
    sending = true;
    renumber();
    const ordered = cards();
    const ranks = new Array(ordered.length);
    const flags = [];
    ordered.forEach((li) => {
      const i = Number(li.dataset.index);
      ranks[i] = Number(li.dataset.rank);
      li.querySelectorAll(".flag:checked").forEach((f) => flags.push({ answer: i, kind: f.value }));
    });
    status.textContent = "Saving…";
    try {
      // the same key on every retry of this page's submission: the server stores it once
      await post("/api/tasks/" + list.dataset.task + "/ranking", {
        ranks, flags, better_answer: document.getElementById("better").value,
        idempotency_key: list.dataset.key, seconds: (Date.now() - started) / 1000,
      });
      status.textContent = "Saved.";
      window.location.assign("/label");
    } catch (err) {
      status.textContent = err.message;
      sending = false;
    }
  }
  document.getElementById("submit").addEventListener("click", submit);
  document.getElementById("skip").addEventListener("click", async () => {
    try { await post("/api/tasks/" + list.dataset.task + "/skip", {}); window.location.assign("/label"); }
    catch (err) { status.textContent = err.message; }
  });
  renumber();
  cards()[0].focus();
})();
