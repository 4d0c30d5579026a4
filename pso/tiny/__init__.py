"""The built-in tiny world: offline tokenizer and tiny diffusers pipelines."""
