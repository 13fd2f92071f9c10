"""Scoring answers (scoring.py) and answering questions with a loaded model in batches
(answerer.py): shared by eval.py and training's validation."""
