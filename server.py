"""OpenAI-compatible HTTP server (Flask), a thin adapter over the engine.

The serving issue fills this module; until then use the Python API (`jaxinfer.LLM`) or the CLI
(`jaxinfer generate`, `jaxinfer chat`).
"""

if __name__ == "__main__":
    raise SystemExit("the HTTP server is not built yet: use `jaxinfer chat` or `jaxinfer generate`")
