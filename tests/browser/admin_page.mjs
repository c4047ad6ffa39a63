// Opens the relay's page in Debian's Chromium (headless) and follows what it shows, stage by
// stage, printing one line per stage reached: tests/admin_page.rs drives the hub and the
// clients meanwhile and reads these lines.
//
//   node admin_page.mjs URL RELAY_NAME CLIENT_ID ARTEFACT_DIR
//
// Stages: "shown" (the relay's name, the hub up), "client" (CLIENT_ID in the clients table),
// "down" (the hub down), "rising N" (the backlog grew twice while the hub is down; screenshot
// hub-down.png), "up" (the hub up again), "drained" (backlog 0; screenshot page.png and
// phone.png). Then "requests N" (every request the page made went to the relay) and "ok".
// Any script error, console error, or request to another origin: "FAIL …" and exit 1.
import { launch } from './chromium.mjs';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const [url, relayName, clientId, artefacts] = process.argv.slice(2);
const STAGE_TIMEOUT = 60_000;
mkdirSync(artefacts, { recursive: true });

const origin = new URL(url).origin;
const problems = [];
const requests = [];

const browser = await launch();
let code = 0;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on('pageerror', (e) => problems.push(`script error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console error: ${m.text()}`); });
  page.on('request', (r) => {
    requests.push(r.url());
    if (!r.url().startsWith(`${origin}/`) && !r.url().startsWith('data:')) problems.push(`request outside the box: ${r.url()}`);
  });
  page.on('requestfailed', (r) => {
    // The event stream is cut when the browser closes; anything else is a problem.
    if (!r.url().endsWith('/events')) problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`);
  });

  const say = (line) => console.log(line);
  const wait = (fn, arg) => page.waitForFunction(fn, arg, { timeout: STAGE_TIMEOUT, polling: 100 });
  const backlog = () => page.$eval('#backlog', (el) => Number(el.dataset.value));

  await page.goto(url, { waitUntil: 'load' });
  await wait((name) => document.getElementById('relay').textContent === name
    && document.body.dataset.hub === 'up', relayName);
  say('shown');
  await wait((id) => [...document.querySelectorAll('#clients td')].some((td) => td.textContent === id), clientId);
  say('client');
  await wait(() => document.body.dataset.hub === 'down');
  say('down');
  const first = await (await wait(() => {
    const n = Number(document.getElementById('backlog').dataset.value);
    return n > 0 ? n : false;
  })).jsonValue();
  await wait((n) => Number(document.getElementById('backlog').dataset.value) > n, first);
  const risen = await backlog();
  await page.screenshot({ path: join(artefacts, 'hub-down.png'), fullPage: true });
  say(`rising ${first} ${risen}`);
  await wait(() => document.body.dataset.hub === 'up');
  say('up');
  await wait(() => document.getElementById('backlog').dataset.value === '0');
  // A second for the chart to show the drain.
  await page.waitForTimeout(1500);
  await page.screenshot({ path: join(artefacts, 'page.png'), fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(300);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  if (overflow > 0) problems.push(`on a phone-sized screen the page is ${overflow}px wider than the screen`);
  await page.screenshot({ path: join(artefacts, 'phone.png'), fullPage: true });
  say('drained');
  say(`requests ${requests.length}`);
} catch (e) {
  problems.push(`${e.name}: ${e.message.split('\n')[0]}`);
}
await browser.close();
for (const p of problems) { console.log(`FAIL ${p}`); code = 1; }
if (code === 0) console.log('ok');
process.exit(code);
