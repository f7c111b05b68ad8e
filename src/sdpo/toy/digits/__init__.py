"""The digits world: 8x8 handwritten digits (data, base model, reward, World)."""
