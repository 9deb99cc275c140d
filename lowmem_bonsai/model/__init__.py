"""What the model is: its geometry (config.json), its weights on disk, its family and what it keeps."""
