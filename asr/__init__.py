"""Speech recognition: voice activity detection and the causal streaming recogniser."""
