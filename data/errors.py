"""The one exception of plait.data: a corpus or shard that cannot be used, in one sentence naming the file."""

from plait.common.checks import SettingError

class DataError(SettingError):
    """Bad data (missing, empty, truncated, corrupted, wrong dtype or vocabulary); the message names the path."""
