"""How it runs: blocks streamed from disk through a batched, masked forward, sized to the memory."""
