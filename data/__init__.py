"""The data side: LLaVA-format conversation files (dataset.py), batching them for a model
(collate.py), and easy-VQA converted to that format (easyvqa.py)."""
