"""The audio-video data pipeline: prepare (index + audio extraction), clips, decoding backends, synthetic data."""
