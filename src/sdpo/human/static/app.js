// The labelling page: shows the server's current item, sends one choice at a time, never guesses.
// Every answer is saved by the server before it answers; the page only ever shows what the server said.
"use strict";

const KEYS = {
  paired: { ArrowLeft: "left", a: "left", 1: "left", ArrowRight: "right", d: "right", 2: "right",
            ArrowDown: "tie", t: "tie", 3: "tie", s: "skip", 0: "skip" },
  unpaired: { ArrowUp: "up", w: "up", "+": "up", ArrowDown: "down", x: "down", "-": "down", s: "skip", 0: "skip" },
};
KEYS.blind = KEYS.paired;
const LABELS = { left: "Left is better (←)", right: "Right is better (→)", tie: "Tie (↓)", skip: "Skip (S)",
                 up: "Good (↑)", down: "Bad (↓)" };
let state = null;
let busy = false;

const $ = (id) => document.getElementById(id);

function setStatus(text) { $("status").textContent = text || ""; }

async function call(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) { const error = new Error(data.error || `HTTP ${response.status}`); error.status = response.status; throw error; }
  return data;
}

async function load() {
  try {
    state = await call("/api/state");
    render();
    setStatus("");
  } catch (error) {
    document.body.dataset.state = "offline";
    setStatus("The server does not answer (stopped?): start it again; every saved answer is kept. Retrying...");
    setTimeout(load, 1000);
  }
}

function mediaElement(side) {
  if (side.error) {
    const card = document.createElement("div");
    card.className = "card error";
    card.textContent = `Cannot show this one: ${side.error}. Skip this pair (S).`;
    return card;
  }
  const card = document.createElement("div");
  card.className = "card";
  let media;
  if (side.kind === "video") {
    media = document.createElement("video");
    Object.assign(media, { muted: true, loop: true, autoplay: true, playsInline: true });
  } else {
    media = document.createElement("img");
    media.alt = "candidate";
  }
  media.src = side.url;
  media.onerror = () => { card.className = "card error"; card.textContent = "Cannot load this one: skip this pair (S)."; };
  card.appendChild(media);
  return card;
}

function render() {
  const item = state.item;
  $("title").textContent = state.title;
  $("rater").textContent = `rater: ${state.rater}`;
  $("progress").textContent = `${state.done} / ${state.total} answered`;
  const cards = $("cards");
  cards.replaceChildren();
  $("buttons").replaceChildren();
  if (!item) {
    $("prompt").textContent = state.can_end ? "All answered: end the session to see the results." : "All answered. Thank you!";
    $("help").textContent = "";
    document.body.dataset.item = "";
    addButton("Undo last (U)", undo);
    if (state.can_end) addButton("End session and reveal", end);
    document.body.dataset.state = "done";
    return;
  }
  $("prompt").textContent = item.prompt;
  item.sides.forEach((side, index) => {
    const card = mediaElement(side);
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = item.sides.length === 2 ? (index === 0 ? "left" : "right") : "";
    if (item.names) card.dataset.name = item.names[index];
    card.appendChild(label);
    cards.appendChild(card);
  });
  for (const choice of state.choices) addButton(LABELS[choice], () => choose(choice));
  addButton("Undo last (U)", undo);
  if (state.can_end) addButton("End session and reveal", end);
  const videos = cards.querySelectorAll("video");
  $("help").textContent = "Keys: " + state.choices.map((c) => LABELS[c]).join(", ") + ", undo (U)" +
    (videos.length ? "; clips: space plays / pauses, , and . step one frame" : "");
  syncVideos(videos);
  document.body.dataset.item = item.id;
  document.body.dataset.state = "ready";
}

function addButton(text, action) {
  const button = document.createElement("button");
  button.textContent = text;
  button.onclick = action;
  $("buttons").appendChild(button);
}

function syncVideos(videos) {
  if (videos.length < 2) return;
  const [lead, follow] = videos;
  lead.addEventListener("timeupdate", () => {
    if (!lead.paused && Math.abs(follow.currentTime - lead.currentTime) > 0.5 / state.fps) follow.currentTime = lead.currentTime;
  });
}

function stepFrames(delta) {
  const videos = document.querySelectorAll("#cards video");
  if (!videos.length) return;
  const frame = Math.max(0, Math.round(videos[0].currentTime * state.fps - 0.5) + delta);
  videos.forEach((v) => { v.pause(); v.currentTime = Math.min((frame + 0.5) / state.fps, v.duration || Infinity); });
}

function togglePlay() {
  const videos = document.querySelectorAll("#cards video");
  const play = videos.length && videos[0].paused;
  videos.forEach((v) => { if (play) { v.currentTime = videos[0].currentTime; v.play(); } else v.pause(); });
}

async function post(path, body) {
  if (busy) return;
  busy = true;
  document.body.dataset.state = "busy";
  try {
    state = await call(path, body);
    render();
    setStatus("");
  } catch (error) {
    if (error.status) { setStatus(error.message); await load(); }  // refused: show the server's view again
    else { document.body.dataset.state = "offline"; setStatus("Not saved: the server does not answer. Retrying..."); setTimeout(load, 1000); }
  } finally {
    busy = false;
  }
}

function choose(choice) {
  if (!state || !state.item) return;
  post("/api/answer", { rater: state.rater, item: state.item.id, choice });
}

function undo() { if (state) post("/api/undo", { rater: state.rater }); }

async function end() {
  if (!state || busy) return;
  busy = true;
  try {
    const result = await call("/api/end", { rater: state.rater });
    showReveal(result);
  } catch (error) {
    setStatus(error.message || "The server does not answer.");
  } finally {
    busy = false;
  }
}

function showReveal(result) {
  const section = $("reveal");
  $("buttons").replaceChildren();  // the names are shown: no more answers in this session
  $("prompt").textContent = "Session ended: every answer is saved, and the results are in the evaluation folder.";
  section.hidden = false;
  section.replaceChildren();
  const heading = document.createElement("h2");
  heading.textContent = "Results (names revealed)";
  section.appendChild(heading);
  for (const line of result.summary || []) {
    const p = document.createElement("p");
    p.className = "summary";
    p.textContent = line;
    section.appendChild(p);
  }
  const table = document.createElement("table");
  table.innerHTML = "<tr><th>prompt</th><th>left</th><th>right</th><th>you chose</th></tr>";
  for (const row of result.reveal || []) {
    const tr = document.createElement("tr");
    const chosen = row.choice === "left" ? row.left : row.choice === "right" ? row.right : row.choice;
    for (const value of [row.prompt, row.left, row.right, chosen]) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.appendChild(td);
    }
    table.appendChild(tr);
  }
  section.appendChild(table);
  document.body.dataset.state = "revealed";
}

document.addEventListener("keydown", (event) => {
  if (!state || event.ctrlKey && event.key !== "z" || event.metaKey || event.altKey) return;
  if (event.key === "u" || event.key === "Backspace" || (event.ctrlKey && event.key === "z")) { event.preventDefault(); undo(); return; }
  if (event.key === " ") { event.preventDefault(); togglePlay(); return; }
  if (event.key === ",") { stepFrames(-1); return; }
  if (event.key === ".") { stepFrames(1); return; }
  const choice = (KEYS[state.mode] || {})[event.key];
  if (choice) { event.preventDefault(); choose(choice); }
});

load();
