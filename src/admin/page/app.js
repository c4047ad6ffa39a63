// The relay's page: one event stream from /events, a frame a second; nothing is loaded from
// anywhere else. Every value is put in as text, never as markup.
const $ = (id) => document.getElementById(id);
const KEPT = 900;
const samples = [];

const num = (n) => (n ?? 0).toLocaleString('en');
const rate = (n) => (n ?? 0) >= 100 ? Math.round(n).toLocaleString('en') : (n ?? 0).toFixed(1);
function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  n = n ?? 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}
function duration(s) {
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}
const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour12: false });
const ago = (ms) => `${clock(ms)} (${duration((Date.now() - ms) / 1000)} ago)`;

function set(id, text) {
  const el = $(id);
  if (el.textContent !== text) el.textContent = text;
}

function rows(tbody, list, cells) {
  const body = $(tbody);
  body.replaceChildren(...list.map((item) => {
    const tr = document.createElement('tr');
    for (const text of cells(item)) {
      const td = document.createElement('td');
      td.textContent = text;
      tr.append(td);
    }
    return tr;
  }));
}

function render(f) {
  const s = f.status;
  set('relay', s.relay);
  document.title = `${s.relay} · relaybox`;
  set('version', `relaybox ${s.version}`);
  set('uptime', duration(s.uptime_s));

  const started = Date.now() - s.uptime_s * 1000;
  if (s.uplink) {
    const u = s.uplink;
    const state = u.connected ? 'up' : 'down';
    document.body.dataset.hub = state;
    set('hub-state', state);
    set('hub-since', ago(u.since_unix_ms || started));
    set('hub-rtt', u.acknowledged ? `${u.ack_latency_ms_last.toFixed(1)} ms (avg ${u.ack_latency_ms_avg.toFixed(1)})` : '–');
    set('hub-acked', num(u.acknowledged));
    const errors = Object.entries(u.hub_errors || {}).filter(([, n]) => n > 0);
    set('hub-errors', errors.length ? errors.map(([k, n]) => `${k} ${num(n)}`).join(', ') : 'none');
  } else {
    document.body.dataset.hub = 'none';
    set('hub-state', 'no hub configured');
  }

  const o = s.outbox;
  set('backlog', num(o.messages));
  $('backlog').dataset.value = String(o.messages);
  set('backlog-bytes', bytes(o.bytes));
  set('backlog-oldest', o.messages ? duration(o.oldest_age_s) : '–');
  const hubDown = s.uplink && !s.uplink.connected;
  set('drain-rate', hubDown ? 'hub down' : `${rate(f.drain_per_s)} messages/s`);
  set('drain-time', o.messages === 0 ? 'empty'
    : hubDown || f.time_to_drain_s == null ? 'not draining' : duration(f.time_to_drain_s));
  set('dropped', num(o.dropped_oldest + o.dropped_age + o.refused + o.corrupt));

  const fl = s.flash;
  set('per-day', `${bytes(fl.bytes_per_day)}/day`);
  set('per-commit', fl.bytes_per_commit ? `${Math.round(fl.bytes_per_commit).toLocaleString('en')} B` : '–');
  set('free', fl.total_bytes ? `${bytes(fl.free_bytes)} of ${bytes(fl.total_bytes)}` : '–');
  set('files', `${o.segments} segment${o.segments === 1 ? '' : 's'} + ${o.spare_segments} spare, ${bytes(o.file_bytes)}`);
  set('retained', `${num(o.retained_messages)} messages, ${bytes(o.retained_bytes)}`);
  set('memory', `${bytes(s.memory.rss_bytes)} (peak ${bytes(s.memory.peak_rss_bytes)})`);

  const b = s.broker;
  set('sessions-online', num(b.sessions_online));
  set('sessions-offline', num(b.sessions_offline));
  set('sessions-queued', `${num(b.queued_messages)} messages, ${bytes(b.queued_bytes)}`);
  set('auth-failures', num(s.mqtt.auth_failures));

  set('clients-total', num(f.clients_total));
  rows('clients', f.clients, (c) => [c.client_id, c.user ?? '–', c.protocol, c.address, clock(c.since_unix_ms)]);
  $('clients-more').hidden = f.clients_total <= f.clients.length;
  set('clients-more', `and ${num(f.clients_total - f.clients.length)} more`);

  const devices = [
    ...s.serial.map((p) => [`serial ${p.port}`, 'open', num(p.frames),
      `${num(p.garbage + p.bad_cobs + p.overlong + p.partial)} bad frames`]),
    ...s.modbus.map((d) => [`modbus ${d.device}`, d.online ? 'online' : 'offline', num(d.published),
      `${num(d.timeouts)} timeouts, ${num(d.exceptions)} exceptions`]),
  ];
  rows('devices', devices, (d) => d);
  $('devices-none').hidden = devices.length > 0;

  set('warnings-total', num(f.warnings_total));
  $('warnings').replaceChildren(...f.warnings.map((w) => {
    const li = document.createElement('li');
    li.className = w.level;
    const t = document.createElement('time');
    t.textContent = clock(w.unix_ms);
    li.append(t, document.createTextNode(w.text));
    return li;
  }));
  $('warnings-none').hidden = f.warnings.length > 0;

  const last = f.sample;
  set('rate-in', rate(last?.in_per_s));
  set('rate-hub', rate(last?.to_hub_per_s));
  set('rate-down', rate(last?.from_hub_per_s));
  set('rate-out', rate(last?.delivered_per_s));
}

function draw() {
  const canvas = $('chart');
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const g = canvas.getContext('2d');
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  const style = getComputedStyle(document.documentElement);
  const color = (name) => style.getPropertyValue(name).trim();
  const now = Date.now();
  const span = KEPT * 1000;
  const x = (ms) => width - ((now - ms) / span) * width;
  const pad = 16;

  const series = [['in_per_s', '--in'], ['to_hub_per_s', '--hub'], ['from_hub_per_s', '--down'], ['delivered_per_s', '--out']];
  const top = Math.max(1, ...samples.flatMap((p) => series.map(([k]) => p[k])));
  const topBacklog = Math.max(1, ...samples.map((p) => p.backlog));
  g.strokeStyle = color('--line');
  g.lineWidth = 1;
  g.beginPath();
  for (let m = 0; m <= 15; m += 5) {
    const gx = x(now - m * 60000);
    g.moveTo(gx, 0);
    g.lineTo(gx, height);
  }
  g.stroke();
  g.fillStyle = color('--muted');
  g.font = '11px system-ui, sans-serif';
  g.fillText(`${rate(top)}/s`, 4, 12);
  g.fillText(`backlog ${num(topBacklog)}`, Math.max(4, width - 110), 12);
  const line = (value, max, name) => {
    g.strokeStyle = color(name);
    g.lineWidth = 1.5;
    g.beginPath();
    samples.forEach((p, i) => {
      const px = x(p.unix_ms);
      const py = height - 2 - (value(p) / max) * (height - pad - 2);
      if (i === 0) g.moveTo(px, py); else g.lineTo(px, py);
    });
    g.stroke();
  };
  for (const [key, name] of series) line((p) => p[key], top, name);
  line((p) => p.backlog, topBacklog, '--backlog');
}

function connect() {
  const events = new EventSource('events');
  events.addEventListener('open', () => { set('live', 'live'); });
  events.addEventListener('error', () => { set('live', 'reconnecting…'); });
  events.addEventListener('frame', (e) => {
    const f = JSON.parse(e.data);
    if (f.history) {
      samples.splice(0, samples.length, ...f.history);
    } else if (f.sample && (samples.length === 0 || samples[samples.length - 1].unix_ms !== f.sample.unix_ms)) {
      samples.push(f.sample);
      if (samples.length > KEPT) samples.shift();
    }
    render(f);
    draw();
  });
}

window.addEventListener('resize', draw);
connect();
