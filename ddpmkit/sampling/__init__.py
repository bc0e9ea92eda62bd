"""Drawing images: a trained run loaded once (``load_run``), batched sampling, image files and the strip."""
