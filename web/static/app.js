// The relayvoice browser demo: the microphone goes to the server over WebRTC, the spoken reply
// comes back on the same connection, and an "events" data channel carries transcripts, the
// reply's text as it is heard, per-turn latencies and errors. Plain JS, no build step.
"use strict";

const PING_MS = 2000; // the server closes a peer it has not heard from in 10 s
const LOST_MS = 10000; // and the page gives up on a server silent this long
const ICE_GATHER_MS = 5000; // host candidates only: gathering takes milliseconds

const $ = (id) => document.getElementById(id);
const ui = {
  connect: $("connect"),
  state: $("state"),
  error: $("error"),
  turns: $("turns"),
  partial: $("partial"),
  latency: $("latency").querySelector("tbody"),
  link: $("link"),
  audio: $("reply"),
};
const token = new URLSearchParams(location.search).get("token");

let call = null; // the current call: {pc, channel, stream, timers, lastHeard}
let userTurn = null; // the user's turn shown from turn_ended until its final transcript

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function setState(state, text) {
  ui.state.dataset.state = state;
  ui.state.textContent = text || state;
  ui.connect.textContent = state === "idle" || state === "closed" ? "Connect" : "Disconnect";
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

async function microphone() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error(
      "This page cannot use the microphone here: open it over https or on localhost."
    );
  }
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (err) {
    if (err.name === "NotAllowedError" || err.name === "SecurityError") {
      throw new Error(
        "Microphone access was denied. Allow the microphone for this page and connect again."
      );
    }
    if (err.name === "NotFoundError") {
      throw new Error("No microphone was found. Plug one in and connect again.");
    }
    throw new Error(`The microphone could not be opened: ${err.message}`);
  }
}

function iceGathered(pc) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    const done = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, ICE_GATHER_MS);
  });
}

async function signal(pc) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch("/v1/webrtc/offer", {
      method: "POST",
      headers,
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", mode: mode() }),
    });
  } catch (err) {
    throw new Error(`Cannot reach the server (${err.message}).`);
  }
  const body = await response.json().catch(() => ({}));
  if (response.ok) return body;
  const detail = (body.error && body.error.message) || response.statusText;
  if (response.status === 503) {
    throw new Error(
      "The server is full: every conversation slot is in use. Try again in a minute."
    );
  }
  if (response.status === 401 || response.status === 403) {
    throw new Error(
      `Not allowed: ${detail}. Open the page with ?token=YOUR_TOKEN if the server needs one.`
    );
  }
  throw new Error(`The server refused the call (${response.status}): ${detail}`);
}

async function connect() {
  showError("");
  setState("connecting", "connecting…");
  const c = { pc: null, channel: null, stream: null, timers: [], lastHeard: Date.now() };
  call = c;
  try {
    c.stream = await microphone();
    if (call !== c) return release(c); // the user gave up while the browser asked
    c.pc = new RTCPeerConnection({ iceServers: [] });
    for (const track of c.stream.getAudioTracks()) c.pc.addTrack(track, c.stream);
    c.pc.ontrack = (event) => {
      ui.audio.srcObject = event.streams[0] || new MediaStream([event.track]);
    };
    c.pc.onconnectionstatechange = () => {
      const state = c.pc.connectionState;
      if (state === "failed") hangUp(c, "Connection lost: the network path to the server failed.");
      else if (state === "connected") setState("connected");
      else if (state !== "closed") setState(state);
    };
    c.channel = c.pc.createDataChannel("events");
    c.channel.onopen = () => {
      c.lastHeard = Date.now();
      c.timers.push(setInterval(() => keepAlive(c), PING_MS));
      c.timers.push(setInterval(() => showStats(c), 1000));
    };
    c.channel.onmessage = (event) => {
      c.lastHeard = Date.now();
      onMessage(c, JSON.parse(event.data));
    };
    c.channel.onclose = () => hangUp(c, "Connection lost: the server closed the conversation.");
    await c.pc.setLocalDescription(await c.pc.createOffer());
    await iceGathered(c.pc);
    if (call !== c) return release(c);
    const answer = await signal(c.pc);
    if (call !== c) return release(c);
    await c.pc.setRemoteDescription(answer);
  } catch (err) {
    hangUp(c, err.message);
  }
}

function keepAlive(c) {
  if (Date.now() - c.lastHeard > LOST_MS) {
    hangUp(c, "Connection lost: the server stopped answering.");
  } else if (c.channel.readyState === "open") {
    c.channel.send(JSON.stringify({ type: "ping" }));
  }
}

// Frees what a call holds: timers, the connection, the microphone.
function release(c) {
  c.timers.forEach(clearInterval);
  if (c.channel) {
    c.channel.onclose = null;
    c.channel.close();
  }
  if (c.pc) c.pc.close();
  if (c.stream) c.stream.getTracks().forEach((track) => track.stop());
}

// Ends call `c` if it is still the current one; `message` (if any) says why it ended without
// the user asking.
function hangUp(c, message) {
  release(c);
  if (call !== c) return;
  call = null;
  ui.audio.srcObject = null;
  ui.partial.textContent = "";
  setState("closed", message ? "disconnected" : "not connected");
  showError(message || "");
}

async function showStats(c) {
  if (!c.pc) return;
  let sent = 0;
  let received = 0;
  let energy = 0;
  (await c.pc.getStats()).forEach((report) => {
    if (report.kind !== "audio") return;
    if (report.type === "outbound-rtp") sent += report.bytesSent || 0;
    if (report.type === "inbound-rtp") {
      received += report.bytesReceived || 0;
      energy += report.totalAudioEnergy || 0;
    }
  });
  Object.assign(ui.link.dataset, { bytesSent: sent, bytesReceived: received, audioEnergy: energy });
  ui.link.textContent =
    `microphone → server ${(sent / 1024).toFixed(0)} kB · ` +
    `reply audio ← server ${(received / 1024).toFixed(0)} kB`;
}

function addTurn(role, text, turnId) {
  const item = document.createElement("li");
  item.className = `turn ${role}`;
  if (turnId !== undefined) item.dataset.turn = turnId;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : "assistant";
  const said = document.createElement("span");
  said.className = "said";
  said.textContent = text;
  item.append(who, said);
  ui.turns.append(item);
  item.scrollIntoView({ block: "nearest" });
  return item;
}

function reply(turnId) {
  const shown = ui.turns.querySelector(`.assistant[data-turn="${turnId}"]`);
  return shown || addTurn("assistant", "", turnId);
}

// Spoken chunks arrive trimmed (real voice) or with their own spacing (a text stream).
function joinText(before, piece) {
  const glue = !before || /\s$/.test(before) || /^[\s.,!?;:)]/.test(piece) ? "" : " ";
  return `${before}${glue}${piece}`.replace(/\s+/g, " ").trim();
}

const ms = (value) => (value === null || value === undefined ? "—" : Math.round(value));

function addLatency(m) {
  const row = document.createElement("tr");
  const cells = [
    m.turn_id,
    m.mode,
    ms(m.ms.first_audio_out),
    ms(m.ms.turn_ended),
    ms(m.ms.first_text),
    ms(m.ms.first_tts_audio),
    ms(m.ms.continuation_audio_out),
    ms(m.gap_ms),
    m.verdict === "none" ? "—" : m.verdict,
  ];
  for (const value of cells) {
    const cell = document.createElement("td");
    cell.textContent = value;
    row.append(cell);
  }
  row.cells[2].className = "onset";
  row.title = m.interruption
    ? `interrupted (${m.interruption}); heard: ${m.heard_text}`
    : m.reply_text;
  ui.latency.prepend(row);
}

function onMessage(c, m) {
  switch (m.type) {
    case "ready":
    case "mode": {
      const choice = document.querySelector(`input[name="mode"][value="${m.mode}"]`);
      if (choice) choice.checked = true;
      break;
    }
    case "state":
      if (m.state === "connected") setState("connected");
      break;
    case "speech_started":
      ui.partial.classList.add("speaking");
      break;
    case "speech_stopped":
      ui.partial.classList.remove("speaking");
      break;
    case "transcript_partial":
      ui.partial.textContent = m.text;
      break;
    case "turn_ended":
      userTurn = addTurn("user", m.transcript);
      userTurn.classList.add("pending");
      ui.partial.textContent = "";
      break;
    case "transcript_final":
      if (userTurn) userTurn.querySelector(".said").textContent = m.text;
      else userTurn = addTurn("user", m.text);
      userTurn.classList.remove("pending");
      userTurn.classList.add("final");
      userTurn = null;
      ui.partial.textContent = "";
      break;
    case "reply_text": {
      const said = reply(m.turn_id).querySelector(".said");
      said.textContent = joinText(said.textContent, m.text);
      break;
    }
    case "interrupted":
      reply(m.turn_id).classList.add("interrupted");
      break;
    case "turn_latency":
      addLatency(m);
      break;
    case "error":
      showError(m.stage ? `${m.stage} failed: ${m.message}` : m.message);
      break;
    case "closed":
      hangUp(c, `The server ended the conversation: ${m.reason}.`);
      break;
  }
}

ui.connect.addEventListener("click", () => (call ? hangUp(call) : connect()));
document.querySelectorAll('input[name="mode"]').forEach((input) =>
  input.addEventListener("change", () => {
    if (call && call.channel && call.channel.readyState === "open") {
      call.channel.send(JSON.stringify({ type: "mode", mode: mode() }));
    }
  })
);
