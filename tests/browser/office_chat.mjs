// Drives examples/office-chat in Debian's Chromium for tests/apps.rs: three people in two
// offices, each office with its own relay, one hub between them. Serves the example itself
// (plain files, on 127.0.0.1). One line per stage on stdout; on "wait-restart" it reads a line
// from stdin (the test restarts office B's relay meanwhile).
//
//   node office_chat.mjs CONFIG_JSON
//   CONFIG_JSON: {"relayA": "wss://…/mqtt", "relayB": "wss://…/mqtt", "secret": "…",
//                 "hello": "…", "away": "…", "restart": "…", "artefacts": "dir"}
//
// Any script error, console error, or request to anywhere but 127.0.0.1: "FAIL …", exit 1.
import { launch } from './chromium.mjs';
import { createServer } from 'node:http';
import { mkdirSync, readFileSync, statSync } from 'node:fs';
import { join, extname, resolve, sep } from 'node:path';
import { createInterface } from 'node:readline';

const cfg = JSON.parse(process.argv[2]);
const STAGE = 60_000;
const app = resolve(new URL('../../examples/office-chat', import.meta.url).pathname);
mkdirSync(cfg.artefacts, { recursive: true });

// The example's files, as any static web server would serve them.
const types = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.json': 'application/json' };
const server = createServer((req, res) => {
  const path = resolve(app, `.${decodeURIComponent(new URL(req.url, 'http://x').pathname)}`);
  const file = path.endsWith(sep) || path === app ? join(path, 'index.html') : path;
  if (!file.startsWith(app + sep)) { res.writeHead(403).end(); return; }
  try {
    statSync(file);
    res.writeHead(200, { 'content-type': types[extname(file)] ?? 'application/octet-stream' });
    res.end(readFileSync(file));
  } catch {
    res.writeHead(404).end();
  }
});
await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
const origin = `http://127.0.0.1:${server.address().port}`;

const problems = [];
const say = (line) => console.log(line);
const input = createInterface({ input: process.stdin });
const lines = input[Symbol.asyncIterator]();

const browser = await launch([
  // The relays' certificate is the test's own.
  '--ignore-certificate-errors',
  // WebRTC candidates with plain addresses (no mDNS names), loopback allowed.
  '--allow-loopback-in-peer-connection',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
]);

const open = new Set();

/** A person's page, logged in to `relay`. */
async function person(user, relay, password) {
  const context = await browser.newContext({ viewport: { width: 900, height: 700 } });
  const page = await context.newPage();
  const who = { user, context, page };
  open.add(who);
  context.on('close', () => open.delete(who));
  page.on('pageerror', (e) => problems.push(`${user}: script error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`${user}: console error: ${m.text()}`); });
  page.on('request', (r) => {
    // data: and blob: (mqtt.js's timer worker) are made in the page, not fetched.
    if (r.url().startsWith('data:') || r.url().startsWith('blob:')) return;
    const host = new URL(r.url()).hostname;
    if (host !== '127.0.0.1') problems.push(`${user}: request outside the test: ${r.url()}`);
  });
  page.on('websocket', (ws) => {
    if (new URL(ws.url()).hostname !== '127.0.0.1') problems.push(`${user}: websocket outside: ${ws.url()}`);
  });
  await page.goto(`${origin}/`);
  await page.fill('#relay', relay);
  await page.fill('#user', user);
  await page.fill('#password', password);
  await page.fill('#room', 'ops');
  await page.fill('#secret', cfg.secret);
  await page.click('#join');
  await page.waitForFunction(() => document.body.dataset.room, null, { timeout: STAGE });
  return who;
}

const wait = (p, fn, arg) => p.page.waitForFunction(fn, arg, { timeout: STAGE, polling: 100 });
const said = (p, from, text) => wait(p, ([f, t]) => [...document.querySelectorAll('#messages li')]
  .some((li) => li.dataset.from === f && li.textContent.includes(t)), [from, text]);
const online = (p, who, s) => wait(p, ([w, st]) => document.querySelector(`#people li[data-user="${w}"]`)?.dataset.state === st, [who, s]);
async function resumed(p) {
  const session = await p.page.evaluate(() => document.body.dataset.session);
  if (session !== 'resumed') throw new Error(`${p.user}'s session: ${session}`);
}
async function send(p, text) {
  await p.page.fill('#text', text);
  await p.page.click('#send button');
}

let code = 0;
try {
  const alice = await person('alice', cfg.relayA, 'alice-pw');
  let bob = await person('bob', cfg.relayB, 'bob-pw');
  const eve = await person('eve', cfg.relayB, 'eve-pw');
  const rooms = await Promise.all([alice, bob, eve].map((p) => p.page.evaluate(() => document.body.dataset.room)));
  if (rooms.join() !== 'open,open,refused') throw new Error(`room access alice,bob,eve: ${rooms}`);
  say('joined');

  await online(alice, 'bob', 'online');
  await online(bob, 'alice', 'online');
  say('presence');

  await send(alice, cfg.hello);
  await said(bob, 'alice', cfg.hello);
  say('delivered');

  // Eve is not in the room: her publish is refused and she sees nothing of it.
  await send(eve, 'eve was here');
  await wait(eve, () => document.body.dataset.refused === '1');
  await said(alice, 'alice', cfg.hello);
  const eveSaw = await eve.page.$$eval('#messages li', (l) => l.length);
  if (eveSaw !== 0) throw new Error(`eve saw ${eveSaw} messages of the room`);
  const aliceSaw = await alice.page.$$eval('#messages li', (l) => l.map((li) => li.dataset.from));
  if (aliceSaw.includes('eve')) throw new Error('eve\'s message reached the room');
  await eve.context.close();
  say('refused');

  // Bob goes away (the tab closes); his will tells alice. What she says meanwhile waits for
  // him in his session at B: once with B running, once across a kill -9 of B's relay.
  await bob.context.close();
  await online(alice, 'bob', 'offline');
  say('bob away');
  await send(alice, cfg.away);
  await said(alice, 'alice', cfg.away);
  bob = await person('bob', cfg.relayB, 'bob-pw');
  await resumed(bob);
  await said(bob, 'alice', cfg.away);
  say('caught up');

  await bob.context.close();
  await online(alice, 'bob', 'offline');
  await send(alice, cfg.restart);
  await said(alice, 'alice', cfg.restart);
  say('wait-restart');
  const go = await lines.next();
  if (go.done) throw new Error('the test went away');
  bob = await person('bob', cfg.relayB, 'bob-pw');
  await resumed(bob);
  await said(bob, 'alice', cfg.restart);
  // Alice's presence, retained at B when it came from the hub, survived B's restart.
  await online(bob, 'alice', 'online');
  say('caught up after the restart');

  // A call: signalled over the relays, a data channel peer to peer.
  await online(alice, 'bob', 'online');
  await alice.page.click('#people button.call[data-user="bob"]');
  await wait(alice, () => document.body.dataset.call === 'open');
  await wait(bob, () => document.body.dataset.call === 'open');
  await alice.page.fill('#call-text', 'ping over the data channel');
  await alice.page.click('#call-send button');
  await wait(bob, () => [...document.querySelectorAll('#call-log li')].some((li) => li.dataset.from === 'alice' && li.textContent.includes('ping over the data channel')));
  await bob.page.fill('#call-text', 'pong');
  await bob.page.click('#call-send button');
  await wait(alice, () => [...document.querySelectorAll('#call-log li')].some((li) => li.dataset.from === 'bob' && li.textContent.includes('pong')));
  say('call');
  await alice.page.screenshot({ path: join(cfg.artefacts, 'alice.png'), fullPage: true });
  await bob.page.screenshot({ path: join(cfg.artefacts, 'bob.png'), fullPage: true });
} catch (e) {
  problems.push(`${e.name}: ${e.message.split('\n')[0]}`);
  // What each page showed when it failed.
  for (const p of open) {
    const shown = await p.page.evaluate(() => ({
      state: { ...document.body.dataset },
      messages: [...document.querySelectorAll('#messages li')].map((li) => li.textContent),
      errors: ['login-error', 'room-error'].map((id) => document.getElementById(id).textContent),
      link: document.getElementById('link').textContent,
    })).catch((err) => ({ error: err.message }));
    problems.push(`${p.user} showed ${JSON.stringify(shown)}`);
  }
}
await browser.close();
server.close();
for (const p of problems) { console.log(`FAIL ${p}`); code = 1; }
if (code === 0) console.log('ok');
process.exit(code);
