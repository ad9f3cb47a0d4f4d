"""WebSocket routes: the agent protocol and the operators' dashboard."""

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from console.agent_consumer import AgentConsumer
from frontend.consumers import UiConsumer

websocket_urlpatterns: list = [
    path("ws/agent/v1/", AgentConsumer.as_asgi()),
    # Session-authenticated; the Origin check refuses cross-site pages riding the session cookie.
    path("ws/ui/", AllowedHostsOriginValidator(AuthMiddlewareStack(UiConsumer.as_asgi()))),
]
