"""Numeric algorithms as pure tensor functions ``(W, H, config) -> PackedWeight``: no modules, hooks or
devices. ``llmbin.registry`` maps each method's config to its function."""
