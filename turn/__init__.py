"""End-of-turn detection: VAD silence, the smart-turn audio model and a text model, fused."""
