// The rating page: one request per answer; the server has it on disk before it answers.
"use strict";
let state = null;
let busy = false;
const $ = (id) => document.getElementById(id);

function toast(text) {
  const t = $("toast");
  t.textContent = text;
  t.classList.add("show");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => t.classList.remove("show"), 1400);
}

async function call(path, body) {
  const r = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function legend() {
  const keys = state.mode === "stars"
    ? `<kbd>1</kbd>–<kbd>${state.scale === 10 ? "9" : state.scale}</kbd>${state.scale === 10 ? " and <kbd>0</kbd> (=10)" : ""} rate`
    : "<kbd>←</kbd> left is better · <kbd>→</kbd> right is better · <kbd>↓</kbd> tie";
  $("legend").innerHTML = `${keys} · <kbd>s</kbd> skip · <kbd>Backspace</kbd> undo · answers go to <code></code>` +
    (state.user ? " as <b></b>" : "");
  $("legend").querySelector("code").textContent = state.out;  // text, never markup: a path may hold anything
  if (state.user) $("legend").querySelector("b").textContent = state.user;
  $("question").textContent = state.mode === "stars"
    ? `How much do you like this image? 1 = not at all, ${state.scale} = very much.`
    : "Which of the two do you like better? Or are they equal?";
}

// Each image's own size beside it, and how far it was scaled down to fit (never up).
function showSize(img) {
  const label = $(`${img.id}-size`);
  if (!img.naturalWidth) { label.textContent = ""; return; }
  const shown = img.getBoundingClientRect().width / img.naturalWidth;
  label.textContent = `${img.naturalWidth} × ${img.naturalHeight} px` +
    (shown < 0.995 ? `, shown at ${Math.round(100 * shown)} %` : "");
}

function render() {
  const n = state.next;
  $("count").textContent = `${state.rated} / ${state.target}`;
  $("fill").style.width = `${Math.min(100, 100 * state.rated / state.target)}%`;
  legend();
  $("stars").hidden = state.mode !== "stars" || !n;
  $("pairs").hidden = state.mode !== "pairs" || !n;
  $("done").hidden = !!n && state.rated < state.target;
  if (!n || state.rated >= state.target) {
    $("stars").hidden = $("pairs").hidden = true;
    $("done-count").textContent = state.rated;
    $("done-out").textContent = state.out;
    $("learn-command").textContent = state.learn_command;
    $("skip").disabled = true;
    document.title = "laionfilter · rated";
    return;
  }
  $("skip").disabled = false;
  ["single", "left", "right"].forEach((id) => ($(`${id}-size`).textContent = ""));
  if (state.mode === "stars") {
    $("single").src = `/image/${n.item}`;
    $("single").dataset.item = n.item;
    $("single-label").textContent = n.label;
  } else {
    $("left").src = `/image/${n.a}`;
    $("right").src = `/image/${n.b}`;
    $("left").dataset.item = n.a;
    $("right").dataset.item = n.b;
    $("left-label").textContent = n.label_a;
    $("right-label").textContent = n.label_b;
  }
  document.body.dataset.ready = `${state.rated}:${n.item ?? n.a + "-" + n.b}`;  // for tests and scripts
}

async function act(path, body, message) {
  if (busy) return;
  busy = true;
  try {
    state = await call(path, body);
    if (message) toast(message);
    render();
  } catch (e) {
    toast(`not saved: ${e.message}`);
  } finally {
    busy = false;
  }
}

function rateStars(score) {
  act("/api/answer", {item: state.next.item, score}, `${score} ★ saved`);
}

function pick(winner) {
  const n = state.next;
  act("/api/answer", {a: n.a, b: n.b, winner}, winner === "tie" ? "tie saved" : "saved");
}

function skip() {
  const n = state.next;
  act("/api/skip", state.mode === "stars" ? {item: n.item} : {a: n.a, b: n.b}, "skipped");
}

document.addEventListener("keydown", (e) => {
  if (!state || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === "Backspace") { e.preventDefault(); act("/api/undo", {}, "undone"); return; }
  if (!state.next || state.rated >= state.target) return;
  if (e.key === "s") { skip(); return; }
  if (state.mode === "stars" && /^[0-9]$/.test(e.key)) {
    const score = e.key === "0" ? 10 : Number(e.key);
    if (score <= state.scale) rateStars(score);
  } else if (state.mode === "pairs") {
    const winner = {ArrowLeft: "a", ArrowRight: "b", ArrowDown: "tie"}[e.key];
    if (winner) { e.preventDefault(); pick(winner); }
  }
});

function unreadable(img) {
  if (!state || !state.next || !img.dataset.item) return;
  act("/api/skip", {unreadable: true, bad: Number(img.dataset.item)}, "could not show that image: skipped");
}

async function start() {
  state = await call("/api/state");
  const buttons = $("buttons");
  for (let s = 1; s <= state.scale; s++) {
    const b = document.createElement("button");
    b.textContent = s;
    b.title = `${s} (key ${s === 10 ? 0 : s})`;
    b.addEventListener("click", () => rateStars(s));
    buttons.appendChild(b);
  }
  document.querySelectorAll("#pairs button").forEach((b) => b.addEventListener("click", () => pick(b.dataset.winner)));
  ["single", "left", "right"].forEach((id) => {
    $(id).addEventListener("error", () => unreadable($(id)));
    $(id).addEventListener("load", () => showSize($(id)));
  });
  window.addEventListener("resize", () => ["single", "left", "right"].forEach((id) => showSize($(id))));
  $("skip").addEventListener("click", () => { if (state.next && state.rated < state.target) skip(); });
  $("undo").addEventListener("click", () => act("/api/undo", {}, "undone"));
  render();
}

start().catch((e) => toast(`cannot reach the server: ${e.message}`));
