"""Platform: files written atomically, hashes, paths, the one logged subprocess call, progress
events. The lowest layer but the base (errors, figures): it knows nothing of GGUF or llama.cpp."""
