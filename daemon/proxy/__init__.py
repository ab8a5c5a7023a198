"""The proxy program: the edge every client talks to (TLS, key, size, JSON, hooks, error
shapes), which hands requests for local models to the wrapper's relay and requests for
the `litellm:` section's deployments to LiteLLM, loaded in this program only then."""
