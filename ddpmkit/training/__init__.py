"""Training: the loop as named steps, the job of ``ddpmkit run``, and the pre-flight report."""
