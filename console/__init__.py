"""The Django project: settings, URLs, the ASGI application and the Celery app."""

import functools

import redis.utils

from .celery import app as celery_app

# redis-py 8 looks its own version up in the installed packages' metadata (a walk of
# sys.path) for every new connection it opens, to announce it with CLIENT SETINFO. A busy web
# process opens many (the channel layer's pool grows with concurrent group_add/group_discard
# during a reconnect storm): profiled at 9 % of the event loop while 1,000 agents were shed at
# once. The version cannot change while the process runs, so it is looked up once.
redis.utils.get_lib_version = functools.cache(redis.utils.get_lib_version)

__all__ = ["celery_app"]
