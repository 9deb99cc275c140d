"""What a run leaves on disk: pruned shards, resumable progress, the report; all written atomically."""
