"""Real prompts (MT-Bench and Vicuna questions, Apache-2.0; see ``README.md`` here) and their loader."""
