// The original WADI server's stack, as its documentation describes it (the seed's
// websocket-implementation.md): an Express HTTP server, a `ws` WebSocketServer attached to it,
// a Map of clients, `auth` / `message` / `stop` messages, and answers streamed from the `openai`
// SDK as `start`, `chunk` and `complete` frames. `cargo xtask bench compare` runs the same
// benchmark scenarios against it and against WADI.
//
// Written the way a Node developer would write it, and given every benefit of the doubt:
// - tokens are checked locally with the project's JWT secret (`jsonwebtoken`), where the
//   original asked Supabase over HTTP (`supabase.auth.getUser`) for every connection;
// - conversations and messages live in memory, where the original wrote them to Supabase;
// - a chunk frame is serialised once and the string sent to every socket of the conversation.
// It adds the two things the benchmark checks, and nothing else: `seq` on chunks and `status`
// on `complete`, and it sends a run's frames to every socket open on its conversation (several
// tabs), as the Map of clients with their conversation ids allows.

import { randomUUID } from "node:crypto";
import http from "node:http";

import express from "express";
import jwt from "jsonwebtoken";
import OpenAI from "openai";
import { WebSocket, WebSocketServer } from "ws";

const JWT_SECRET = process.env.JWT_SECRET ?? randomUUID();
const MODEL = process.env.WADI_MODEL ?? "gpt-4o-mini";
const PORT = Number(process.env.PORT ?? 0);
const HEARTBEAT_MS = 30_000;

const openai = new OpenAI(); // OPENAI_BASE_URL and OPENAI_API_KEY from the environment

// conversationId -> { userId, messages: [{ role, content }] }
const conversations = new Map();
// clientId -> WSClient { ws, id, userId, conversationId, runId, isActive }
const clients = new Map();
// conversationId -> the run streaming in it: { runId, controller }
const runs = new Map();

const app = express();
app.use(express.json({ limit: "1mb" }));

function requireUser(req, res, next) {
  const header = req.headers.authorization ?? "";
  const token = header.startsWith("Bearer ") ? header.slice(7) : "";
  try {
    req.userId = jwt.verify(token, JWT_SECRET, { algorithms: ["HS256"] }).sub;
    next();
  } catch {
    res.status(401).json({ error: "unauthorized" });
  }
}

// Stands in for Supabase Auth's signup: a user id and a signed access token.
app.post("/auth/v1/signup", (req, res) => {
  const { email, password } = req.body ?? {};
  if (typeof email !== "string" || typeof password !== "string" || password.length < 6) {
    return res.status(400).json({ error: "email and password required" });
  }
  const user = { id: randomUUID(), email };
  const access_token = jwt.sign({ sub: user.id, email, role: "authenticated" }, JWT_SECRET, {
    algorithm: "HS256",
    expiresIn: "1h",
  });
  res.json({ access_token, token_type: "bearer", expires_in: 3600, user });
});

app.post("/api/conversations", requireUser, (req, res) => {
  const id = randomUUID();
  conversations.set(id, { userId: req.userId, title: req.body?.title ?? null, messages: [] });
  res.status(201).json({ id, title: req.body?.title ?? null });
});

app.get("/readyz", (_req, res) => res.json({ status: "ready" }));

const server = http.createServer(app);
const wss = new WebSocketServer({ server });

function send(client, frame) {
  if (client.ws.readyState === WebSocket.OPEN) client.ws.send(frame);
}

function broadcast(conversationId, message) {
  const frame = JSON.stringify(message);
  for (const client of clients.values()) {
    if (client.isActive && client.conversationId === conversationId) send(client, frame);
  }
}

function parsePath(url) {
  const chat = /^\/ws\/chat\/([^/?]+)/.exec(url ?? "");
  if (chat) return { conversationId: chat[1] };
  const run = /^\/ws\/runs\/([^/?]+)\/stream/.exec(url ?? "");
  if (run) return { runId: run[1] };
  return null;
}

wss.on("connection", (ws, req) => {
  const resource = parsePath(req.url);
  if (!resource) {
    ws.close(1008, "unknown path");
    return;
  }
  const id = randomUUID();
  const client = { ws, id, userId: null, ...resource, isActive: false, alive: true };
  clients.set(id, client);
  ws.on("pong", () => {
    client.alive = true;
  });
  ws.send(JSON.stringify({ type: "connected", clientId: id }));

  ws.on("message", async (raw) => {
    let data;
    try {
      data = JSON.parse(raw.toString());
    } catch {
      ws.send(JSON.stringify({ type: "error", message: "Invalid message format" }));
      return;
    }
    try {
      if (data.type === "auth") handleAuth(client, data.token);
      else if (data.type === "message") await handleChatMessage(client, data.content);
      else if (data.type === "stop") handleStopRun(client);
      else ws.send(JSON.stringify({ type: "error", message: "Unknown message type" }));
    } catch (error) {
      ws.send(JSON.stringify({ type: "error", message: String(error?.message ?? error) }));
    }
  });
  ws.on("close", () => clients.delete(id));
  ws.on("error", () => clients.delete(id));
});

function handleAuth(client, token) {
  try {
    const claims = jwt.verify(token, JWT_SECRET, { algorithms: ["HS256"] });
    const conversation = conversations.get(client.conversationId);
    if (client.conversationId && conversation?.userId !== claims.sub) throw new Error("forbidden");
    client.userId = claims.sub;
    client.isActive = true;
    client.ws.send(JSON.stringify({ type: "authenticated", userId: claims.sub }));
  } catch {
    client.ws.close(1008, "Unauthorized");
    clients.delete(client.id);
  }
}

async function handleChatMessage(client, content) {
  if (!client.isActive) {
    client.ws.send(JSON.stringify({ type: "error", message: "Not authenticated" }));
    return;
  }
  if (typeof content !== "string" || content.trim() === "") {
    client.ws.send(JSON.stringify({ type: "error", message: "Message content required" }));
    return;
  }
  const conversationId = client.conversationId;
  const conversation = conversations.get(conversationId);
  if (runs.has(conversationId)) {
    client.ws.send(JSON.stringify({ type: "error", message: "An answer is still being written" }));
    return;
  }
  conversation.messages.push({ role: "user", content });
  const runId = randomUUID();
  const controller = new AbortController();
  runs.set(conversationId, { runId, controller });
  broadcast(conversationId, { type: "start", runId, conversationId });

  let fullOutput = "";
  let seq = 0;
  let status = "completed";
  try {
    const stream = await openai.chat.completions.create(
      { model: MODEL, messages: conversation.messages, stream: true },
      { signal: controller.signal },
    );
    for await (const part of stream) {
      const delta = part.choices[0]?.delta?.content;
      if (!delta) continue;
      fullOutput += delta;
      seq += 1;
      broadcast(conversationId, { type: "chunk", runId, seq, content: delta });
    }
  } catch (error) {
    status = controller.signal.aborted ? "stopped" : "failed";
    if (status === "failed") {
      broadcast(conversationId, { type: "error", runId, message: String(error?.message ?? error) });
    }
  } finally {
    runs.delete(conversationId);
  }
  conversation.messages.push({ role: "assistant", content: fullOutput });
  broadcast(conversationId, { type: "complete", runId, status, fullOutput });
}

function handleStopRun(client) {
  runs.get(client.conversationId)?.controller.abort();
}

// The usual `ws` heartbeat: a ping every 30 s, and a socket that missed the last pong is ended.
const heartbeat = setInterval(() => {
  for (const client of clients.values()) {
    if (!client.alive) {
      client.ws.terminate();
      clients.delete(client.id);
      continue;
    }
    client.alive = false;
    client.ws.ping();
  }
}, HEARTBEAT_MS);
wss.on("close", () => clearInterval(heartbeat));

server.listen(PORT, "127.0.0.1", () => {
  const { port } = server.address();
  console.log(`reference is running at http://127.0.0.1:${port}/`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    wss.close();
    server.close(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  });
}
