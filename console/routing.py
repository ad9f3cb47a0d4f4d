"""WebSocket routes: the agent protocol and the operators' dashboard."""

from django.urls import path

from console.agent_consumer import AgentConsumer

websocket_urlpatterns: list = [
    path("ws/agent/v1/", AgentConsumer.as_asgi()),
]
