"""Loading a base (plus adapter) and generating analyses the way serving will."""
