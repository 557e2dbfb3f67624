"""fq-suite: fake-quantize GGUF tensors and measure the effect with llama.cpp."""

__version__ = "0.1.0"
