"""Package marker so the module script ships in non-editable installs; load it with ``components.metrics.modules.load("bertscore")``."""
