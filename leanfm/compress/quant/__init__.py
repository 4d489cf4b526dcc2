"""Quantization methods: RTN, GPTQ, AWQ, SmoothQuant W8A8, LLM.int8() outlier decomposition."""
