"""Infrastructure: settings, the Redis prefix cache, telemetry and the Serve configuration."""
