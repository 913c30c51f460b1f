"""What a run is (recipe: the settings that decide its trials, in the typed sections of config.py) and what a
trial is (its spec and its result).

Plain data that every later room passes along. May import: `science.theory` (regime and rank names), `errors`.
"""
