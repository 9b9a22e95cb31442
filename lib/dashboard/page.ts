// The dashboard page: one self-contained HTML document (inline CSS and JS, no CDN, no build
// step). Every URL in it is relative, so it works under any mount path: it must be served
// at `<mount>/` and reads its stream from `<mount>/events`.
//
// The script below is plain ES2017 for the browser. It contains no backtick and no
// dollar-brace, so that it can live in this template literal untouched.

import { createHash } from 'node:crypto';

const STYLE = `
:root {
  --bg: #0d1117; --panel: #161b22; --panel2: #1c232c; --border: #272f3a; --text: #e1e6ed; --muted: #8b96a5; --faint: #4a5563;
  --green: #3fb950; --amber: #d29922; --orange: #f0883e; --red: #f85149; --blue: #58a6ff; --purple: #bc8cff; --grey: #6e7681;
  color-scheme: dark;
}
@media (prefers-color-scheme: light) {
  :root { --bg: #f6f8fa; --panel: #ffffff; --panel2: #f3f5f8; --border: #d8dee4; --text: #1f2328; --muted: #59636e; --faint: #b6bec8;
    --green: #1a7f37; --amber: #9a6700; --orange: #bc4c00; --red: #cf222e; --blue: #0969da; --purple: #8250df; --grey: #6e7781; color-scheme: light; }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--text); font: 13px/1.4 ui-sans-serif, system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header.top { position: sticky; top: 0; z-index: 2; display: flex; flex-wrap: wrap; align-items: center; gap: 10px 16px; padding: 12px 18px;
  background: color-mix(in srgb, var(--bg) 88%, transparent); backdrop-filter: blur(6px); border-bottom: 1px solid var(--border); }
.brand { display: flex; align-items: baseline; gap: 8px; min-width: 0; }
.brand b { font-size: 15px; letter-spacing: .2px; }
.brand span { color: var(--muted); font-size: 12px; }
.pill { display: inline-flex; align-items: center; gap: 6px; padding: 2px 10px; border-radius: 999px; font-weight: 600; font-size: 12px;
  border: 1px solid color-mix(in srgb, var(--c) 45%, transparent); background: color-mix(in srgb, var(--c) 14%, transparent); color: var(--c); white-space: nowrap; }
.pill::before { content: ""; width: 7px; height: 7px; border-radius: 50%; background: var(--c); }
#status { --c: var(--green); text-transform: uppercase; letter-spacing: .5px; }
#status.degraded { --c: var(--red); }
#summary { display: flex; flex-wrap: wrap; gap: 6px; }
#summary .pill { font-weight: 500; }
.spacer { flex: 1; }
.controls { display: flex; align-items: center; gap: 12px; color: var(--muted); }
.controls label { display: inline-flex; align-items: center; gap: 5px; cursor: pointer; user-select: none; }
#filter { width: 190px; padding: 5px 9px; border-radius: 6px; border: 1px solid var(--border); background: var(--panel); color: var(--text); font: inherit; }
#filter:focus { outline: 2px solid color-mix(in srgb, var(--blue) 60%, transparent); outline-offset: -1px; }
#conn { --c: var(--grey); font-weight: 500; }
#conn.live { --c: var(--green); }
#conn.live::before { animation: pulse 2s infinite; }
#conn.retrying { --c: var(--amber); }
@keyframes pulse { 50% { opacity: .35; } }
main { padding: 14px 18px 24px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(236px, 1fr)); gap: 10px; }
body.stale .grid { opacity: .55; filter: saturate(.4); }
.card { --c: var(--green); position: relative; min-width: 0; display: flex; flex-direction: column; gap: 6px; padding: 10px 12px 8px;
  background: var(--panel); border: 1px solid var(--border); border-radius: 8px; box-shadow: inset 3px 0 0 var(--c); transition: border-color .3s; }
.card.hidden { display: none; }
.card.alert { border-color: color-mix(in srgb, var(--c) 55%, var(--border)); background: linear-gradient(180deg, color-mix(in srgb, var(--c) 9%, var(--panel)), var(--panel) 60%); }
.s-closed, .s-ok { --c: var(--green); }
.s-half-open, .s-busy { --c: var(--amber); }
.s-full { --c: var(--orange); }
.s-open, .s-shedding { --c: var(--red); }
.s-on { --c: var(--purple); }
.s-off { --c: var(--grey); }
.head { display: flex; align-items: center; gap: 8px; min-width: 0; }
.name { flex: 1; min-width: 0; margin: 0; font-size: 13.5px; font-weight: 600; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.state { flex: none; font-size: 11px; padding: 1px 8px; }
.kind { color: var(--muted); font-size: 11px; text-transform: uppercase; letter-spacing: .6px; margin-top: -4px; }
.figs { display: flex; gap: 12px; font-variant-numeric: tabular-nums; }
.fig { display: flex; flex-direction: column; min-width: 0; }
.fig b { font-size: 16px; font-weight: 600; line-height: 1.2; }
.fig small { color: var(--muted); font-size: 10.5px; }
.fig.bad.nonzero b { color: var(--red); }
.fig.zero b { color: var(--faint); }
.detail { display: flex; flex-direction: column; gap: 4px; color: var(--muted); font-size: 11.5px; font-variant-numeric: tabular-nums; min-height: 16px; }
.row { display: flex; align-items: center; gap: 8px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.row strong { color: var(--text); font-weight: 600; }
.bar { flex: 1; height: 6px; min-width: 40px; border-radius: 3px; background: var(--panel2); border: 1px solid var(--border); overflow: hidden; }
.bar i { display: block; height: 100%; width: 0; background: var(--blue); transition: width .4s; }
.bar.hot i { background: var(--orange); }
.bar.max i { background: var(--red); }
.reasons { display: flex; flex-wrap: wrap; gap: 4px; min-height: 0; }
.reasons:empty { display: none; }
.chip { font-size: 10.5px; padding: 0 6px; border-radius: 4px; color: var(--red); background: color-mix(in srgb, var(--red) 12%, transparent); font-variant-numeric: tabular-nums; }
.chart { display: block; width: 100%; height: 34px; margin-top: 2px; border-top: 1px dashed var(--border); }
.chart .calls { fill: none; stroke: var(--blue); stroke-width: 1.5; vector-effect: non-scaling-stroke; }
.chart .callsfill { fill: color-mix(in srgb, var(--blue) 12%, transparent); stroke: none; }
.chart .bad { fill: color-mix(in srgb, var(--red) 55%, transparent); stroke: none; }
.chartwrap { position: relative; }
.chartwrap span { position: absolute; right: 0; top: -7px; padding-left: 4px; background: var(--panel); font-size: 9.5px; line-height: 12px; color: var(--muted); }
.card.k-keyed .figs, .card.k-keyed .chartwrap { display: none; }
body.compact .chartwrap, body.compact .detail .bar, body.compact .kind, body.compact .detail .row:nth-child(n+2) { display: none; }
body.compact .card { gap: 3px; padding: 7px 9px 6px; }
body.compact .grid { grid-template-columns: repeat(auto-fill, minmax(178px, 1fr)); gap: 7px; align-items: start; }
body.compact .fig b { font-size: 14px; }
body.compact .figs { gap: 10px; }
body.compact .state { font-size: 0; gap: 0; padding: 3px; }
#empty { color: var(--muted); padding: 40px 0; text-align: center; }
footer { padding: 0 18px 18px; color: var(--muted); font-size: 11px; display: flex; gap: 14px; flex-wrap: wrap; }
footer i { display: inline-block; width: 10px; height: 3px; vertical-align: middle; margin-right: 4px; }
.key-calls { background: var(--blue); }
.key-bad { background: var(--red); }
`;

const SCRIPT = `
(function () {
  'use strict';
  var NS = 'http://www.w3.org/2000/svg';
  var KIND = { 'circuit-breaker': 'circuit breaker', 'bulkhead': 'bulkhead', 'timeout': 'timeout', 'retry': 'retry', 'fallback': 'fallback',
    'rate-limit': 'rate limit', 'load-shedder': 'load shedder', 'adaptive-concurrency': 'adaptive concurrency', 'keyed': 'keyed', 'chaos': 'chaos' };
  var RANK = { open: 0, shedding: 0, 'half-open': 1, full: 1, busy: 2, on: 3 };
  var ALERT = { open: 1, shedding: 1, 'half-open': 1, full: 1 };
  var W = 240, H = 34;
  var grid = document.getElementById('grid');
  var statusEl = document.getElementById('status');
  var summaryEl = document.getElementById('summary');
  var connEl = document.getElementById('conn');
  var clockEl = document.getElementById('clock');
  var filterEl = document.getElementById('filter');
  var problemsEl = document.getElementById('problems');
  var compactEl = document.getElementById('compact');
  var emptyEl = document.getElementById('empty');
  var titleEl = document.getElementById('title');
  var cards = new Map();
  var order = [];
  var intervalMs = 1000, historyLength = 60, title = document.title, compactTouched = false, lastSnapshot = null;

  function el(tag, cls, parent, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  function num(n) {
    if (typeof n !== 'number' || !isFinite(n)) return '–';
    var a = Math.abs(n);
    return String(a >= 100 ? Math.round(n) : a >= 10 ? Number(n.toFixed(1)) : Number(n.toFixed(2)));
  }
  function ms(n) { return n >= 1000 ? num(n / 1000) + ' s' : num(n) + ' ms'; }
  function bytes(n) { return n >= 1073741824 ? num(n / 1073741824) + ' GB' : num(n / 1048576) + ' MB'; }
  function pct(n) { return num(n) + '%'; }
  function fig(parent, label, bad) {
    var box = el('div', 'fig' + (bad ? ' bad' : ''), parent);
    var value = el('b', '', box, '0');
    el('small', '', box, label);
    return { box: box, value: value, bad: bad };
  }
  function setFig(f, n) {
    f.value.textContent = num(n);
    f.box.classList.toggle('zero', !n);
    f.box.classList.toggle('nonzero', !!n);
  }
  function row(parent, text, strong) {
    var r = el('div', 'row', parent);
    if (strong !== undefined) { el('strong', '', r, strong); r.appendChild(document.createTextNode(' ' + text)); } else r.textContent = text;
    return r;
  }
  function bar(parent, used, total, label) {
    var r = el('div', 'row', parent);
    var b = el('div', 'bar', r);
    var ratio = total > 0 ? Math.min(1, used / total) : 0;
    if (ratio >= 1) b.classList.add('max'); else if (ratio >= 0.75) b.classList.add('hot');
    el('i', '', b).style.width = (ratio * 100).toFixed(1) + '%';
    el('span', '', r, label);
  }

  function makeCard(g) {
    var c = { history: [], state: '', data: null };
    c.el = el('article', 'card');
    c.el.dataset.id = String(g.id);
    var head = el('div', 'head', c.el);
    c.name = el('h2', 'name', head, g.name);
    c.name.title = g.name + ' · ' + (KIND[g.kind] || g.kind);
    c.state = el('span', 'pill state', head);
    el('div', 'kind', c.el, KIND[g.kind] || g.kind);
    var figs = el('div', 'figs', c.el);
    c.calls = fig(figs, 'calls/s', false);
    c.fails = fig(figs, 'failed/s', true);
    c.rej = fig(figs, 'rejected/s', true);
    c.detail = el('div', 'detail', c.el);
    c.reasons = el('div', 'reasons', c.el);
    var wrap = el('div', 'chartwrap', c.el);
    var svg = document.createElementNS(NS, 'svg');
    svg.setAttribute('class', 'chart');
    svg.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
    svg.setAttribute('preserveAspectRatio', 'none');
    c.fill = document.createElementNS(NS, 'path'); c.fill.setAttribute('class', 'callsfill'); svg.appendChild(c.fill);
    c.bad = document.createElementNS(NS, 'path'); c.bad.setAttribute('class', 'bad'); svg.appendChild(c.bad);
    c.line = document.createElementNS(NS, 'path'); c.line.setAttribute('class', 'calls'); svg.appendChild(c.line);
    wrap.appendChild(svg);
    c.max = el('span', '', wrap);
    return c;
  }

  function details(c, g) {
    var s = g.stats || {};
    var d = c.detail;
    d.replaceChildren();
    switch (g.kind) {
      case 'circuit-breaker':
        if (s.state === 'open') row(d, s.forced ? 'forced open' : 'half-open in ' + ms(s.remainingOpenMs || 0), 'open:');
        else if (s.state === 'half-open') {
          var probing = s.probes ? s.probes.inFlight : 0;
          row(d, probing > 0 ? probing + ' probe' + (probing === 1 ? '' : 's') + ' running' : 'the next call probes', 'half-open:');
        }
        bar(d, s.failureRate || 0, 100, 'failing ' + pct(s.failureRate || 0) + ' of ' + (s.calls || 0));
        break;
      case 'bulkhead':
        bar(d, s.active, s.limit, s.active + '/' + s.limit + ' running');
        if (s.queue > 0) bar(d, s.queued, s.queue, s.queued + '/' + s.queue + ' queued');
        break;
      case 'adaptive-concurrency':
        bar(d, s.inflight, s.limit, s.inflight + ' in flight, limit ' + s.limit);
        if (s.shortRttMs !== undefined) row(d, 'latency ' + ms(s.shortRttMs) + (s.longRttMs !== undefined ? ' (long-term ' + ms(s.longRttMs) + ')' : ''));
        break;
      case 'rate-limit':
        row(d, 'keys · ' + s.limit + ' per ' + ms(s.windowMs) + ' · ' + s.algorithm, num(s.keys));
        break;
      case 'load-shedder':
        row(d, 'event-loop delay', ms(s.eventLoopDelayMs));
        row(d, 'heap · ' + bytes(s.rssBytes) + ' rss', bytes(s.heapUsedBytes));
        break;
      case 'timeout':
        row(d, 'limit · ' + s.pending + ' pending · ' + s.timedOut + ' timed out', ms(s.timeoutMs));
        break;
      case 'retry':
        row(d, 'retries · up to ' + s.maxAttempts + ' tries', num(s.retries));
        break;
      case 'fallback':
        row(d, 'answered by the fallback of ' + s.calls, num(s.fallbacks));
        break;
      case 'keyed':
        row(d, 'keys · ' + s.created + ' created · ' + s.evicted + ' evicted', num(s.keys));
        break;
      case 'chaos':
        row(d, 'faults · ' + s.injectedLatency + ' delays of ' + s.calls + ' calls', num(s.injectedFaults));
        break;
    }
  }

  function reasons(c, g) {
    c.reasons.replaceChildren();
    var r = g.rate.reasons || {};
    Object.keys(r).forEach(function (k) { el('span', 'chip', c.reasons, k.replace('_', ' ') + ' ' + num(r[k]) + '/s'); });
  }

  function draw(c, now) {
    var span = historyLength * intervalMs, start = now - span, h = c.history, max = 1;
    for (var i = 0; i < h.length; i++) max = Math.max(max, h[i][1], h[i][2] + h[i][3]);
    var x = function (t) { return ((t - start) / span * W).toFixed(1); };
    var y = function (v) { return (H - 1 - v / max * (H - 4)).toFixed(1); };
    var line = '', fill = '', bad = '', run = [];
    function flush() {
      if (run.length === 0) return;
      var p = run.map(function (q) { return x(q[0]) + ' ' + y(q[1]); });
      line += 'M' + p.join('L');
      fill += 'M' + x(run[0][0]) + ' ' + H + 'L' + p.join('L') + 'L' + x(run[run.length - 1][0]) + ' ' + H + 'Z';
      var b = run.map(function (q) { return x(q[0]) + ' ' + y(q[2] + q[3]); });
      bad += 'M' + x(run[0][0]) + ' ' + H + 'L' + b.join('L') + 'L' + x(run[run.length - 1][0]) + ' ' + H + 'Z';
      run = [];
    }
    for (var j = 0; j < h.length; j++) {
      if (h[j][0] < start) continue;
      // A gap in the data (nobody watched) is a gap in the chart.
      if (run.length > 0 && h[j][0] - run[run.length - 1][0] > 2.5 * intervalMs) flush();
      run.push(h[j]);
    }
    flush();
    c.line.setAttribute('d', line);
    c.fill.setAttribute('d', fill);
    c.bad.setAttribute('d', bad);
    c.max.textContent = max > 1 ? 'max ' + num(max) + '/s' : '';
  }

  function update(c, g, now) {
    c.data = g;
    if (c.state.textContent !== g.state) {
      c.el.className = 'card k-' + g.kind + ' s-' + g.state + (ALERT[g.state] ? ' alert' : '');
      c.el.dataset.state = g.state;
      c.state.textContent = g.state;
      c.state.title = g.state;
    }
    setFig(c.calls, g.rate.calls);
    setFig(c.fails, g.rate.failures);
    setFig(c.rej, g.rate.rejected);
    details(c, g);
    reasons(c, g);
    draw(c, now);
  }

  function visible(c) {
    var q = filterEl.value.trim().toLowerCase();
    if (!q) return true;
    var g = c.data;
    return (g.name + ' ' + (KIND[g.kind] || g.kind) + ' ' + g.state).toLowerCase().indexOf(q) >= 0;
  }

  function layout() {
    var list = order.map(function (id) { return cards.get(id); });
    if (problemsEl.checked) {
      list = list.map(function (c, i) { return [c, i]; }).sort(function (a, b) {
        var ra = RANK[a[0].data.state], rb = RANK[b[0].data.state];
        ra = ra === undefined ? 9 : ra; rb = rb === undefined ? 9 : rb;
        return ra - rb || a[1] - b[1];
      }).map(function (p) { return p[0]; });
    }
    var shown = 0;
    list.forEach(function (c, i) {
      var v = visible(c);
      c.el.classList.toggle('hidden', !v);
      if (v) shown++;
      if (grid.children[i] !== c.el) grid.insertBefore(c.el, grid.children[i] || null);
    });
    emptyEl.hidden = shown > 0;
    emptyEl.textContent = cards.size === 0 ? 'No guards to show.' : 'No guard matches the filter.';
  }

  function summary(snapshot) {
    var counts = {};
    snapshot.guards.forEach(function (g) { counts[g.state] = (counts[g.state] || 0) + 1; });
    summaryEl.replaceChildren();
    var pill = el('span', 'pill s-ok', summaryEl, snapshot.guards.length + ' guard' + (snapshot.guards.length === 1 ? '' : 's'));
    pill.style.setProperty('--c', 'var(--muted)');
    ['open', 'shedding', 'half-open', 'full', 'busy'].forEach(function (state) {
      if (counts[state]) el('span', 'pill s-' + state, summaryEl, counts[state] + ' ' + state);
    });
  }

  function render(snapshot) {
    lastSnapshot = snapshot;
    var now = snapshot.t, seen = new Set();
    if (!compactTouched) { compactEl.checked = snapshot.guards.length > 40; document.body.classList.toggle('compact', compactEl.checked); }
    order = [];
    snapshot.guards.forEach(function (g) {
      var c = cards.get(g.id);
      if (!c) { c = makeCard(g); cards.set(g.id, c); grid.appendChild(c.el); }
      seen.add(g.id);
      order.push(g.id);
      update(c, g, now);
    });
    cards.forEach(function (c, id) { if (!seen.has(id)) { c.el.remove(); cards.delete(id); } });
    layout();
    var degraded = snapshot.status === 'degraded';
    statusEl.textContent = snapshot.status;
    statusEl.classList.toggle('degraded', degraded);
    document.title = (degraded ? '⚠ ' : '') + title;
    summary(snapshot);
    clockEl.textContent = 'updated ' + new Date(now).toLocaleTimeString();
  }

  function connected(state, text) {
    connEl.className = 'pill ' + state;
    connEl.textContent = text;
    document.body.classList.toggle('stale', state !== 'live');
  }

  filterEl.addEventListener('input', layout);
  problemsEl.addEventListener('change', layout);
  compactEl.addEventListener('change', function () { compactTouched = true; document.body.classList.toggle('compact', compactEl.checked); });

  if (typeof EventSource !== 'function') { connected('', 'no EventSource in this browser'); return; }
  var source = new EventSource('events');
  source.addEventListener('init', function (e) {
    var init = JSON.parse(e.data);
    intervalMs = init.intervalMs; historyLength = init.historyLength; title = init.title;
    titleEl.textContent = init.title;
    cards.forEach(function (c) { c.history = []; });
    init.snapshot.guards.forEach(function (g) {
      var c = cards.get(g.id);
      if (!c) { c = makeCard(g); cards.set(g.id, c); grid.appendChild(c.el); }
      c.history = (init.history[g.id] || []).slice();
    });
    connected('live', 'live');
    render(init.snapshot);
  });
  source.addEventListener('snapshot', function (e) {
    var snapshot = JSON.parse(e.data);
    snapshot.guards.forEach(function (g) {
      var c = cards.get(g.id);
      if (!c) return;
      c.history.push([snapshot.t, g.rate.calls, g.rate.failures, g.rate.rejected]);
      if (c.history.length > historyLength) c.history.splice(0, c.history.length - historyLength);
    });
    render(snapshot);
  });
  source.onopen = function () { connected('live', 'live'); };
  source.onerror = function () {
    if (source.readyState === EventSource.CLOSED) connected('', 'disconnected');
    else connected('retrying', 'reconnecting…');
  };
})();
`;

const sha256 = (text: string): string => `'sha256-${createHash('sha256').update(text).digest('base64')}'`;

/**
 * The Content-Security-Policy of the page: its own inline style and script (by hash), and its stream.
 * @example res.setHeader('content-security-policy', PAGE_CSP);
 */
export const PAGE_CSP = [
  "default-src 'none'",
  `script-src ${sha256(SCRIPT)}`,
  `style-src ${sha256(STYLE)}`,
  "connect-src 'self'",
  'img-src data:',
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'self'",
].join('; ');

/**
 * The page, with `title` (escaped) in its heading; the live title arrives with the stream.
 * @example res.end(renderPage('shop-api'));
 */
export function renderPage(title: string): string {
  const safe = escapeHtml(title);
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="dark light">
<title>${safe}</title>
<link rel="icon" href="data:,">
<style>${STYLE}</style>
</head>
<body>
<header class="top">
  <div class="brand"><b id="title">${safe}</b><span>bulwark</span></div>
  <span id="status" class="pill">…</span>
  <div id="summary"></div>
  <div class="spacer"></div>
  <div class="controls">
    <input id="filter" type="search" placeholder="Filter guards" aria-label="Filter guards" autocomplete="off">
    <label><input id="problems" type="checkbox"> problems first</label>
    <label><input id="compact" type="checkbox"> compact</label>
    <span id="clock"></span>
    <span id="conn" class="pill">connecting…</span>
  </div>
</header>
<main>
  <noscript>This page needs JavaScript to show the guards live.</noscript>
  <section id="grid" class="grid" aria-live="polite"></section>
  <div id="empty" hidden></div>
</main>
<footer>
  <span><i class="key-calls"></i>calls/s</span>
  <span><i class="key-bad"></i>failed + rejected/s</span>
  <span>last minute · figures per second</span>
</footer>
<script>${SCRIPT}</script>
</body>
</html>
`;
}

function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
