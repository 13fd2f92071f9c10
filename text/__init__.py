"""Tokenizers: the decoder LLMs' byte-level BPE on tiktoken with their chat formats
(tokenizer.py), and BERT's WordPiece for the Q-Former (wordpiece.py)."""
