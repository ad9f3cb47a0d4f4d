/* Edge fleet console dashboard: local times, confirmations, bulk form, copy, live updates.
   No framework, no CDN. Times: every <time datetime> is rewritten into the browser's time zone. */
"use strict";

(function () {
  const tz = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  const fmt = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", hour12: false,
  });

  function localize(root) {
    (root || document).querySelectorAll("time[datetime]").forEach((el) => {
      const when = new Date(el.getAttribute("datetime"));
      if (isNaN(when)) return;
      el.title = fmt.format(when) + " " + tz;
      if (!el.dataset.relative) el.textContent = fmt.format(when);
    });
  }

  function ago(iso) {
    if (!iso) return "never";
    const s = Math.max(0, Math.round((Date.now() - new Date(iso)) / 1000));
    if (s >= 86400) return Math.floor(s / 86400) + " d ago";
    if (s >= 3600) return Math.floor(s / 3600) + " h ago";
    if (s >= 60) return Math.floor(s / 60) + " min ago";
    return s + " s ago";
  }

  function esc(text) {
    const d = document.createElement("div");
    d.textContent = text == null ? "" : String(text);
    return d.innerHTML;
  }

  function toast(html, kind) {
    const box = document.getElementById("toasts");
    if (!box) return;
    const el = document.createElement("div");
    el.className = "toast " + (kind || "");
    el.innerHTML = html;
    box.appendChild(el);
    setTimeout(() => el.remove(), 8000);
  }

  document.addEventListener("DOMContentLoaded", () => {
    localize();
    const tzEl = document.getElementById("tz-name");
    if (tzEl) tzEl.textContent = tz;

    // Confirmation for every state change.
    document.querySelectorAll("form[data-confirm]").forEach((form) => {
      form.addEventListener("submit", (ev) => {
        if (!window.confirm(form.dataset.confirm)) ev.preventDefault();
      });
    });

    // Bulk actions: tick-all, fields per action, and a confirmation naming the count.
    const all = document.getElementById("check-all");
    if (all) all.addEventListener("change", () => {
      document.querySelectorAll('#device-table input[name="uid"]').forEach((c) => { c.checked = all.checked; });
    });
    const bulk = document.getElementById("bulk-form");
    if (bulk) {
      const actionSel = document.getElementById("b-action");
      const sync = () => {
        if (!actionSel) return;
        bulk.querySelectorAll("[data-for]").forEach((el) => { el.hidden = el.dataset.for !== actionSel.value; });
      };
      if (actionSel) { actionSel.addEventListener("change", sync); sync(); }
      bulk.addEventListener("submit", (ev) => {
        if (!ev.submitter || !ev.submitter.hasAttribute("data-confirm-bulk")) return;
        const scope = document.getElementById("b-scope");
        const ticked = bulk.querySelectorAll('input[name="uid"]:checked').length;
        const what = scope && scope.value === "matching" ? scope.selectedOptions[0].textContent : ticked + " ticked device(s)";
        if (scope && scope.value !== "matching" && ticked === 0) {
          ev.preventDefault();
          window.alert("Tick at least one device, or choose “all matching devices”.");
          return;
        }
        const label = actionSel ? actionSel.selectedOptions[0].textContent : "apply";
        if (!window.confirm("Really " + label + " on " + what + "?")) ev.preventDefault();
      });
    }

    // Copy buttons (the one-time token secret).
    document.querySelectorAll("[data-copy]").forEach((btn) => {
      btn.addEventListener("click", async () => {
        const input = document.querySelector(btn.dataset.copy);
        try {
          await navigator.clipboard.writeText(input.value);
        } catch (e) {
          input.select();
          document.execCommand("copy");
        }
        btn.textContent = "Copied";
        setTimeout(() => { btn.textContent = "Copy"; }, 2000);
      });
    });
  });

  // --- live updates over /ws/ui/ -----------------------------------------------------
  const Live = {
    topics: {},
    socket: null,
    backoff: 1000,
    status: "connecting",
    subscribe(topics) {
      Object.assign(this.topics, topics);
      this.send();
    },
    send() {
      if (this.socket && this.socket.readyState === 1) {
        this.socket.send(JSON.stringify({ subscribe: Object.assign({ nav: {} }, this.topics) }));
      }
    },
    setStatus(state, text) {
      this.status = state;
      const dot = document.getElementById("live-status");
      if (dot) { dot.className = "live-dot " + state; dot.title = "Live updates: " + text; dot.setAttribute("aria-label", dot.title); }
      document.body.dataset.liveState = state;
    },
    connect() {
      if (!document.body.dataset.live) return;
      const proto = location.protocol === "https:" ? "wss:" : "ws:";
      const ws = new WebSocket(proto + "//" + location.host + "/ws/ui/");
      this.socket = ws;
      ws.onopen = () => { this.backoff = 1000; this.setStatus("up", "connected"); this.send(); };
      ws.onmessage = (ev) => { try { this.handle(JSON.parse(ev.data)); } catch (e) { console.error(e); } };
      ws.onclose = (ev) => {
        if (ev.code === 4401) { this.setStatus("down", "logged out — reload the page to sign in"); return; }
        if (ev.code === 4403) { this.setStatus("down", "your role may not receive live updates"); return; }
        this.setStatus("down", "reconnecting");
        // Reconnect with backoff; re-subscribing with our cursors resyncs what we missed.
        setTimeout(() => this.connect(), this.backoff);
        this.backoff = Math.min(this.backoff * 2, 30000);
      };
    },
    handle(msg) {
      if (msg.type !== "delta") return;
      if (msg.nav) this.onNav(msg.nav.active_alerts);
      if (msg.fleet) this.onFleet(msg.fleet);
      if (msg.alerts) this.onAlerts(msg.alerts);
      if (msg.attestation) this.onAttestation(msg.attestation);
      if (msg.presence) this.onPresence(msg.presence.devices);
      document.dispatchEvent(new CustomEvent("live:delta", { detail: msg }));
    },
    onNav(n) {
      const b = document.getElementById("nav-alerts");
      if (b) { b.textContent = n; b.hidden = !n; }
      const ov = document.getElementById("ov-alerts");
      if (ov) ov.textContent = n.toLocaleString();
    },
    onFleet(c) {
      const box = document.querySelector('[data-topic="fleet"]');
      if (!box) return;
      const set = (sel, v) => { const el = box.querySelector(sel); if (el) el.textContent = v; };
      set('[data-k="total"]', c.total.toLocaleString());
      set('[data-k="online"]', c.online.toLocaleString());
      set('[data-k="online_pct"]', c.online_pct == null ? "—" : c.online_pct + " %");
      Object.entries(c.by_status).forEach(([s, n]) => set('[data-status="' + s + '"]', n.toLocaleString()));
    },
    onAlerts(d) {
      if (d.resync) { location.reload(); return; }
      if (this.topics.alerts) this.topics.alerts.after = d.cursor;
      this.onNav(d.active_alerts);
      const table = document.getElementById("alerts-table");
      const count = document.getElementById("active-count");
      if (count) count.textContent = d.active_alerts.toLocaleString();
      d.new.forEach((a) => {
        if (table && !table.querySelector('tr[data-alert-id="' + a.id + '"]')) {
          const tr = document.createElement("tr");
          tr.dataset.alertId = a.id;
          tr.className = "fresh";
          const value = a.value == null ? "—" : esc(a.metric) + " = " + Number(a.value).toFixed(2);
          tr.innerHTML = '<td><time datetime="' + esc(a.opened_at) + '"></time></td>' +
            '<td><span class="pill ' + esc(a.severity) + '">' + esc(a.severity) + "</span></td>" +
            "<td>" + esc(a.rule) + '</td><td><a href="/devices/' + encodeURIComponent(a.device) + '/">' + esc(a.device) + "</a></td>" +
            "<td>" + value + "</td><td>" + esc(a.state) + "</td>";
          const tpl = document.getElementById("ack-form");
          if (tpl) {
            const td = document.createElement("td");
            const form = tpl.content.cloneNode(true);
            form.querySelector("form").action = "/alerts/" + a.id + "/acknowledge/";
            td.appendChild(form);
            tr.appendChild(td);
          }
          table.querySelector("tbody").prepend(tr);
          table.hidden = false;
          const empty = document.getElementById("alerts-empty");
          if (empty) empty.hidden = true;
          localize(tr);
        }
        toast('<span class="pill ' + esc(a.severity) + '">' + esc(a.severity) + "</span> " + esc(a.rule) +
          ' on <a href="/devices/' + encodeURIComponent(a.device) + '/">' + esc(a.device) + "</a>", a.severity);
      });
    },
    onAttestation(d) {
      if (this.topics.attestation) this.topics.attestation.after = d.cursor;
      d.new.forEach((r) => {
        toast("Attestation " + esc(r.device) + ': <span class="pill ' + esc(r.status) + '">' + esc(r.status) + "</span>" +
          (r.self_reported ? ' <span class="pill self">self-reported</span>' : "") +
          (r.failed.length ? " — failed: " + r.failed.map(esc).join(", ") : ""), r.status);
      });
    },
    onPresence(devices) {
      devices.forEach((d) => {
        const row = document.querySelector('tr[data-device-id="' + d.id + '"]');
        if (row) {
          const p = row.querySelector('[data-k="presence"]');
          if (p) p.innerHTML = '<span class="' + (d.online ? "on" : "off") + '">' + (d.online ? "● online" : "○ offline") +
            "</span><br><small>" + ago(d.last_seen) + "</small>";
          const s = row.querySelector('[data-k="status"]');
          if (s) { s.textContent = d.status; s.className = "pill " + d.status; }
        }
        const pres = document.getElementById("dev-presence");
        if (pres && document.querySelector("#charts, #telemetry")) {
          pres.className = d.online ? "on" : "off";
          pres.textContent = d.online ? "● online" : "○ offline";
          const seen = document.getElementById("dev-last-seen");
          if (seen) seen.textContent = ago(d.last_seen);
          const st = document.getElementById("dev-status");
          if (st) { st.textContent = d.status; st.className = "pill " + d.status; }
        }
      });
    },
  };
  window.Live = Live;
  window.ConsoleUI = { localize, esc, toast };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", () => Live.connect());
  else Live.connect();
})();
