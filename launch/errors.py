"""The launch layer's user error: one sentence naming the setting and the fix."""

from plait.common.checks import SettingError

class LaunchError(SettingError):
    """A launch setting that cannot work (missing sbatch, unreachable rendezvous, ...)."""
