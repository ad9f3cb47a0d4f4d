"""ASGI entry point: HTTP through Django, WebSockets through Channels routing."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402 -- needs Django set up

from console.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": URLRouter(websocket_urlpatterns)})

# Everything imported so far (Django, the apps, their libraries: most of the process's objects)
# lives as long as the process. Moving it out of the collector's generations keeps the full
# collections that a server holding thousands of connections runs now and then short: they
# stalled the event loop for 30-160 ms, and up to 800 ms with a deep ingest queue.
import gc  # noqa: E402

gc.freeze()
# The collector runs when tracked objects allocated minus freed pass threshold0 (700 by default).
# A telemetry frame holds ~500 tracked objects (its points) from its arrival until its flush, so at
# 100,000 points/s the default ran a young collection ~150 times a second, promoted the queued
# frames into the older generations, and so triggered a full collection every few seconds: each
# stalled the event loop 60-200 ms with 300 agents (the ingest ack latency's p99). Objects are
# freed by reference counting as soon as they are dropped; the collector is only for reference
# cycles, which a web process makes slowly, so it can run far less often. With 600 agents sending
# (same load, machine shared): 2,781 young / 19 full collections, 16 s of pauses, became 256 / 2,
# 4 s. A young collection now scans ~50,000 objects (a few ms).
gc.set_threshold(50_000, 20, 10)
