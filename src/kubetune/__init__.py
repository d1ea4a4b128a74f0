"""kubetune: raw data to a tuned, evaluated, quantized model served by vLLM in Kubernetes."""

__version__ = "0.1.0"
