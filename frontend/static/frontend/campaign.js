/* Live campaign page: per-wave × state counts and gate values vs thresholds (Plotly). */
"use strict";

(function () {
  const states = JSON.parse(document.getElementById("campaign-states").textContent);
  const esc = window.ConsoleUI.esc;

  function drawGates(gates) {
    const el = document.getElementById("gate-chart");
    const empty = document.getElementById("gate-empty");
    el.hidden = !gates.length;
    empty.hidden = !!gates.length;
    if (!gates.length || !window.Plotly) return;
    const labels = gates.map((g) => "wave " + (+g.wave + 1) + " · " + g.gate);
    const colors = gates.map((g) => (g.ok === false ? "#b42318" : g.ok === true ? "#157a3b" : "#a15c00"));
    window.Plotly.react(el, [
      { type: "bar", name: "value", x: labels, y: gates.map((g) => g.value), marker: { color: colors },
        text: gates.map((g) => g.detail || ""), hovertemplate: "%{x}<br>value %{y}<br>%{text}<extra></extra>" },
      { type: "scatter", mode: "markers", name: "threshold", x: labels, y: gates.map((g) => g.threshold),
        marker: { symbol: "line-ew-open", size: 30, color: "#1d2430", line: { width: 3 } } },
    ], { height: 260, margin: { l: 50, r: 10, t: 10, b: 60 }, legend: { orientation: "h" } },
    { displaylogo: false, responsive: true });
  }

  function render(snap) {
    if (snap.gone) return;
    const st = document.getElementById("c-state");
    st.textContent = snap.state;
    st.className = "pill " + snap.state;
    document.getElementById("c-progress").textContent =
      snap.committed.toLocaleString() + " / " + snap.total.toLocaleString() + " committed (" + snap.pct + " %)";
    document.getElementById("c-wave").textContent = snap.current_wave + 1;
    const body = document.querySelector("#wave-table tbody");
    const waves = Object.entries(snap.by_wave);
    if (waves.length) {
      body.innerHTML = waves.map(([w, counts]) => "<tr><td>" + (+w + 1) + "</td>" +
        states.map((s) => '<td class="n">' + esc(counts[s] || 0) + "</td>").join("") + "</tr>").join("");
    }
    drawGates(snap.gates);
  }

  drawGates(JSON.parse(document.getElementById("campaign-snap").textContent).gates);
  document.addEventListener("live:delta", (ev) => { if (ev.detail.campaign) render(ev.detail.campaign); });
})();
