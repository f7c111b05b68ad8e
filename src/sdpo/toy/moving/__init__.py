"""The moving-digits world: digits sliding across a small canvas (data, base models, reward, World)."""
