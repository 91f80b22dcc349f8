"""Preference losses (the DPO family): ``(PreferenceBatch, policy PairLogps, ref PairLogps | None) -> PreferenceOut``."""
