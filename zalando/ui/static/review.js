// The review queue's keyboard: 1-5 choose a group, 0 or x "unusable", arrows move; each decision is
// POSTed with the form's CSRF token, and the next undecided item gets the focus (the next page after
// the last one). Without this script the buttons still work as plain forms.
(function () {
  "use strict";
  const cards = Array.from(document.querySelectorAll("li.item"));
  if (!cards.length) return;
  const list = document.querySelector("ol.items");
  const reviewer = document.getElementById("reviewer");
  const reviewed = document.getElementById("reviewed");
  const progress = document.getElementById("progress");
  let current = 0;
  let busy = false;

  function focusCard(i) {
    if (i < 0 || i >= cards.length) return;
    current = i;
    cards[i].focus();
    cards[i].scrollIntoView({ block: "nearest" });
  }

  function nextUndecided(from) {
    for (let i = from + 1; i < cards.length; i++) if (!cards[i].dataset.label) return i;
    for (let i = 0; i < from; i++) if (!cards[i].dataset.label) return i;
    return -1;
  }

  async function decide(card, button) {
    if (busy) return false;
    busy = true;
    const form = card.querySelector("form.decide");
    const body = new URLSearchParams(new FormData(form));
    body.set("label", button.value);
    if (reviewer && reviewer.value.trim()) body.set("reviewer", reviewer.value.trim());
    const status = card.querySelector(".status");
    try {
      const r = await fetch(form.action, {
        method: "POST", body: body, credentials: "same-origin",
        headers: { "Accept": "application/json" },
      });
      const out = await r.json().catch(() => ({}));
      if (!r.ok) {
        card.classList.add("failed");
        status.textContent = out.detail || ("error " + r.status);
        return false;
      }
      const wasNew = !card.dataset.label;
      card.dataset.label = out.label;
      card.classList.add("decided");
      card.classList.remove("failed");
      card.querySelectorAll("form.decide button").forEach((b) => b.classList.toggle("chosen", b.value === out.label));
      status.textContent = "✓ " + out.label + (out.repeated ? " (already recorded)" : "");
      if (wasNew && reviewed) {
        const n = parseInt(reviewed.textContent, 10) + 1;
        reviewed.textContent = String(n);
        if (progress) progress.value = n;
      }
      return true;
    } catch (e) {
      status.textContent = "not saved: " + e;
      card.classList.add("failed");
      return false;
    } finally {
      busy = false;
    }
  }

  async function decideAndMove(i, button) {
    if (!(await decide(cards[i], button))) return;
    const n = nextUndecided(i);
    if (n >= 0) focusCard(n);
    else if (list.dataset.nextPage) window.location.assign(list.dataset.nextPage);
    else focusCard(Math.min(i + 1, cards.length - 1));
  }

  cards.forEach((card, i) => {
    card.addEventListener("focus", () => { current = i; });
    card.querySelectorAll("form.decide button").forEach((b) => {
      b.addEventListener("click", (ev) => { ev.preventDefault(); decideAndMove(i, b); });
    });
  });

  document.addEventListener("keydown", (ev) => {
    const t = ev.target;
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA")) return;
    const key = ev.key === "x" || ev.key === "X" ? "0" : ev.key;
    if (key === "ArrowRight" || key === "ArrowDown" || key === "j") { ev.preventDefault(); focusCard(current + 1); return; }
    if (key === "ArrowLeft" || key === "ArrowUp" || key === "k") { ev.preventDefault(); focusCard(current - 1); return; }
    const button = cards[current].querySelector('form.decide button[data-key="' + key + '"]');
    if (!button) return;
    ev.preventDefault();
    decideAndMove(current, button);
  });

  const first = nextUndecided(-1);
  focusCard(first >= 0 ? first : 0);
})();
