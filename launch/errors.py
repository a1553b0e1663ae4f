"""The launch layer's user error: one sentence naming the setting and the fix."""


class LaunchError(ValueError):
    """A launch setting that cannot work (missing sbatch, unreachable rendezvous, ...)."""
