"""Upstream models: tokens from OpenAI-compatible servers (vLLM, trtllm-serve, llama-server, another ember)."""
