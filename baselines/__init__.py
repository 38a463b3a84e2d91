"""Baseline interventions (pure torch). The unintervened baseline is ``bench``'s ``none`` method."""
