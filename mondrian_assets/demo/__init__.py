"""The embedded default: a generated demo app and a tiny Qwen3-VL, apart from the product."""
