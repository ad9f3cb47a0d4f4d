"""Settings for development and tests; `console.settings.production` hardens them."""

from .base import *  # noqa: F403
