"""Ollama's API, translated: its request bodies to the OpenAI bodies the model servers take
(`request`), the model servers' chunks to its NDJSON lines and answers (`answer`), and what it
says of the local models (`models`). Its listener is the proxy's (`proxy.ollama_edge`); its
requests run on the relay's one path, a row each in `wrapper.apis`."""
