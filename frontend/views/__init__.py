"""Dashboard pages: server-rendered, role-aware, reading through aggregate queries only."""
