"""The LiteLLM proxy: its generated configuration, the hook bridge and the ASGI front."""
