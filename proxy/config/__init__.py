"""Configuration: read once from YAML into frozen, typed objects with every default in one
place (``model``), with every problem reported as ``FILE:LINE: message`` (``load``);
printed back with its defaults filled in (``dump``); durations and sizes (``units``)."""
