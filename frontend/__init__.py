"""The operators' browser dashboard: server-rendered pages, Plotly charts, live updates."""
