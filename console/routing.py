"""WebSocket routes: the agent protocol and the operators' dashboard."""

websocket_urlpatterns: list = []
