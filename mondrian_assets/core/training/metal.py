"""Apple-GPU memory practice, as mlx-vlm's own trainer follows it: wire the model's memory (so macOS does not page
it out mid-run) and return cached buffers after each step (so a long run's peak stays flat). Nothing happens on
other devices, where neither applies."""

from __future__ import annotations


def wire_model_memory() -> None:
    import mlx.core as mx

    if mx.metal.is_available():
        limit = mx.device_info().get("max_recommended_working_set_size")
        if limit is not None:
            mx.set_wired_limit(limit)


def release_cached_buffers() -> None:
    import mlx.core as mx

    if mx.metal.is_available():
        mx.clear_cache()
