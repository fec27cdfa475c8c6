"""Language models: decoders compiled with their KV cache kept on the device (compile.py,
kv_cache.py), run token by token (generate.py), with text in and out (text.py), and the
command line's side of them (command.py)."""
