"""SDSAT services: Ray Serve deployments, OpenAI-compatible API, batch jobs and the `sdsat` CLI."""
