"""`mmcompose serve`: an OpenAI-compatible chat-completions server with a web chat page, batched on one model."""

from mmcompose.serve.app import Limits, ServerConfig, create_app
from mmcompose.serve.run import serve

__all__ = ["Limits", "ServerConfig", "create_app", "serve"]
