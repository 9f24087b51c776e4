"""The request path on Ray Serve: router (HTTP, OpenAI API) -> decoder replicas (one engine each),
with errors, access control, telemetry and the engine thread. services/app.py builds the app."""
