"""Measurement: GGUF files read, selected, fake-quantized and twinned, models and the corpus,
and llama.cpp runs (llama/). It stores through storage and never concludes."""
