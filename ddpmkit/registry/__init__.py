"""The registry: entry-point discovery, building one component from its name and options, and blame
(a plugin's exception as one line naming it)."""
