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
