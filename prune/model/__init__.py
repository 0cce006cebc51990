"""The model itself: loading, architecture facts, hooks that capture block states, surgery, meta skeleton."""
