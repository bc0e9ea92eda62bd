"""`ddpmkit bench`: ddpmkit's training and sampling speed beside the tutorial's own loops, in one process."""
