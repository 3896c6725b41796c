"""`lazymoe serve`: an OpenAI-compatible HTTP server and a chat page over one loaded model.

openai_api.py checks request bodies and shapes the responses (no HTTP, no threads); engine.py owns the
model on one worker thread behind a bounded queue; server.py is the HTTP layer (standard library
http.server); page.html is the chat page served at `/`.
"""
