"""Serving: an OpenAI/DeepSeek-compatible API with continuous batching, and a web chat.

  protocol.py    the request bodies and the error shape
  app.py         the routes, auth and errors; `create_app`, `serve`
  guard.py       request size limit and Host check, in front of the routes
  scheduler.py   continuous batching over the engine's DecodeBatch
  static/        the web chat page
"""
