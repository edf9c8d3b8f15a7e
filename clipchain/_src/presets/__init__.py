"""Named transforms: each a preset of :func:`clipchain.clip_norm` (one granularity, one policy)."""
