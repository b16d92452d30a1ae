"""The session core: events, clock, audio plumbing, settings, model registry, CLI."""
