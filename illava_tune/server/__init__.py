"""The schedule service deployments pull from (`illava-tune serve`): `create_app` builds the
FastAPI app over a database; `tokens` makes and checks the tokens it accepts."""

from .app import create_app

__all__ = ["create_app"]
