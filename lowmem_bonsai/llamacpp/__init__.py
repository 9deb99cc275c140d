"""llama.cpp interop: GGUF to a checkpoint folder and back, tokenizers both ways, and running a GGUF."""
