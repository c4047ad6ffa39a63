// office chat: rooms, presence and calls for the people of an organisation, through the
// office relays and the organisation's hub. See docs/APPS.md of relaybox.
//
// Topics (the relay's ACLs decide who may use which; %u is the user):
//   chat/<room>/<user>      a message to the room by <user>, sealed with the room's key
//   presence/<user>         retained {"state":"online"|"offline"}; the will says offline
//   call/<callee>/<caller>  WebRTC signalling (offer, answer, ICE candidates), sealed too
// The session is persistent (MQTT 5 Session Expiry 7 days, client id chat-<user>): what was
// said in the user's rooms while they were away waits for them at their relay.
import mqtt from './node_modules/mqtt/dist/mqtt.esm.js';
import { roomKey, seal, open } from './crypto.js';

const $ = (id) => document.getElementById(id);
const WEEK = 7 * 24 * 3600;

const state = { client: null, me: '', room: '', key: null, seen: new Set(), people: new Map(), call: null, inbox: Promise.resolve() };

function line(list, parts, attrs = {}) {
  const li = document.createElement('li');
  for (const [k, v] of Object.entries(attrs)) li.dataset[k] = v;
  for (const p of parts) {
    if (typeof p === 'object') {
      const b = document.createElement('b');
      b.textContent = p.bold;
      li.append(b);
    } else {
      li.append(document.createTextNode(p));
    }
  }
  $(list).append(li);
  return li;
}

// ---------------------------------------------------------------------------------------------
// Joining

$('login').addEventListener('submit', async (e) => {
  e.preventDefault();
  $('login-error').textContent = '';
  state.me = $('user').value.trim();
  state.room = $('room').value.trim();
  state.key = await roomKey(state.room, $('secret').value);
  connect($('relay').value.trim(), $('password').value);
});

function connect(url, password) {
  const me = state.me;
  const client = mqtt.connect(url, {
    protocolVersion: 5,
    clientId: `chat-${me}`,
    username: me,
    password,
    clean: false,
    properties: { sessionExpiryInterval: WEEK },
    reconnectPeriod: 1000,
    connectTimeout: 10_000,
    will: { topic: `presence/${me}`, payload: JSON.stringify({ state: 'offline' }), qos: 1, retain: true },
  });
  state.client = client;
  client.on('connect', (connack) => joined(connack.sessionPresent));
  client.on('reconnect', () => { $('link').textContent = 'reconnecting…'; });
  client.on('offline', () => { $('link').textContent = 'offline'; });
  client.on('error', (error) => {
    // A refused login ends the attempts: the user must fix it.
    if (document.body.dataset.state !== 'in') {
      client.end(true);
      $('login-error').textContent = `cannot join: ${error.message}`;
    }
  });
  // One message at a time, in the order they came: decrypting is asynchronous, and a call's
  // candidates must not overtake its offer.
  client.on('message', (topic, payload) => {
    state.inbox = state.inbox.then(() => received(topic, payload.toString())).catch((error) => console.warn(error));
  });
}

function joined(sessionPresent) {
  const { client, me, room } = state;
  document.body.dataset.state = 'in';
  document.body.dataset.session = sessionPresent ? 'resumed' : 'new';
  $('login').hidden = true;
  $('chat').hidden = false;
  $('me').textContent = me;
  $('room-name').textContent = room;
  $('link').textContent = 'connected';
  client.publish(`presence/${me}`, JSON.stringify({ state: 'online' }), { qos: 1, retain: true });
  const wanted = { [`chat/${room}/+`]: { qos: 1 }, 'presence/+': { qos: 1 }, [`call/${me}/+`]: { qos: 1 } };
  client.subscribe(wanted, (error, granted) => {
    const refused = (granted ?? []).filter((g) => g.qos >= 0x80).map((g) => g.topic);
    if (error || refused.some((t) => t.startsWith('chat/'))) {
      document.body.dataset.room = 'refused';
      $('room-error').textContent = `no access to room ${room}`;
    } else {
      document.body.dataset.room = 'open';
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Messages

$('send').addEventListener('submit', async (e) => {
  e.preventDefault();
  const input = $('text');
  if (!input.value) return;
  const topic = `chat/${state.room}/${state.me}`;
  const message = { id: crypto.randomUUID(), text: input.value, at: Date.now() };
  input.value = '';
  const sealed = await seal(state.key, topic, message);
  state.client.publish(topic, sealed, { qos: 1 }, (error) => {
    if (error) {
      $('room-error').textContent = `not sent: ${error.message}`;
      document.body.dataset.refused = String(Number(document.body.dataset.refused ?? 0) + 1);
    }
  });
});

async function received(topic, payload) {
  const [kind, a, b] = topic.split('/');
  if (kind === 'presence') return presence(a, payload);
  if (kind === 'call' && a === state.me) return signal(b, topic, payload);
  if (kind !== 'chat' || a !== state.room) return;
  let message;
  try {
    message = await open(state.key, topic, payload);
  } catch {
    line('messages', [{ bold: b }, '(a message this room key cannot open)'], { sealed: 'bad' });
    return;
  }
  if (state.seen.has(message.id)) return; // QoS 1 may bring it twice.
  state.seen.add(message.id);
  line('messages', [{ bold: b }, message.text], { from: b, id: message.id });
}

function presence(user, payload) {
  let value = 'offline';
  try { value = JSON.parse(payload).state ?? 'offline'; } catch { /* an empty payload: gone */ }
  state.people.set(user, value);
  const list = $('people');
  list.replaceChildren(...[...state.people].sort().map(([name, s]) => {
    const li = document.createElement('li');
    li.dataset.user = name;
    li.dataset.state = s;
    li.append(document.createTextNode(`${name} · ${s}`));
    if (name !== state.me && s === 'online') {
      const button = document.createElement('button');
      button.textContent = 'call';
      button.className = 'call';
      button.dataset.user = name;
      button.addEventListener('click', () => call(name));
      li.append(button);
    }
    return li;
  }));
}

// ---------------------------------------------------------------------------------------------
// Calls: WebRTC, signalled over the relays (sealed with the room's key), media peer to peer

function send(peer, value) {
  const topic = `call/${peer}/${state.me}`;
  seal(state.key, topic, value).then((sealed) => state.client.publish(topic, sealed, { qos: 1 }));
}

function newCall(peer) {
  const pc = new RTCPeerConnection({ iceServers: [] });
  const call = { peer, pc, channel: null, pending: [], described: false };
  state.call = call;
  $('call').hidden = false;
  $('peer').textContent = peer;
  callState('ringing');
  pc.onicecandidate = (e) => {
    if (e.candidate) send(peer, { kind: 'ice', candidate: e.candidate.toJSON() });
  };
  pc.oniceconnectionstatechange = () => { document.body.dataset.ice = pc.iceConnectionState; };
  pc.onconnectionstatechange = () => { if (pc.connectionState === 'failed') callState('failed'); };
  pc.ondatachannel = (e) => wire(e.channel);
  return call;
}

function callState(s) {
  $('call-state').textContent = s;
  document.body.dataset.call = s;
}

function wire(channel) {
  state.call.channel = channel;
  channel.onopen = () => callState('open');
  channel.onclose = () => callState('closed');
  channel.onmessage = (e) => line('call-log', [{ bold: state.call.peer }, e.data], { from: state.call.peer });
}

async function call(peer) {
  const c = newCall(peer);
  wire(c.pc.createDataChannel('talk'));
  await c.pc.setLocalDescription(await c.pc.createOffer());
  send(peer, { kind: 'offer', sdp: c.pc.localDescription.sdp });
}

async function signal(peer, topic, payload) {
  let s;
  try {
    s = await open(state.key, topic, payload);
  } catch {
    return; // Not from someone holding this room's key.
  }
  if (s.kind === 'offer') {
    const c = newCall(peer);
    await c.pc.setRemoteDescription({ type: 'offer', sdp: s.sdp });
    c.described = true;
    await c.pc.setLocalDescription(await c.pc.createAnswer());
    send(peer, { kind: 'answer', sdp: c.pc.localDescription.sdp });
    for (const candidate of c.pending.splice(0)) await c.pc.addIceCandidate(candidate);
    return;
  }
  const c = state.call;
  if (!c || c.peer !== peer) return;
  if (s.kind === 'answer') {
    await c.pc.setRemoteDescription({ type: 'answer', sdp: s.sdp });
    c.described = true;
    for (const candidate of c.pending.splice(0)) await c.pc.addIceCandidate(candidate);
  } else if (s.kind === 'ice') {
    if (c.described) await c.pc.addIceCandidate(s.candidate); else c.pending.push(s.candidate);
  }
}

$('call-send').addEventListener('submit', (e) => {
  e.preventDefault();
  const input = $('call-text');
  const c = state.call;
  if (!input.value || !c?.channel || c.channel.readyState !== 'open') return;
  c.channel.send(input.value);
  line('call-log', [{ bold: state.me }, input.value], { from: state.me });
  input.value = '';
});
