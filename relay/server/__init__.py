"""The server process: app factory, uvicorn integration, auth, health, observability."""
