"""ddpmkit's built-in plugins (installed as the import package ``ddpmkit_plugins``)."""
